"""Strategy ``hpm`` (HPM's easy-to-hard curriculum): share schedule, exact counts at every K,
the top part against a per-sample brute force, the random part uniform, the two ends."""
import pytest
import torch

from multimae_att.masking import MaskingPolicy, make_masks, sample_budgets, validate
from multimae_att.masking.hpm import hpm_share

NUM = {"rgb": 12, "depth": 7, "semseg": 9}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_share_grows_linearly_and_clamps():
    assert hpm_share(0.0) == 0.0 and hpm_share(1.0) == 0.5 and hpm_share(0.5) == 0.25
    assert hpm_share(0.3, 0.2, 0.6) == pytest.approx(0.2 + 0.4 * 0.3)
    assert hpm_share(-1.0) == 0.0 and hpm_share(7.0) == 0.5


@pytest.mark.parametrize("progress", [0.0, 0.37, 1.0])
def test_exact_counts_at_every_k(progress):
    B = 12
    g = gen(4)
    scores = {m: torch.rand(B, n, generator=g) for m, n in NUM.items()}
    for K in range(sum(NUM.values()) + 1):
        v = sample_budgets(list(NUM.values()), K, B, alphas=0.6, generator=gen(K))
        masks = make_masks("hpm", scores, v, generator=gen(100 + K), progress=progress)
        validate(masks, v, K=K, num_tokens=NUM)
        assert masks.thrown is None


def brute_force_top(s: torch.Tensor, count: int) -> set[int]:
    """The ``count`` highest-scored tokens of one row; ties -> lower index first."""
    order = sorted(range(len(s)), key=lambda i: (-float(s[i]), i))
    return set(order[:count])


@pytest.mark.parametrize("progress,start,end", [(0.6, 0.0, 0.5), (0.25, 0.2, 1.0), (1.0, 0.0, 0.9)])
def test_top_share_is_hidden_rest_is_outside_top(progress, start, end):
    """Per sample and modality: the floor(s * hidden) top-scored tokens are hidden and the other
    hidden tokens are any of the rest (checked token by token against a Python reference)."""
    B = 16
    g = gen(7)
    # coarse scores: ties are frequent and must break towards the lower index
    scores = {m: torch.randint(0, 4, (B, n), generator=g).float() for m, n in NUM.items()}
    v = sample_budgets(list(NUM.values()), 10, B, alphas=0.8, generator=gen(1))
    masks = make_masks("hpm", scores, v, generator=gen(2), progress=progress,
                       share_start=start, share_end=end)
    share = start + (end - start) * progress
    for i, (m, n) in enumerate(NUM.items()):
        for b in range(B):
            hide = n - int(v[b, i])
            top = brute_force_top(scores[m][b], int(share * hide + 1e-9))
            hidden = set(torch.nonzero(masks.hidden[m][b]).flatten().tolist())
            assert top <= hidden and len(hidden) == hide


def test_random_part_is_uniform_over_the_rest():
    """With share 0.5 of 6 hidden tokens out of 12, the 3 top ones are always hidden and each of
    the 9 others is hidden with probability 3 / 9."""
    B, n = 6000, 12
    s = torch.arange(n, dtype=torch.float32).flip(0).expand(B, n).contiguous()  # token 0 best
    v = torch.full((B, 1), 6)
    masks = make_masks("hpm", {"rgb": s}, v, generator=gen(0), progress=1.0)
    freq = masks.hidden["rgb"].float().mean(0)
    assert torch.equal(freq[:3], torch.ones(3))
    assert (freq[3:] - 1 / 3).abs().max() < 0.03, freq


def test_ends_equal_random_and_high():
    B = 10
    g = gen(3)
    scores = {m: torch.rand(B, n, generator=g) for m, n in NUM.items()}
    v = sample_budgets(list(NUM.values()), 9, B, generator=gen(4))
    # share 1: exactly 'high'
    a = make_masks("hpm", scores, v, generator=gen(5), progress=1.0, share_end=1.0)
    b = make_masks("high", scores, v)
    assert all(torch.equal(a.hidden[m], b.hidden[m]) for m in NUM)
    # share 0: the scores do not matter (same draw, other scores, same masks)
    other = {m: torch.rand(B, n, generator=g) for m, n in NUM.items()}
    c = make_masks("hpm", scores, v, generator=gen(6), progress=0.0)
    d = make_masks("hpm", other, v, generator=gen(6), progress=0.0)
    assert all(torch.equal(c.hidden[m], d.hidden[m]) for m in NUM)


def test_progress_is_required_and_params_checked():
    v = torch.tensor([[3, 2, 2]])
    s = {m: torch.rand(1, n) for m, n in NUM.items()}
    with pytest.raises(ValueError, match="progress"):
        make_masks("hpm", s, v, generator=gen(0))
    with pytest.raises(ValueError, match="share_end=1.5"):
        make_masks("hpm", s, v, generator=gen(0), progress=0.5, share_end=1.5)
    policy = MaskingPolicy("hpm", {"share_end": 0.8})
    assert policy.uses_progress and not MaskingPolicy("high").uses_progress
    masks = policy(s, v, epoch=1.0, generator=gen(1), progress=0.5)
    validate(masks, v)
