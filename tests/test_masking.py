"""Masking strategies: invariants over the whole registry, then per-strategy references."""
import pytest
import torch

from multimae_att.masking import STRATEGIES, make_masks, sample_budgets, validate

NUM = {"rgb": 12, "depth": 7, "semseg": 9}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def scores_for(name: str, B: int, seed: int = 0, num=NUM, H: int = 4) -> dict:
    g = gen(seed)
    per_head = STRATEGIES[name].per_head
    return {m: torch.rand((B, H, n) if per_head else (B, n), generator=g) for m, n in num.items()}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("K", [0, 5, 14, 28])
def test_exact_visible_counts(name, K):
    B = 16
    v = sample_budgets(list(NUM.values()), K, B, alphas=0.7, generator=gen(1))
    masks = make_masks(name, scores_for(name, B), v, generator=gen(2))
    validate(masks, v, K=K, num_tokens=NUM)
    for m, h in masks.hidden.items():
        assert h.dtype == torch.bool and h.shape == (B, NUM[m])


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_unknown_parameter_is_named(name):
    v = sample_budgets(list(NUM.values()), 5, 2, generator=gen(1))
    with pytest.raises(ValueError, match="bogus.*valid parameters"):
        make_masks(name, scores_for(name, 2), v, generator=gen(2), bogus=1)


def test_unknown_strategy_is_named():
    with pytest.raises(ValueError, match="did you mean 'random'"):
        make_masks("randm", {"rgb": torch.zeros(1, 3)}, torch.tensor([[1]]))
