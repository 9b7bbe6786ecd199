"""Score sources: AMT's per-head min-max against a hand computation, the predicted-loss source
(the full no-mask pass, softmax of the head), every registered guided strategy on predicted
losses through the planner (exact budgets, seeded), the cache path's training share."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from multimae_att.masking import STRATEGIES, MaskingPolicy, Masks, sample_budgets, validate
from multimae_att.masking.planner import MaskPlanner
from multimae_att.model import create_pretrain_model
from multimae_att.scoring.loss_prediction import LossPredictor
from multimae_att.scoring.sources import (
    AttentionScores,
    PredictedLossScores,
    build_score_source,
    head_minmax,
    loss_strengths,
)

MODS = ["rgb", "depth", "semseg"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = create_pretrain_model("tiny", image_size=64, semseg_num_classes=10).eval()
    g = gen(0)
    x = {"rgb": torch.randn(4, 3, 64, 64, generator=g), "depth": torch.randn(4, 1, 64, 64, generator=g),
         "semseg": torch.randint(0, 10, (4, 16, 16), generator=g)}
    return model, model.embed(x)


def test_head_minmax_by_hand():
    # one sample, 2 heads, tokens of two modalities (2 + 1): each head's row over all 3 tokens
    s = {"rgb": torch.tensor([[[0.1, 0.5], [0.2, 0.2]]]), "depth": torch.tensor([[[0.3], [0.6]]])}
    out = head_minmax(s)
    # head 0: min 0.1, max 0.5 -> (0, 1, 0.5); head 1: min 0.2, max 0.6 -> (0, 0, 1)
    assert torch.allclose(out["rgb"], torch.tensor([[[0.0, 1.0], [0.0, 0.0]]]))
    assert torch.allclose(out["depth"], torch.tensor([[[0.5], [1.0]]]))
    const = head_minmax({"rgb": torch.full((1, 1, 3), 0.4)})["rgb"]
    assert torch.equal(const, torch.zeros(1, 1, 3))          # a constant row becomes 0


def test_attention_source_head_minmax_matches_per_head_by_hand(tiny):
    model, tokens = tiny
    raw = model.attention_scores(tokens, per_head=True)      # {m: [B, H, N_m]}
    got = AttentionScores(norm="head_minmax")(model, tokens).scores
    B, H = raw["rgb"].shape[:2]
    for b in range(B):
        rows = []
        for h in range(H):                                   # AMT: min-max per head, then mean of heads
            row = [float(v) for m in MODS for v in raw[m][b, h]]
            lo, hi = min(row), max(row)
            rows.append([(v - lo) / (hi - lo) for v in row])
        want = [sum(r[i] for r in rows) / H for i in range(len(rows[0]))]
        flat = torch.cat([got[m][b] for m in MODS])
        assert torch.allclose(flat, torch.tensor(want), atol=1e-6)
    plain = AttentionScores()(model, tokens).scores
    assert all(torch.allclose(plain[m], raw[m].mean(1)) for m in MODS)
    assert not torch.allclose(torch.cat([got[m] for m in MODS], 1), torch.cat([plain[m] for m in MODS], 1))
    per_head = AttentionScores(norm="head_minmax")(model, tokens, per_head=True).scores
    assert per_head["rgb"].shape == raw["rgb"].shape and float(per_head["rgb"].amax()) <= 1.0


def test_predicted_loss_source_is_softmax_of_head_on_full_pass(tiny):
    model, tokens = tiny
    head = LossPredictor(MODS, model.dim_tokens)
    out = PredictedLossScores(head)(model, tokens)
    z = model._with_global(torch.cat(list(tokens.values()), 1))
    with torch.no_grad():
        z = model.encoder(z)                                  # the plain forward, every block
    start = 0
    for m in MODS:
        n = tokens[m].shape[1]
        assert torch.allclose(out.features[m], z[:, start:start + n], atol=1e-5)
        with torch.no_grad():
            want = head({m: z[:, start:start + n]})[m].softmax(-1)
        assert torch.allclose(out.scores[m], want, atol=1e-6)
        assert torch.allclose(out.scores[m].sum(-1), torch.ones(4))
        start += n
    with pytest.raises(ValueError, match="per-head"):
        PredictedLossScores(head)(model, tokens, per_head=True)
    with pytest.raises(ValueError, match="score_norm"):
        build_score_source("predicted_loss", norm="head_minmax", predictor=head)
    with pytest.raises(ValueError, match="score_source"):
        build_score_source("entropy")
    assert torch.allclose(loss_strengths({"a": torch.tensor([[0.0, 0.0]])})["a"], torch.tensor([[0.5, 0.5]]))


GUIDED = sorted(n for n, s in STRATEGIES.items() if s.needs_scores and not s.per_head)


@pytest.mark.parametrize("name", GUIDED)
def test_every_guided_strategy_on_predicted_losses(tiny, name):
    """Through the planner: exact visible budgets at several K, the same generator gives the same
    masks, and the loss predictor's features come with the plan."""
    model, tokens = tiny
    head = LossPredictor(MODS, model.dim_tokens)
    source = PredictedLossScores(head)
    n_total = sum(t.shape[1] for t in tokens.values())
    for K in (0, 7, 24, n_total):
        planner = MaskPlanner(MaskingPolicy(name), K, source=source, total_epochs=4.0)
        a = planner(model, tokens, {}, 2.0, gen(K))
        b = planner(model, tokens, {}, 2.0, gen(K))
        validate(Masks(a.hidden, a.thrown), a.visible, K=K, num_tokens={m: t.shape[1] for m, t in tokens.items()})
        assert all(torch.equal(a.hidden[m], b.hidden[m]) for m in MODS)
        assert set(a.features) == set(MODS) and torch.equal(a.feature_rows, torch.arange(4))
        assert all(torch.allclose(a.scores[m].sum(-1), torch.ones(4)) for m in MODS)


def test_per_head_strategies_refuse_predicted_losses(tiny):
    model, tokens = tiny
    per_head = [n for n, s in STRATEGIES.items() if s.per_head]
    assert per_head
    from multimae_att.config import ConfigError
    from multimae_att.pretrain.config import load_pretrain_config
    for name in per_head:
        planner = MaskPlanner(MaskingPolicy(name, {"k": 2}), 8,
                              source=PredictedLossScores(LossPredictor(MODS, model.dim_tokens)))
        with pytest.raises(ValueError, match="per-head"):
            planner(model, tokens, {}, 0.0, gen(0))
        with pytest.raises(ConfigError, match="predicted_loss"):
            load_pretrain_config(None, [f"masking.strategy={name}", "masking.score_source=predicted_loss"])
    with pytest.raises(ConfigError, match="score_norm"):
        load_pretrain_config(None, ["masking.score_source=predicted_loss", "masking.score_norm=head_minmax"])
    with pytest.raises(ConfigError, match="out_modalities"):
        load_pretrain_config(None, ["masking.score_source=predicted_loss", "model.out_modalities=[rgb]"])


def test_curriculum_needs_the_run_length():
    with pytest.raises(ValueError, match="total_epochs"):
        MaskPlanner(MaskingPolicy("hpm"), 8)
    planner = MaskPlanner(MaskingPolicy("hpm"), 8, total_epochs=8.0)
    assert planner.progress(2.0) == 0.25 and planner.progress(20.0) == 1.0


class _FakeCache:
    """Every lookup hits with constant scores (the cache's contract, without files)."""

    def lookup(self, batch, grids, epoch, device=None):
        B = len(batch["sample_id"])
        return {m: torch.ones(B, hw[0] * hw[1]) for m, hw in grids.items()}, torch.ones(B, dtype=torch.bool)

    def fill(self, batch, scores, valid, score_fn, epoch, grids):
        return scores


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_cached_scores_train_the_head_on_a_drawn_share(tiny, share):
    """With the cache, a share of the samples (drawn over the global batch, after the masks)
    gets a no-mask pass for the head; the masks are those of the same step without it; the pair
    count over the global batch splits over processes."""
    model, tokens = tiny
    head = LossPredictor(MODS, model.dim_tokens)
    batch = {"sample_id": [f"s{i}" for i in range(4)]}

    def plan(rank, world, share):
        rows = slice(rank, None, world)
        sub = type(tokens)({m: t[rows] for m, t in tokens.items()}, tokens.image_size)
        planner = MaskPlanner(MaskingPolicy("high"), 12, rank=rank, world_size=world, cache=_FakeCache(),
                              source=PredictedLossScores(head), cached_train_share=share)
        return planner(model, sub, {"sample_id": batch["sample_id"][rows]}, 0.0, gen(3))

    full = plan(0, 1, share)
    want = {0.0: 0, 1.0: 4}.get(share)
    if want is not None:
        assert full.feature_rows.numel() == want
    assert all(f.shape[0] == full.feature_rows.numel() for f in full.features.values())
    ref = plan(0, 1, 0.0)
    assert all(torch.equal(full.hidden[m], ref.hidden[m]) for m in MODS)   # masks drawn first
    parts = [plan(r, 2, share) for r in range(2)]
    assert sorted(int(i) * 2 + r for r, p in enumerate(parts) for i in p.feature_rows) == full.feature_rows.tolist()
    assert all(float(p.lossp_pairs) == pytest.approx(float(full.lossp_pairs) / 2) for p in parts)
    if full.feature_rows.numel():
        direct = model.encoder_features({m: t[full.feature_rows] for m, t in tokens.items()})
        assert all(torch.allclose(full.features[m], direct[m], atol=1e-5) for m in MODS)


def test_cached_training_rows_are_per_sample_and_process_count_invariant():
    """The samples that train the head: the same global rows for 1, 2 and 4 processes (local row
    i of rank r is global row i * W + r), a new choice per step seed, and the configured share."""
    def planner(share, rank=0, world=1):
        return MaskPlanner(MaskingPolicy("high"), 12, rank=rank, world_size=world, cached_train_share=share)

    choices = []
    for seed in range(10):
        picked, local = planner(0.3).training_rows(gen(seed), 8)
        assert local.tolist() == np.flatnonzero(picked).tolist()
        choices.append(picked.tolist())
        for world in (2, 4):
            rows = []
            for rank in range(world):
                part, loc = planner(0.3, rank, world).training_rows(gen(seed), 8 // world)
                assert np.array_equal(part, picked)
                rows += [int(i) * world + rank for i in loc]
            assert sorted(rows) == local.tolist()
    assert len({tuple(c) for c in choices}) > 5
    share, n = 0.0625, 400 * 64                     # 400 steps of 64 samples: sd of the count ~39
    count = sum(int(planner(share).training_rows(gen(step), 64)[0].sum()) for step in range(400))
    assert abs(count - share * n) < 5 * (n * share * (1 - share)) ** 0.5
    assert planner(0.0).training_rows(gen(0), 64)[0].sum() == 0
    assert planner(1.0).training_rows(gen(0), 64)[0].all()


def test_budgets_of_the_planner_match_sample_budgets(tiny):
    """The planner's visible counts are the policy's Dirichlet budgets for the same generator."""
    model, tokens = tiny
    planner = MaskPlanner(MaskingPolicy("hpm"), 10, source=PredictedLossScores(LossPredictor(MODS, 96)),
                          total_epochs=1.0)
    plan = planner(model, tokens, {}, 0.5, gen(9))
    want = sample_budgets([16, 16, 16], 10, 4, generator=gen(9))
    assert torch.equal(plan.visible, want)
