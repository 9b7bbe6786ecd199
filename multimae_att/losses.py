"""Masked reconstruction losses: one implementation, the differences are parameters.

Every loss follows the same three steps:

1. a per-pixel loss map ``[B, H', W']`` at the prediction's resolution:
   ``mse`` (mean over channels of the squared error; with ``norm_pix`` the target is first
   standardised per patch, MAE's "normalised pixels"), ``l1`` (mean absolute error over
   channels), ``ce`` (cross-entropy over class logits, 0 at ``ignore_index`` pixels);
2. a per-patch loss ``[B, N]`` = mean over the pixels of each token's patch. A patch spans
   ``H' / h`` x ``W' / w`` pixels for an ``h x w`` token grid, so semseg at 1/4 resolution
   (4 x 4-pixel patches) and rgb at full resolution (16 x 16) use the same code;
3. a masked mean: per sample ``sum_n m w l / sum_n m`` over the patches with ``m = hidden and
   not thrown`` (1 = hidden), with optional per-patch weights ``w`` (AttG), then the mean over
   the samples that have at least one such patch.

Steps 2-3 equal MultiMAE's per-pixel masked means (every patch has the same pixel count), but
fold in per-patch weights naturally. AttG (based on "attention-guided loss weighting"):
``w = exp(M_norm / tau)``, ``M_norm`` the per-image min-max normalised scores of the token's
modality, normalised by the number of hidden patches (not by ``sum w``), so emphasising
attended patches raises their share of the gradient without rescaling the others.

The map output modality -> masked input modality is by name, with ``norm_rgb`` -> ``rgb``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["LossSpec", "DEFAULT_SPECS", "pixel_loss_map", "patch_losses", "masked_mean",
           "attg_weights", "masked_loss", "multimodal_loss", "input_modality_of"]

LossKind = Literal["mse", "l1", "ce"]


@dataclass(frozen=True)
class LossSpec:
    """How one output modality is scored."""

    kind: LossKind
    norm_pix: bool = False
    ignore_index: int = -100


DEFAULT_SPECS: dict[str, LossSpec] = {
    "rgb": LossSpec("mse"),
    "norm_rgb": LossSpec("mse", norm_pix=True),
    "depth": LossSpec("l1"),
    "semseg": LossSpec("ce"),
}


def input_modality_of(output: str) -> str:
    """The input modality whose mask (and scores) an output modality uses."""
    return "rgb" if output == "norm_rgb" else output


def _patch_grid(pred: torch.Tensor, num_patches: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    H, W = pred.shape[-2:]
    if grid is None:
        # Square tokens: h * w = N with H / h == W / w.
        h = round((num_patches * H / W) ** 0.5)
        grid = (h, num_patches // max(h, 1))
    h, w = grid
    if h * w != num_patches or H % h or W % w:
        raise ValueError(f"prediction {tuple(pred.shape)} does not tile into a {h}x{w} token grid "
                         f"of {num_patches} patches")
    return h, w


def pixel_loss_map(pred: torch.Tensor, target: torch.Tensor, spec: LossSpec,
                   grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-pixel loss ``[B, H, W]`` in float32.

    ``pred``: ``[B, C, H, W]`` (logits for ``ce``); ``target``: ``[B, C, H, W]`` or, for ``ce``,
    int64 labels ``[B, H, W]``. ``grid``: the token grid (h, w), needed for ``norm_pix``.
    """
    pred = pred.float()
    if spec.kind == "ce":
        return F.cross_entropy(pred, target.long(), reduction="none", ignore_index=spec.ignore_index)
    target = target.float()
    if spec.norm_pix:
        if grid is None:
            raise ValueError("norm_pix needs the token grid (h, w)")
        target = _normalise_patches(target, grid)
    err = (pred - target).square() if spec.kind == "mse" else (pred - target).abs()
    return err.mean(dim=1)


def _normalise_patches(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Standardise ``x`` [B, C, H, W] per patch over (C, ph, pw), unbiased variance as MAE."""
    B, C, H, W = x.shape
    h, w = grid
    ph, pw = H // h, W // w
    p = x.reshape(B, C, h, ph, w, pw).permute(0, 2, 4, 1, 3, 5).reshape(B, h, w, -1)
    p = (p - p.mean(-1, keepdim=True)) / (p.var(-1, keepdim=True) + 1e-6).sqrt()
    return p.reshape(B, h, w, C, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def patch_losses(loss_map: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[B, H, W]`` pixel losses -> ``[B, h * w]`` mean per patch (row-major token order)."""
    B, H, W = loss_map.shape
    h, w = grid
    return F.avg_pool2d(loss_map.unsqueeze(1), (H // h, W // w)).reshape(B, h * w)


def masked_mean(per_patch: torch.Tensor, mask: torch.Tensor,
                weights: torch.Tensor | None = None,
                denominator: float | torch.Tensor | None = None) -> torch.Tensor:
    """Mean over samples of ``sum(m w l) / sum(m)``; samples with no masked patch are skipped.

    ``per_patch``, ``mask`` (1 = counted), ``weights``: ``[B, N]``. ``denominator``: divide the
    sum of the per-sample means by this instead of by the local count of valid samples (the
    runner passes the count over the whole global batch divided by the number of processes,
    so that averaging gradients over processes gives the global-batch mean exactly).
    Returns a scalar (0 with a graph when nothing is masked, so backward still works).
    """
    m = mask.to(per_patch.dtype)
    num = (per_patch * m if weights is None else per_patch * m * weights).sum(1)
    den = m.sum(1)
    valid = den > 0
    per_sample = torch.where(valid, num / den.clamp_min(1.0), torch.zeros_like(num))
    if denominator is not None:
        return per_sample.sum() / max(float(denominator), 1e-12)
    if not bool(valid.any()):
        return per_patch.sum() * 0.0
    return per_sample.sum() / valid.sum()


def attg_weights(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """AttG weights ``exp(M_norm / tau)`` ``[B, N]``, M_norm = per-row min-max normalised scores.

    A constant row (max == min) gets M_norm = 0, i.e. weight 1 everywhere.
    """
    s = scores.float()
    lo = s.amin(dim=-1, keepdim=True)
    rng = s.amax(dim=-1, keepdim=True) - lo
    m_norm = torch.where(rng > 0, (s - lo) / rng.clamp_min(1e-12), torch.zeros_like(s))
    return torch.exp(m_norm / tau)


def masked_loss(pred: torch.Tensor, target: torch.Tensor, hidden: torch.Tensor, spec: LossSpec,
                thrown: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                grid: tuple[int, int] | None = None,
                denominator: float | torch.Tensor | None = None) -> torch.Tensor:
    """Loss of one output modality on its hidden, non-thrown patches.

    ``hidden``/``thrown``: bool ``[B, N]`` (1 = hidden / thrown); ``weights``: ``[B, N]`` or None;
    ``denominator``: see :func:`masked_mean`.
    """
    grid = _patch_grid(pred, hidden.shape[1], grid)
    per_patch = patch_losses(pixel_loss_map(pred, target, spec, grid), grid)
    mask = hidden.bool() if thrown is None else hidden.bool() & ~thrown.bool()
    return masked_mean(per_patch, mask, weights, denominator)


def multimodal_loss(preds: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
                    hidden: Mapping[str, torch.Tensor],
                    thrown: Mapping[str, torch.Tensor] | None = None,
                    loss_weights: Mapping[str, float] | None = None,
                    specs: Mapping[str, LossSpec] | None = None,
                    attg_scores: Mapping[str, torch.Tensor] | None = None,
                    tau: float = 0.75,
                    denominators: Mapping[str, float | torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of per-output-modality masked losses.

    ``targets`` is keyed by *input* modality (``norm_rgb`` reads ``targets['rgb']``); masks, AttG
    scores and ``denominators`` (see :func:`masked_mean`) likewise. ``loss_weights`` defaults
    to 1 per output. Returns ``(total,
    {output: loss})`` with the unweighted per-modality losses (for logging and adaptive budgets).
    """
    specs = {**DEFAULT_SPECS, **(specs or {})}
    total = None
    parts: dict[str, torch.Tensor] = {}
    for out, pred in preds.items():
        src = input_modality_of(out)
        if out not in specs:
            raise KeyError(f"no loss defined for output modality '{out}' (known: {sorted(specs)})")
        w = attg_weights(attg_scores[src], tau) if attg_scores is not None else None
        parts[out] = masked_loss(pred, targets[src], hidden[src], specs[out],
                                 thrown=None if thrown is None else thrown.get(src), weights=w,
                                 denominator=None if denominators is None else denominators[src])
        term = parts[out] * (1.0 if loss_weights is None else loss_weights.get(out, 1.0))
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no predictions to score")
    return total, parts
