"""MaskingPolicy: warm-up, per-sample probability, budgets, adaptive alpha, config errors."""
import pytest
import torch

from multimae_att.masking import MaskingPolicy, build_masker, make_masks, validate

NUM = {"rgb": 10, "depth": 6}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def scores(B: int, H: int | None = None) -> dict:
    g = gen(0)
    return {m: torch.rand((B, n) if H is None else (B, H, n), generator=g) for m, n in NUM.items()}


def test_warmup_is_random_and_skips_scoring():
    pol = MaskingPolicy("high", warmup_epochs=2)
    assert not pol.needs_scores(0) and not pol.needs_scores(1.5) and pol.needs_scores(2)
    v = pol.budgets(list(NUM.values()), 7, 32, gen(1))
    early = pol(None, v, epoch=1, generator=gen(2), num_tokens=NUM)
    validate(early, v, K=7)
    assert not early.guided.any()
    ref = make_masks("random", {m: torch.zeros(32, n) for m, n in NUM.items()}, v, gen(2))
    assert all(torch.equal(early.hidden[m], ref.hidden[m]) for m in NUM)
    late = pol(scores(32), v, epoch=2, generator=gen(2))
    assert late.guided.all()
    high = make_masks("high", scores(32), v)
    assert all(torch.equal(late.hidden[m], high.hidden[m]) for m in NUM)
    with pytest.raises(ValueError, match="needs attention scores"):
        pol(None, v, epoch=3, generator=gen(2), num_tokens=NUM)


def test_random_strategy_never_needs_scores():
    pol = MaskingPolicy("random")
    assert not pol.needs_scores(10)
    v = pol.budgets(list(NUM.values()), 5, 4, gen(0))
    validate(pol(None, v, 10, gen(0), num_tokens=NUM), v, K=5)


def test_per_sample_probability_mixes_exactly():
    B = 2000
    pol = MaskingPolicy("amt", prob=0.3, params={"throw_ratio": 0.5})
    v = pol.budgets(list(NUM.values()), 6, B, gen(1))
    m = pol(scores(B), v, epoch=0, generator=gen(3))
    validate(m, v, K=6)
    frac = m.guided.double().mean().item()
    assert abs(frac - 0.3) < 4 * (0.3 * 0.7 / B) ** 0.5
    thrown_any = torch.stack([t.any(1) for t in m.thrown.values()], 1).any(1)
    assert not (thrown_any & ~m.guided).any()  # random samples throw nothing
    assert thrown_any[m.guided].float().mean() > 0.9
    again = pol(scores(B), v, epoch=0, generator=gen(3))
    assert torch.equal(again.guided, m.guided)


def test_prob_zero_is_random_and_skips_scoring():
    pol = MaskingPolicy("high", prob=0.0)
    assert not pol.needs_scores(5)


def test_per_head_strategy_and_random_fallback_share_shapes():
    pol = MaskingPolicy("heads", params={"k": 2}, prob=0.5)
    assert pol.per_head
    v = pol.budgets(list(NUM.values()), 6, 8, gen(1))
    validate(pol(scores(8, H=4), v, 0, gen(0)), v, K=6)


def test_build_masker_from_config_and_errors():
    cfg = {"strategy": "noisy", "params": {"alpha": 0.2}, "warmup_epochs": 1, "prob": 0.8,
           "alphas": [1.0, 2.0], "sample_tasks_uniformly": False,
           "adaptive": {"enabled": True, "momentum": 0.9, "strength": 1.0}}
    pol = build_masker(cfg, modalities=list(NUM))
    assert pol.params == {"alpha": 0.2} and pol.adaptive is not None
    with pytest.raises(ValueError, match="masking.strateg"):
        build_masker({"strateg": "high"})
    with pytest.raises(ValueError, match="'alpa'.*valid parameters: \\['alpha'\\]"):
        build_masker({"strategy": "noisy", "params": {"alpa": 0.1}})
    with pytest.raises(ValueError, match="masking.adaptive.momentun"):
        build_masker({"adaptive": {"momentun": 0.9}}, modalities=list(NUM))
    with pytest.raises(ValueError, match="did you mean 'high'"):
        build_masker({"strategy": "hihg"})
    off = build_masker({"adaptive": {"enabled": False, "momentum": 0.5}})
    assert off.adaptive is None


def test_adaptive_alpha_through_policy_and_resume():
    adaptive = {"momentum": 0.5, "relative_to_initial": False}  # constant losses: compare raw values
    pol = MaskingPolicy("random", alphas=1.0, adaptive=adaptive, modalities=list(NUM))
    for _ in range(10):
        pol.update_losses({"rgb": 2.0, "depth": 0.5})
    a = pol.current_alphas()
    assert a[0] < a[1]  # rgb is harder -> smaller alpha -> fewer visible rgb tokens
    v = pol.budgets([100, 100], 50, 2000, gen(0))
    assert v[:, 0].double().mean() < v[:, 1].double().mean()
    other = MaskingPolicy("random", alphas=1.0, adaptive=adaptive, modalities=list(NUM))
    other.load_state_dict(pol.state_dict())
    assert torch.equal(other.current_alphas(), a)
    with pytest.raises(ValueError, match="adaptive"):
        MaskingPolicy("random").load_state_dict(pol.state_dict())
