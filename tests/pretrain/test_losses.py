"""Masked losses against hand-computed values and per-pixel brute-force references.

``_ref_masked_loss`` is the former implementation (loss map for every pixel, pooled per patch,
then masked): the gathered implementation must equal it, values and gradients.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import multimae_att.pretrain.losses as losses_mod
from multimae_att.pretrain.losses import (
    LossSpec,
    attg_weights,
    counted_patch_losses,
    masked_loss,
    masked_mean,
    multimodal_loss,
)

torch.set_num_threads(1)


def _ref_pixel_loss_map(pred, target, spec, grid):
    # Every pixel: [B, H, W] float32 (the former pixel_loss_map).
    pred = pred.float()
    if spec.kind == "ce":
        return F.cross_entropy(pred, target.long(), reduction="none", ignore_index=spec.ignore_index)
    target = target.float()
    if spec.norm_pix:
        B, C, H, W = target.shape
        h, w = grid
        p = target.reshape(B, C, h, H // h, w, W // w).permute(0, 2, 4, 1, 3, 5).reshape(B, h, w, -1)
        p = (p - p.mean(-1, keepdim=True)) / (p.var(-1, keepdim=True) + 1e-6).sqrt()
        target = p.reshape(B, h, w, C, H // h, W // w).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
    err = (pred - target).square() if spec.kind == "mse" else (pred - target).abs()
    return err.mean(dim=1)


def _ref_masked_loss(pred, target, hidden, spec, thrown=None, weights=None, grid=None,
                     denominator=None):
    # The former masked_loss: per-pixel map -> avg-pool per patch -> masked mean.
    B, N = hidden.shape
    H, W = pred.shape[-2:]
    per_patch = F.avg_pool2d(_ref_pixel_loss_map(pred, target, spec, grid).unsqueeze(1),
                             (H // grid[0], W // grid[1])).reshape(B, N)
    mask = hidden if thrown is None else hidden & ~thrown
    return masked_mean(per_patch, mask, weights, denominator)


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
    # loss.attg.normalize: weights rescaled to mean 1 over the counted patches = a weighted mean
    got = masked_mean(per_patch, mask, w[:1], normalize_weights=True)
    want = (2 * math.exp(1.0) + 3 * math.exp(2.0)) / (math.exp(1.0) + math.exp(2.0))
    assert got.item() == pytest.approx(want)
    # uniform weights of any size give the unweighted loss
    flat = masked_mean(per_patch, mask, torch.full((1, 3), 7.0), normalize_weights=True)
    assert flat.item() == pytest.approx(masked_mean(per_patch, mask).item())


def test_multimodal_patch_losses_and_attg_normalize():
    """``patch_losses`` receives each output's per-patch losses (0 where not counted, detached);
    ``attg_normalize`` turns every output's AttG mean into a weighted mean, per sample."""
    g = torch.Generator().manual_seed(3)
    B, grid = 3, (2, 2)
    preds = {"rgb": torch.randn(B, 3, 8, 8, generator=g, requires_grad=True),
             "depth": torch.randn(B, 1, 8, 8, generator=g, requires_grad=True)}
    targets = {"rgb": torch.randn(B, 3, 8, 8, generator=g), "depth": torch.randn(B, 1, 8, 8, generator=g)}
    hidden = {m: torch.rand(B, 4, generator=g) > 0.4 for m in targets}
    for h in hidden.values():
        h[:, 0] = True
    scores = {m: torch.rand(B, 4, generator=g) for m in targets}
    patches: dict = {}
    _total, parts = multimodal_loss(preds, targets, hidden, attg_scores=scores, tau=0.75,
                                   attg_normalize=True, patch_losses=patches)
    assert set(patches) == {"rgb", "depth"}
    for out, spec in (("rgb", LossSpec("mse")), ("depth", LossSpec("l1"))):
        ref = counted_patch_losses(preds[out], targets[out], hidden[out], spec, grid)
        assert torch.allclose(patches[out], ref) and not patches[out].requires_grad
        assert bool((patches[out][~hidden[out]] == 0).all())
        w = attg_weights(scores[out], 0.75)
        m = hidden[out].float()
        want = ((ref * m * w).sum(1) / (m * w).sum(1)).mean()
        assert parts[out].item() == pytest.approx(want.item(), rel=1e-5)


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
    _total_g, parts_g = multimodal_loss(preds, targets, hidden, loss_weights=weights,
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


def _case(kind, B, grid, patch, C, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    size = (grid[0] * patch[0], grid[1] * patch[1])
    pred = torch.randn(B, C, *size, generator=g).to(dtype)
    if kind == "ce":
        target = torch.randint(0, C, (B, *size), generator=g)
        target[torch.rand(B, *size, generator=g) < 0.2] = -100     # ignored pixels
    else:
        target = torch.randn(B, C, *size, generator=g)
    N = grid[0] * grid[1]
    r = torch.rand(B, N, generator=g)
    hidden, thrown = r < 0.8, r < 0.35
    hidden[0] = False                       # nothing counted: skipped
    hidden[1], thrown[1] = True, False      # everything counted
    thrown[2] = hidden[2]                   # hidden but all thrown: skipped
    return pred, target, hidden, thrown, torch.rand(B, N, generator=g)


@pytest.mark.parametrize("share", [1.0, -1.0])     # 1.0: always gather; -1.0: always dense
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,norm_pix", [("mse", False), ("mse", True), ("l1", False), ("ce", False)])
def test_gathered_equals_every_pixel_reference_values_and_grads(kind, norm_pix, dtype, share,
                                                                 monkeypatch):
    # Non-square grid and non-square patches, per-sample counts differing, thrown patches,
    # AttG weights, a global denominator and ignore labels: loss and gradient as before.
    monkeypatch.setattr(losses_mod, "GATHER_UP_TO", dict.fromkeys(("ce", "norm_pix", "mse", "l1"), share))
    B, grid, patch = 6, (3, 4), (2, 3)
    C = 7 if kind == "ce" else 3
    pred, target, hidden, thrown, scores = _case(kind, B, grid, patch, C, dtype, seed=11)
    spec = LossSpec(kind, norm_pix=norm_pix)
    w = attg_weights(scores, 0.5)
    for weights, den in ((None, None), (w, None), (w, 2.5)):
        outs = []
        for fn in (masked_loss, _ref_masked_loss):
            p = pred.clone().requires_grad_()
            loss = fn(p, target, hidden, spec, thrown=thrown, weights=weights, grid=grid,
                      denominator=den)
            loss.backward()
            outs.append((loss.detach(), p.grad.float()))
        (got, g_got), (ref, g_ref) = outs
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-7), (got, ref)
        # bf16 gradients: same float32 value rounded to bf16, up to one ulp of rounding.
        tol = dict(rtol=1e-5, atol=1e-8) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-6)
        assert torch.allclose(g_got, g_ref, **tol)
        uncounted = ~(hidden & ~thrown)
        pix = F.interpolate(uncounted.float().reshape(B, 1, *grid), size=pred.shape[-2:])[:, 0]
        assert g_got.abs().mul(pix[:, None] if g_got.dim() == 4 else pix).sum() == 0


@pytest.mark.parametrize("share", [1.0, -1.0])
def test_counted_patch_losses_zero_elsewhere_and_equal_pooled_map(share):
    B, grid, patch = 5, (2, 5), (4, 2)
    pred, target, hidden, thrown, _ = _case("ce", B, grid, patch, 9, torch.float32, seed=4)
    mask = hidden & ~thrown
    got = counted_patch_losses(pred, target, mask, LossSpec("ce"), grid, share)
    full = F.avg_pool2d(_ref_pixel_loss_map(pred, target, LossSpec("ce"), grid).unsqueeze(1),
                        patch).reshape(B, -1)
    assert got.shape == (B, 10) and got.dtype == torch.float32
    assert torch.equal(got[~mask], torch.zeros(int((~mask).sum())))
    assert torch.allclose(got[mask], full[mask], rtol=1e-6)
    none = counted_patch_losses(pred, target, torch.zeros_like(mask), LossSpec("ce"), grid, share)
    assert torch.equal(none, torch.zeros(B, 10))


@pytest.mark.parametrize("share", [1.0, -1.0])
def test_multimodal_loss_matches_reference_with_thrown_attg_and_denominators(share, monkeypatch):
    monkeypatch.setattr(losses_mod, "GATHER_UP_TO", dict.fromkeys(("ce", "norm_pix", "mse", "l1"), share))
    g = torch.Generator().manual_seed(5)
    B, grid = 4, (2, 3)
    preds = {"rgb": torch.randn(B, 3, 8, 12, generator=g), "norm_rgb": torch.randn(B, 3, 8, 12, generator=g),
             "depth": torch.randn(B, 1, 8, 12, generator=g), "semseg": torch.randn(B, 6, 4, 6, generator=g)}
    targets = {"rgb": torch.randn(B, 3, 8, 12, generator=g), "depth": torch.randn(B, 1, 8, 12, generator=g),
               "semseg": torch.randint(0, 6, (B, 4, 6), generator=g)}
    r = {m: torch.rand(B, 6, generator=g) for m in targets}
    hidden = {m: v < 0.85 for m, v in r.items()}
    thrown = {m: v < 0.4 for m, v in r.items()}
    scores = {m: torch.rand(B, 6, generator=g) for m in targets}
    dens = {"rgb": 3.0, "depth": 1.5, "semseg": 2.0}
    lw = {"rgb": 1.0, "norm_rgb": 0.5, "depth": 2.0, "semseg": 0.25}
    leaves = {k: v.clone().requires_grad_() for k, v in preds.items()}
    total, parts = multimodal_loss(leaves, targets, hidden, thrown, lw, attg_scores=scores,
                                   tau=0.75, denominators=dens)
    total.backward()
    specs = {"rgb": LossSpec("mse"), "norm_rgb": LossSpec("mse", True), "depth": LossSpec("l1"),
             "semseg": LossSpec("ce")}
    for out, pred in preds.items():
        src = "rgb" if out == "norm_rgb" else out
        p = pred.clone().requires_grad_()
        ref = _ref_masked_loss(p, targets[src], hidden[src], specs[out], thrown[src],
                               attg_weights(scores[src], 0.75), grid, dens[src])
        (ref * lw[out]).backward()
        assert parts[out].item() == pytest.approx(ref.item(), rel=1e-5)
        assert torch.allclose(leaves[out].grad, p.grad, rtol=1e-5, atol=1e-8)


def test_dense_switch_follows_the_fullest_sample_and_the_flavour(monkeypatch):
    # The path is chosen by the largest per-sample count: one full sample -> dense.
    calls = []
    dense = losses_mod._dense_patch_losses
    monkeypatch.setattr(losses_mod, "_dense_patch_losses", lambda *a: calls.append(1) or dense(*a))
    pred, target = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    mask = torch.tensor([[True, False, False, False], [True, True, False, False]])
    counted_patch_losses(pred, target, mask, LossSpec("l1"), (2, 2), gather_up_to=0.5)
    assert calls == []
    mask[1, 2] = True
    counted_patch_losses(pred, target, mask, LossSpec("l1"), (2, 2), gather_up_to=0.5)
    assert calls == [1]
    # Defaults: plain mse/l1 always dense, ce/norm_pix gathered at a low share.
    mask[1, 2] = False
    counted_patch_losses(pred, target, mask, LossSpec("l1"), (2, 2))
    counted_patch_losses(pred, target, mask, LossSpec("mse", norm_pix=True), (2, 2))
    assert calls == [1, 1]


def test_target_resolution_mismatch_is_named():
    with pytest.raises(ValueError, match="differ in resolution"):
        masked_loss(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 4, 4), torch.ones(1, 4, dtype=torch.bool),
                    LossSpec("mse"), grid=(2, 2))
