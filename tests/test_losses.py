"""Masked losses against hand-computed values and a per-pixel brute-force reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from multimae_att.losses import (LossSpec, attg_weights, masked_loss, masked_mean,
                                 multimodal_loss)


def _upsample_mask(mask, grid, size):
    # Per-patch mask [B, N] -> per-pixel [B, H, W] by nearest upsampling (MultiMAE's formulation).
    B = mask.shape[0]
    return F.interpolate(mask.float().reshape(B, 1, *grid), size=size, mode="nearest")[:, 0]


def test_mse_hand_values():
    # 1 sample, 2x2 image, 1x2 token grid (patches 2 rows x 1 col), left patch hidden.
    pred = torch.tensor([[[[1.0, 0.0], [3.0, 0.0]]]])
    target = torch.zeros_like(pred)
    hidden = torch.tensor([[True, False]])
    got = masked_loss(pred, target, hidden, LossSpec("mse"), grid=(1, 2))
    assert got.item() == pytest.approx((1 + 9) / 2)
    got = masked_loss(pred, target, hidden, LossSpec("l1"), grid=(1, 2))
    assert got.item() == pytest.approx((1 + 3) / 2)


def test_norm_pix_hand_values():
    # One 2x2 patch [0, 2, 4, 6]: mean 3, unbiased var 20/3; prediction 0 -> loss = mean(z^2) = 3/4.
    target = torch.tensor([[[[0.0, 2.0], [4.0, 6.0]]]])
    got = masked_loss(torch.zeros_like(target), target, torch.ones(1, 1, dtype=torch.bool),
                      LossSpec("mse", norm_pix=True), grid=(1, 1))
    var = 20 / 3 + 1e-6
    assert got.item() == pytest.approx(sum((v - 3) ** 2 for v in (0, 2, 4, 6)) / var / 4)


def test_ce_hand_values_and_ignore():
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 0, 0, 0] = math.log(3.0)         # p(class 0) = 3/4 at pixel (0, 0)
    labels = torch.tensor([[[0, 1], [-100, 1]]])
    hidden = torch.ones(1, 1, dtype=torch.bool)
    got = masked_loss(logits, labels, hidden, LossSpec("ce"), grid=(1, 1))
    # pixel losses: -log(3/4), log 2, 0 (ignored), log 2; mean over the 4 pixels as MultiMAE.
    assert got.item() == pytest.approx((-math.log(0.75) + 2 * math.log(2)) / 4)


def test_samples_without_hidden_patches_are_skipped_and_thrown_excluded():
    pred = torch.arange(8.0).reshape(2, 1, 2, 2)
    target = torch.zeros_like(pred)
    hidden = torch.tensor([[True, True, True, True], [False] * 4])
    thrown = torch.tensor([[False, True, False, False], [False] * 4])
    got = masked_loss(pred, target, hidden, LossSpec("l1"), thrown=thrown, grid=(2, 2))
    assert got.item() == pytest.approx((0 + 2 + 3) / 3)
    none = masked_loss(pred.requires_grad_(), target, torch.zeros(2, 4, dtype=torch.bool),
                       LossSpec("l1"), grid=(2, 2))
    assert none.item() == 0.0
    none.backward()  # still differentiable


@pytest.mark.parametrize("kind", ["mse", "l1", "ce"])
def test_matches_per_pixel_reference(kind):
    # 3 samples, 8x12 prediction, 2x3 grid of 4x4 patches; reference: MultiMAE-style pixel masks.
    g = torch.Generator().manual_seed(0)
    B, grid, size = 3, (2, 3), (8, 12)
    C = 5 if kind == "ce" else 3
    pred = torch.randn(B, C, *size, generator=g)
    target = (torch.randint(0, C, (B, *size), generator=g) if kind == "ce"
              else torch.randn(B, C, *size, generator=g))
    hidden = torch.rand(B, 6, generator=g) > 0.5
    hidden[0] = False   # a sample with nothing hidden is skipped, not averaged as 0
    got = masked_loss(pred, target, hidden, LossSpec(kind), grid=grid)
    pix = (F.cross_entropy(pred, target, reduction="none") if kind == "ce"
           else ((pred - target) ** 2 if kind == "mse" else (pred - target).abs()).mean(1))
    m = _upsample_mask(hidden, grid, size)
    per_sample = (pix * m).flatten(1).sum(1) / m.flatten(1).sum(1)
    assert got.item() == pytest.approx(per_sample.nanmean().item(), rel=1e-5)


def test_attg_weights_and_weighted_loss():
    scores = torch.tensor([[0.1, 0.3, 0.5], [2.0, 2.0, 2.0]])
    w = attg_weights(scores, tau=0.5)
    assert torch.allclose(w[0], torch.tensor([1.0, math.exp(1.0), math.exp(2.0)]))
    assert torch.equal(w[1], torch.ones(3))          # constant map -> uniform weights
    per_patch = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.tensor([[False, True, True]])
    got = masked_mean(per_patch, mask, w[:1])
    # normalised by the number of hidden patches (2), not by the sum of weights
    assert got.item() == pytest.approx((2 * math.exp(1.0) + 3 * math.exp(2.0)) / 2)


def test_multimodal_weights_norm_rgb_and_attg():
    g = torch.Generator().manual_seed(1)
    B, grid = 2, (2, 2)
    rgb = torch.randn(B, 3, 8, 8, generator=g)
    depth = torch.randn(B, 1, 8, 8, generator=g)
    sem = torch.randint(0, 4, (B, 2, 2), generator=g)
    preds = {"rgb": torch.randn(B, 3, 8, 8, generator=g), "norm_rgb": torch.randn(B, 3, 8, 8, generator=g),
             "depth": torch.randn(B, 1, 8, 8, generator=g), "semseg": torch.randn(B, 4, 2, 2, generator=g)}
    hidden = {m: torch.rand(B, 4, generator=g) > 0.3 for m in ("rgb", "depth", "semseg")}
    for h in hidden.values():
        h[:, 0] = True
    targets = {"rgb": rgb, "depth": depth, "semseg": sem}
    weights = {"rgb": 1.0, "norm_rgb": 0.5, "depth": 2.0, "semseg": 0.25}
    total, parts = multimodal_loss(preds, targets, hidden, loss_weights=weights)
    assert set(parts) == set(preds)
    assert parts["norm_rgb"].item() == pytest.approx(
        masked_loss(preds["norm_rgb"], rgb, hidden["rgb"], LossSpec("mse", True), grid=grid).item())
    assert parts["semseg"].item() == pytest.approx(
        masked_loss(preds["semseg"], sem, hidden["semseg"], LossSpec("ce"), grid=grid).item())
    assert total.item() == pytest.approx(sum(weights[k] * v.item() for k, v in parts.items()))
    scores = {m: torch.rand(B, 4, generator=g) for m in hidden}
    total_g, parts_g = multimodal_loss(preds, targets, hidden, loss_weights=weights,
                                       attg_scores=scores, tau=0.75)
    ref = masked_loss(preds["depth"], depth, hidden["depth"], LossSpec("l1"),
                      weights=attg_weights(scores["depth"], 0.75), grid=grid)
    assert parts_g["depth"].item() == pytest.approx(ref.item())
    assert all(parts_g[k] >= parts[k] for k in parts)   # weights >= 1


def test_denominator_gives_global_batch_mean_across_shards():
    # Two "processes" each holding half the batch: sum of their losses with denominator
    # count_global / world, averaged over the world, equals the full-batch loss.
    g = torch.Generator().manual_seed(3)
    per_patch = torch.rand(6, 4, generator=g)
    mask = torch.rand(6, 4, generator=g) > 0.5
    mask[1] = False
    mask[4] = False
    full = masked_mean(per_patch, mask)
    count = int(mask.any(1).sum())
    halves = [masked_mean(per_patch[r::2], mask[r::2], denominator=count / 2) for r in range(2)]
    assert ((halves[0] + halves[1]) / 2).item() == pytest.approx(full.item())
