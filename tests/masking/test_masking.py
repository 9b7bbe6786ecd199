"""Masking strategies: invariants over the whole registry, then per-strategy references."""
import pytest
import torch

from multimae_att.masking import STRATEGIES, make_masks, sample_budgets, validate

NUM = {"rgb": 12, "depth": 7, "semseg": 9}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# parameters under which a stochastic strategy really draws something at these tiny sizes
# (hint's default top share of 10 % is a single token here, which makes it deterministic)
SEED_PARAMS = {"hint": {"show_ratio": 0.3, "show_max": 0.5}, "heads": {"k": 2}}
# run position for curriculum strategies (hpm: 40 % of the hidden tokens from the top, 60 %
# random); every other strategy ignores it
PROGRESS = 0.8


def scores_for(name: str, B: int, seed: int = 0, num=NUM, H: int = 4) -> dict:
    g = gen(seed)
    per_head = STRATEGIES[name].per_head
    return {m: torch.rand((B, H, n) if per_head else (B, n), generator=g) for m, n in num.items()}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("K", [0, 5, 14, 28])
def test_exact_visible_counts(name, K):
    B = 16
    v = sample_budgets(list(NUM.values()), K, B, alphas=0.7, generator=gen(1))
    masks = make_masks(name, scores_for(name, B), v, generator=gen(2), progress=PROGRESS)
    validate(masks, v, K=K, num_tokens=NUM)
    for m, h in masks.hidden.items():
        assert h.dtype == torch.bool and h.shape == (B, NUM[m])


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_unknown_parameter_is_named(name):
    v = sample_budgets(list(NUM.values()), 5, 2, generator=gen(1))
    with pytest.raises(ValueError, match="bogus.*valid parameters"):
        make_masks(name, scores_for(name, 2), v, generator=gen(2), bogus=1, progress=PROGRESS)


def test_unknown_strategy_is_named():
    with pytest.raises(ValueError, match="did you mean 'random'"):
        make_masks("randm", {"rgb": torch.zeros(1, 3)}, torch.tensor([[1]]))


def budgets(K: int, B: int, seed: int = 1, num=NUM) -> torch.Tensor:
    return sample_budgets(list(num.values()), K, B, alphas=0.7, generator=gen(seed))


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_seeds_reproduce_and_differ(name):
    B, v = 16, budgets(10, 16)
    s = scores_for(name, B)
    p = SEED_PARAMS.get(name, {})
    a = make_masks(name, s, v, generator=gen(5), **p, progress=PROGRESS)
    b = make_masks(name, s, v, generator=gen(5), **p, progress=PROGRESS)
    c = make_masks(name, s, v, generator=gen(6), **p, progress=PROGRESS)
    cat = lambda x: torch.cat(list(x.hidden.values()), 1)  # noqa: E731
    assert torch.equal(cat(a), cat(b))
    if STRATEGIES[name].deterministic:
        assert torch.equal(cat(a), cat(c))
    else:
        assert not torch.equal(cat(a), cat(c))


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_zero_budget_modality_and_extremes(name):
    B = 6
    v = torch.tensor([[12, 0, 0], [0, 7, 0], [0, 0, 9], [3, 0, 4], [12, 7, 9], [0, 0, 0]])
    masks = make_masks(name, scores_for(name, B), v, generator=gen(0), progress=PROGRESS)
    validate(masks, v)
    vis = masks.visible()
    assert not vis["depth"][0].any() and vis["rgb"][0].all() and vis["rgb"][4].all()
    assert not any(x[5].any() for x in vis.values())


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_ties_are_exact_and_deterministic(name):
    B = 8
    per_head = STRATEGIES[name].per_head
    s = {m: torch.full((B, 4, n) if per_head else (B, n), 0.5) for m, n in NUM.items()}
    v = budgets(9, B)
    masks = make_masks(name, s, v, generator=gen(0), progress=PROGRESS)
    validate(masks, v, K=9)
    if STRATEGIES[name].deterministic:  # ties -> lower token index hidden first
        for i, (m, h) in enumerate(masks.hidden.items()):
            ref = torch.arange(NUM[m])[None, :] < (NUM[m] - v[:, i:i + 1])
            assert torch.equal(h, ref)


def test_scores_of_other_dtypes():
    B, v = 4, budgets(10, 4)
    s = {m: x.to(torch.bfloat16) for m, x in scores_for("high", B).items()}
    validate(make_masks("high", s, v), v, K=10)


def brute_force_hidden(s: torch.Tensor, v: torch.Tensor, descending: bool) -> torch.Tensor:
    """Per-sample Python sort: hide N - v tokens, best key first, ties -> lower index."""
    B, N = s.shape
    out = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        sign = -1 if descending else 1
        order = sorted(range(N), key=lambda i: (sign * float(s[b, i]), i))
        out[b, order[: N - int(v[b])]] = True
    return out


@pytest.mark.parametrize("name,descending", [("high", True), ("low", False)])
def test_high_low_match_brute_force(name, descending):
    B = 20
    g = gen(3)
    # coarse values so ties occur often
    s = {m: torch.randint(0, 4, (B, n), generator=g).float() for m, n in NUM.items()}
    v = budgets(11, B)
    masks = make_masks(name, s, v)
    for i, m in enumerate(NUM):
        assert torch.equal(masks.hidden[m], brute_force_hidden(s[m], v[:, i], descending))


def test_noisy_alpha0_equals_high():
    B = 20
    g = gen(3)
    s = {m: torch.randint(0, 5, (B, n), generator=g).float() for m, n in NUM.items()}
    v = budgets(11, B)
    a = make_masks("noisy", s, v, generator=gen(1), alpha=0.0)
    b = make_masks("high", s, v)
    assert all(torch.equal(a.hidden[m], b.hidden[m]) for m in NUM)


def test_noisy_alpha1_ignores_scores():
    B, N, v = 4000, 10, 4
    s = {"rgb": torch.arange(N, dtype=torch.float32).expand(B, N) ** 2}
    vis = torch.full((B, 1), v)
    freq = make_masks("noisy", s, vis, generator=gen(0), alpha=1.0).hidden["rgb"].double().mean(0)
    p = (N - v) / N
    tol = 4 * (p * (1 - p) / B) ** 0.5  # 4 binomial standard errors
    assert (freq - p).abs().max() < tol, freq
    # and alpha = 0.5 does follow the scores: most-attended token hidden far more often
    half = make_masks("noisy", s, vis, generator=gen(0), alpha=0.5).hidden["rgb"].double().mean(0)
    assert half[-1] > p + 10 * tol and half[0] < p - 10 * tol


def test_noisy_rejects_alpha_out_of_range():
    with pytest.raises(ValueError, match="alpha=1.5"):
        make_masks("noisy", {"rgb": torch.zeros(1, 3)}, torch.tensor([[1]]), alpha=1.5)


def test_heads_all_heads_equal_high_on_mean_and_one_head_is_a_head():
    B, H = 10, 4
    s = scores_for("heads", B, H=H)
    v = budgets(12, B)
    a = make_masks("heads", s, v, generator=gen(0), k=H)
    b = make_masks("high", {m: x.mean(1) for m, x in s.items()}, v)
    assert all(torch.equal(a.hidden[m], b.hidden[m]) for m in NUM)
    one = make_masks("heads", s, v, generator=gen(0), k=1)
    matches = [all(torch.equal(one.hidden[m], make_masks("high", {m2: x[:, h] for m2, x in
                                                                   s.items()}, v).hidden[m])
                   for m in NUM) for h in range(H)]
    assert sum(matches) == 1  # one head, shared by the batch and modalities
    # drawn per call: over seeds, more than one head gets chosen
    picks = {tuple(torch.cat(list(make_masks("heads", s, v, generator=gen(i), k=1).hidden
                                  .values()), 1).flatten().tolist()) for i in range(12)}
    assert len(picks) > 1
    per = make_masks("heads", s, v, generator=gen(0), k=2, per_sample=True)
    validate(per, v, K=12)
    with pytest.raises(ValueError, match="k=5"):
        make_masks("heads", s, v, k=5)


def test_heads_needs_per_head_scores():
    with pytest.raises(ValueError, match=r"\[B, H, N_m\]"):
        make_masks("heads", {"rgb": torch.zeros(2, 5)}, torch.tensor([[1], [1]]))


def test_hint_reveals_only_top_share():
    B, N = 64, 40
    g = gen(7)
    s = {"rgb": torch.rand(B, N, generator=g)}
    show_ratio, show_max = 0.25, 0.2
    top = int(show_max * N)
    # v <= N - top: the whole top share is hidden before the hints (otherwise some of it is
    # visible anyway and only the invariants below apply)
    v = torch.randint(0, N - top + 1, (B, 1), generator=g)
    masks = make_masks("hint", s, v, generator=gen(1), show_ratio=show_ratio, show_max=show_max)
    validate(masks, v)
    rank = torch.argsort(torch.argsort(-s["rgb"], 1), 1)  # 0 = highest score (no ties here)
    vis = masks.visible()["rgb"]
    n_hints = (vis & (rank < top)).sum(1)
    hide = N - v[:, 0]
    want = torch.minimum(torch.minimum(torch.floor(show_ratio * hide).long(), v[:, 0]),
                         torch.tensor(top))
    assert torch.equal(n_hints, want)
    # every other visible token is among the lowest-scored v - r
    low_ok = rank >= (N - (v[:, 0] - want))[:, None]
    assert not (vis & ~(rank < top) & ~low_ok).any()
    assert n_hints.sum() > 0
    # show_ratio = 0 is exactly high
    z = make_masks("hint", s, v, generator=gen(1), show_ratio=0.0)
    assert torch.equal(z.hidden["rgb"], make_masks("high", s, v).hidden["rgb"])
    big_v = torch.randint(0, N + 1, (B, 1), generator=g)
    validate(make_masks("hint", s, big_v, generator=gen(2), show_ratio=0.5, show_max=0.5), big_v)


def test_amt_split_matches_amt_paper():
    B, N = 8, 100
    s = {"rgb": torch.rand(B, N, generator=gen(0))}
    v = torch.full((B, 1), 15)  # K = 15 % -> AMT's 45 / 40 / 15
    m = make_masks("amt", s, v, generator=gen(0), throw_ratio=0.4)
    validate(m, v)
    assert (m.thrown["rgb"].sum(1) == 40).all() and (m.hidden["rgb"].sum(1) == 45).all()


def test_amt_order_by_weight():
    # log-weights 8 apart: two neighbours swap with probability 1 / (1 + e^8) = 3e-4, so the
    # weighted order is the weight order: lowest v visible, the next floor(t*N) thrown
    # (the middle of the order), the highest hidden
    B, N = 8, 20
    w = torch.exp(torch.arange(N, dtype=torch.float64) * 8.0 - 8.0 * (N - 1) / 2).float()
    s = {"rgb": w.expand(B, N)}
    v = torch.full((B, 1), 4)
    m = make_masks("amt", s, v, generator=gen(0), throw_ratio=0.4, eps=1e-38)
    idx = torch.arange(N)
    assert m.visible()["rgb"].equal((idx < 4).expand(B, N))
    assert m.thrown["rgb"].equal(((idx >= 4) & (idx < 12)).expand(B, N))
    assert m.hidden["rgb"].equal((idx >= 12).expand(B, N))


def test_amt_frequencies_rise_with_weight_and_zero_weights_work():
    B, N = 3000, 12
    w = torch.linspace(0.0, 1.0, N)  # includes a zero weight
    v = torch.full((B, 1), 3)
    m = make_masks("amt", {"rgb": w.expand(B, N)}, v, generator=gen(2), throw_ratio=0.25)
    validate(m, v)
    hid = m.hidden["rgb"].double().mean(0)
    vis = m.visible()["rgb"].double().mean(0)
    # grouped in thirds the trend is far above noise (binomial s.e. < 0.01 per group)
    g_hid, g_vis = hid.view(3, 4).mean(1), vis.view(3, 4).mean(1)
    assert g_hid[0] + 0.05 < g_hid[1] < g_hid[2] - 0.05
    assert g_vis[0] - 0.05 > g_vis[1] > g_vis[2] + 0.05
    z = make_masks("amt", {"rgb": torch.zeros(B, N)}, v, generator=gen(2))
    validate(z, v)
    # default throw_ratio 0.4: floor(4.8) = 4 thrown, 12 - 3 - 4 = 5 hidden, uniformly
    assert (z.hidden["rgb"].double().mean(0) - 5 / N).abs().max() < 0.05


def test_amt_throws_at_most_what_is_left():
    s = {"rgb": torch.rand(3, 10, generator=gen(0))}
    v = torch.tensor([[8], [10], [0]])
    m = make_masks("amt", s, v, generator=gen(1), throw_ratio=0.5)
    validate(m, v)
    assert m.thrown["rgb"].sum(1).tolist() == [2, 0, 5]
    assert m.hidden["rgb"].sum(1).tolist() == [0, 0, 5]


def test_validate_catches_violations():
    from multimae_att.masking import Masks
    h = {"rgb": torch.tensor([[True, False, False]])}
    with pytest.raises(ValueError, match="2 visible tokens, expected 1"):
        validate(Masks(h), torch.tensor([[1]]))
    with pytest.raises(ValueError, match="overlaps"):
        validate(Masks(h, {"rgb": torch.tensor([[True, False, False]])}))
    with pytest.raises(ValueError, match="bool"):
        validate(Masks({"rgb": torch.tensor([[1, 0, 0]])}))
    with pytest.raises(ValueError, match="K=3"):
        validate(Masks(h), K=3)


def test_bad_visible_is_an_error():
    with pytest.raises(ValueError, match=r"\[B, M\]"):
        make_masks("random", {"rgb": torch.zeros(2, 3)}, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="0, N_m"):
        make_masks("random", {"rgb": torch.zeros(1, 3)}, torch.tensor([[4]]))
    with pytest.raises(ValueError, match="non-finite"):
        make_masks("high", {"rgb": torch.tensor([[0.0, float("nan"), 1.0]])}, torch.tensor([[1]]))


def test_random_is_uniform_over_tokens():
    B, N, v = 4000, 10, 3
    s = {"rgb": torch.arange(N, dtype=torch.float32).expand(B, N)}
    freq = make_masks("random", s, torch.full((B, 1), v), generator=gen(0)).hidden["rgb"]
    p = (N - v) / N
    assert (freq.double().mean(0) - p).abs().max() < 4 * (p * (1 - p) / B) ** 0.5


def test_noisy_standardises_per_image_and_modality():
    # z-scores are invariant to a positive affine map of each image's scores, so with the same
    # generator the masks must not change when every (sample, modality) row is rescaled/shifted
    B = 12
    s = scores_for("noisy", B)
    g = gen(9)
    moved = {m: x * (0.1 + torch.rand(B, 1, generator=g) * 50) + torch.randn(B, 1, generator=g) * 7
             for m, x in s.items()}
    v = budgets(10, B)
    a = make_masks("noisy", s, v, generator=gen(4), alpha=0.4)
    b = make_masks("noisy", moved, v, generator=gen(4), alpha=0.4)
    assert all(torch.equal(a.hidden[m], b.hidden[m]) for m in NUM)
