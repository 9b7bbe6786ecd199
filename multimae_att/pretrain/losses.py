"""Masked reconstruction losses: one definition, the differences are parameters.

Every loss is, per token patch (``H' / h`` x ``W' / w`` pixels of an ``h x w`` token grid, so
semseg at 1/4 resolution (4 x 4-pixel patches) and rgb at full resolution (16 x 16) use the same
code), then masked:

1. a per-patch loss = mean over the patch's pixels of ``mse`` (squared error, mean over
   channels; with ``norm_pix`` the target is first standardised per patch, MAE's "normalised
   pixels"), ``l1`` (absolute error) or ``ce`` (cross-entropy over class logits, 0 at
   ``ignore_index`` pixels);
2. a masked mean: per sample ``sum_n m w l / sum_n m`` over the patches with ``m = hidden and
   not thrown`` (1 = hidden), with optional per-patch weights ``w`` (AttG), then the mean over
   the samples that have at least one such patch.

Step 1 is computed only on the counted patches (gathered, padded to the fullest sample) where
that is cheaper than scoring every pixel (:data:`GATHER_UP_TO`): for ce over many classes and
norm_pix when few patches count; both paths give the same values and gradients. A decoder that
drops thrown queries (AMT) hands over its decoded rows (:class:`PackedPrediction`): step 1 then
runs on those rows against the gathered target patches (:func:`packed_patch_losses`), with the
same values and gradients as on the zero-filled image.

Steps 1-2 equal MultiMAE's per-pixel masked means (every patch has the same pixel count), but
fold in per-patch weights naturally. AttG (Sick et al., "Attention-Guided Masked Autoencoders"):
``w = exp(M_norm / tau)``, ``M_norm`` the per-image min-max normalised scores of the token's
modality. As in the paper (``L = L_rec * M_scaled``) the weighted sum is divided by the number
of counted patches (not by ``sum w``), so the loss scale grows with the weights; with
``normalize_weights`` (``loss.attg.normalize``) it is divided by ``sum w`` instead, i.e. the
weights are divided by their mean over each sample's counted patches and the loss keeps the scale
of the unweighted loss.

Which loss each output gets and which input modality's mask it reads (``norm_rgb`` -> ``rgb``)
come from the modality table (multimae_att/modalities.py).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from multimae_att.device_checks import check
from multimae_att.modalities import OUTPUTS, LossSpec, target_of
from multimae_att.model.packed import PackedPrediction

__all__ = ["LossSpec", "DEFAULT_SPECS", "GATHER_UP_TO", "counted_patch_losses", "packed_patch_losses", "masked_mean",
           "attg_weights", "masked_loss", "multimodal_loss", "input_modality_of"]

#: output -> how it is scored: the modality table's loss spec of each output (a run may override
#: entries, ``multimodal_loss(specs=...)``)
DEFAULT_SPECS: dict[str, LossSpec] = {name: output.loss for name, output in OUTPUTS.items()}


def input_modality_of(output: str) -> str:
    """The input modality whose mask (and scores) an output uses (the table's ``target``)."""
    return target_of(output)


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


def _counted_index(mask: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counted patches of ``mask`` ``[B, N]`` (1 = counted), left-packed per sample.

    Returns ``(patch, valid)``, both ``[B, P]`` with ``P`` = the largest count in the batch:
    ``patch[b, k]`` = the k-th counted patch of sample b (row-major; padding slots point at
    patch 0), ``valid`` = the slot holds a real patch. Counts differ per sample and per
    modality; padding to the batch maximum keeps every later op a regular batched ``gather``
    along one axis (vectorised on CPU and GPU; one host sync for ``P``, as ``nonzero`` would
    need too). A flat boolean index over ``[B * N]`` into the strided 6-D patch view, tried
    first, was 2-3x slower than scoring every pixel on CPU (advanced indexing over two
    non-adjacent axes, and its ``index_put`` backward); the padding costs at most the spread
    of the per-sample counts.
    """
    # Stable sort of "not counted" puts the counted patches first, in token order.
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :P]
    valid = torch.arange(P, device=mask.device) < mask.sum(1, keepdim=True)
    return torch.where(valid, order, torch.zeros_like(order)), valid


def _gather_patches(x: torch.Tensor, grid: tuple[int, int], patch: torch.Tensor) -> torch.Tensor:
    """Pixels of patches ``patch`` ``[B, P]`` of ``x`` ``[B, C, H, W]`` -> ``[B, C, P, ph * pw]``
    (labels ``[B, H, W]`` -> ``[B, P, ph * pw]``), pixels of a patch in row-major order.

    A gather along the flattened pixel axis reads each channel plane of a sample once (no full
    patchified copy, no full-size float conversion); its backward is a scatter-add.
    """
    H, W = x.shape[-2:]
    h, w = grid
    ph, pw = H // h, W // w
    B, P = patch.shape
    base = (patch // w) * (ph * W) + (patch % w) * pw                               # [B, P]
    off = (torch.arange(ph, device=x.device)[:, None] * W
           + torch.arange(pw, device=x.device)).flatten()                          # [ph * pw]
    pix = (base[:, :, None] + off).reshape(B, P * ph * pw)
    if x.dim() == 3:
        return x.reshape(B, H * W).gather(1, pix).reshape(B, P, ph * pw)
    C = x.shape[1]
    return x.reshape(B, C, H * W).gather(2, pix[:, None].expand(B, C, -1)).reshape(B, C, P, ph * pw)


def _scatter_to_patches(vals: torch.Tensor, index: torch.Tensor, valid: torch.Tensor | None,
                        N: int) -> torch.Tensor:
    """Per-slot values ``[B, P]`` at token positions ``index [B, P]`` -> ``[B, N]`` (0 elsewhere).
    Padding slots (``valid`` False) go to a spare column N, so none collides with a real patch,
    and are dropped."""
    dest = index if valid is None else torch.where(valid, index, torch.full_like(index, N))
    return vals.new_zeros(vals.shape[0], N + 1).scatter(1, dest, vals)[:, :N]


def _patch_loss(pred: torch.Tensor, target: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """Loss per gathered patch ``[B, P]`` float32 = mean over the patch's pixels and channels.

    ``pred``: ``[B, C, P, p]`` (logits for ``ce``, ``p`` pixels per patch); ``target``: the same
    or int labels ``[B, P, p]``. ``ce`` pixels at ``ignore_index`` count as 0 in the mean
    (MultiMAE's per-pixel mean over the patch). ``norm_pix`` standardises each target patch over
    (C, p) with the unbiased variance, as MAE.
    """
    pred = pred.float()
    if spec.kind == "ce":
        pix = F.cross_entropy(pred, target.long(), reduction="none", ignore_index=spec.ignore_index)
        return pix.mean(2)
    t = target.float()
    if spec.norm_pix:
        mean = t.mean((1, 3), keepdim=True)
        var = (t - mean).square().sum((1, 3), keepdim=True) / max(t.shape[1] * t.shape[3] - 1, 1)
        t = (t - mean) / (var + 1e-6).sqrt()
    diff = pred - t
    return (diff.square() if spec.kind == "mse" else diff.abs()).mean((1, 3))


#: Per loss flavour (``ce``, ``norm_pix``, ``mse``, ``l1``): the largest share of counted patches
#: (in the fullest sample) up to which the loss is computed on the gathered counted patches;
#: above it every pixel is scored (same values). Measured at ViT-B sizes, 1 CPU thread: the
#: gather and its scatter-add backward cost about as much per pixel as a plain squared or
#: absolute error, so plain mse/l1 are always dense (gathering made rgb ~2-3x slower); ce over
#: 133 classes and norm_pix (a per-patch standardisation) win at AMT's ~45 % counted and break
#: even or lose at random masking's ~83-90 %.
GATHER_UP_TO: dict[str, float] = {"ce": 0.7, "norm_pix": 0.7, "mse": 0.0, "l1": 0.0}


def _dense_patch_losses(pred: torch.Tensor, target: torch.Tensor, spec: LossSpec,
                        grid: tuple[int, int]) -> torch.Tensor:
    """Per-patch losses ``[B, h * w]`` float32 of every patch, from every pixel.

    Works on the 6-D view ``[B, C, h, ph, w, pw]`` and reduces over (C, ph, pw): patch
    statistics broadcast back without the patchify/unpatchify copies of the whole image.
    """
    B, C, H, W = pred.shape
    h, w = grid
    ph, pw = H // h, W // w
    pred = pred.float()
    if spec.kind == "ce":
        pix = F.cross_entropy(pred, target.long(), reduction="none", ignore_index=spec.ignore_index)
        return pix.reshape(B, h, ph, w, pw).mean((2, 4)).reshape(B, h * w)
    t = target.float().reshape(B, -1, h, ph, w, pw)
    if spec.norm_pix:  # standardise per patch over (C, ph, pw), unbiased variance as MAE
        mean = t.mean((1, 3, 5), keepdim=True)
        var = (t - mean).square().sum((1, 3, 5), keepdim=True) / max(t.shape[1] * ph * pw - 1, 1)
        t = (t - mean) / (var + 1e-6).sqrt()
    diff = pred.reshape(B, C, h, ph, w, pw) - t
    return (diff.square() if spec.kind == "mse" else diff.abs()).mean((1, 3, 5)).reshape(B, h * w)


def counted_patch_losses(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                         spec: LossSpec, grid: tuple[int, int],
                         gather_up_to: float | None = None, max_count: int | None = None) -> torch.Tensor:
    """Per-patch losses ``[B, h * w]`` float32, computed only where ``mask`` (1 = counted) is set.

    ``pred``: ``[B, C, H, W]``; ``target``: ``[B, C, H, W]`` or int labels ``[B, H, W]``;
    ``mask``: bool ``[B, h * w]``. Uncounted patches hold 0 (with zero gradient), so the result
    equals the per-pixel loss map averaged per patch, on the counted patches. When more than
    ``gather_up_to`` (default: :data:`GATHER_UP_TO` of the spec's flavour, read at call time)
    of the patches count in the fullest sample, every pixel is scored instead (same values).

    ``max_count``: an upper bound on the counted patches of any sample, known without reading
    ``mask`` (the masking policy's :meth:`~multimae_att.masking.MaskingPolicy.max_counted`): it
    replaces the fullest sample's count, which is a host sync on a GPU. A mask that exceeds it
    fails a (sync-free) device check.
    """
    if target.shape[-2:] != pred.shape[-2:]:
        raise ValueError(f"{spec.kind} target {tuple(target.shape)} and prediction "
                         f"{tuple(pred.shape)} differ in resolution")
    if gather_up_to is None:
        gather_up_to = GATHER_UP_TO["norm_pix" if spec.norm_pix else spec.kind]
    mask = mask.bool()
    N = mask.shape[1]
    # Flavours never gathered skip the count: it is a host sync on a GPU (a given bound is not).
    if gather_up_to <= 0 or not mask.numel():
        P = N
    elif max_count is not None:
        P = max(0, min(int(max_count), N))
        check(mask.sum(1) <= P, f"{spec.kind} loss: a sample has more than max_count={P} counted patches")
    else:
        P = int(mask.sum(1).max())
    if gather_up_to <= 0 or P > gather_up_to * N:
        per_patch = _dense_patch_losses(pred, target, spec, grid)
        return torch.where(mask, per_patch, torch.zeros_like(per_patch))
    patch, valid = _counted_index(mask, P)
    vals = _patch_loss(_gather_patches(pred, grid, patch), _gather_patches(target, grid, patch), spec)
    return _scatter_to_patches(vals, patch, valid, N)


def packed_patch_losses(pred: PackedPrediction, target: torch.Tensor, mask: torch.Tensor,
                        spec: LossSpec) -> torch.Tensor:
    """Per-patch losses ``[B, h * w]`` float32 from a decoder's packed rows, 0 where ``mask``
    (1 = counted) is not set; the same values as :func:`counted_patch_losses` on ``pred.image()``.

    Each decoded row is scored against the target pixels of its patch (gathered by
    ``pred.index``; rows of visible tokens are scored too and then masked out, as the dense path
    does), so the prediction is never zero-filled, unpatchified or cut up again. Every counted
    patch must be a decoded row (counted = hidden and not thrown, decoded = not thrown).
    """
    B, N = mask.shape
    if pred.num_tokens != N:
        raise ValueError(f"{spec.kind} loss: packed prediction on a {pred.grid} grid, mask has {N} patches")
    if target.shape[-2:] != (pred.grid[0] * pred.patch[0], pred.grid[1] * pred.patch[1]):
        raise ValueError(f"{spec.kind} target {tuple(target.shape)} does not match the prediction's "
                         f"{pred.grid} grid of {pred.patch} patches")
    W, C = pred.rows.shape[1], pred.channels
    target = _gather_patches(target, pred.grid, pred.index)  # [B, C, W, ph * pw], labels [B, W, ph * pw]
    if spec.kind == "ce":  # one row per item, classes along a contiguous dim 1 (a strided log-softmax is slower)
        vals = _patch_loss(pred.rows.reshape(B * W, C, 1, -1), target.reshape(B * W, 1, -1), spec).reshape(B, W)
    else:
        vals = _patch_loss(pred.rows.reshape(B, W, C, -1).transpose(1, 2), target, spec)  # [B, W]
    per_patch = _scatter_to_patches(vals, pred.index, pred.valid, N)
    return torch.where(mask, per_patch, torch.zeros_like(per_patch))


def masked_mean(per_patch: torch.Tensor, mask: torch.Tensor,
                weights: torch.Tensor | None = None,
                denominator: float | torch.Tensor | None = None,
                normalize_weights: bool = False) -> torch.Tensor:
    """Mean over samples of ``sum(m w l) / sum(m)``; samples with no masked patch are skipped.

    ``per_patch``, ``mask`` (1 = counted), ``weights``: ``[B, N]``. ``normalize_weights``: divide
    by ``sum(m w)`` instead of ``sum(m)`` (weights rescaled to mean 1 over each sample's counted
    patches, so uniform weights of any size give the unweighted loss). ``denominator``: divide the
    sum of the per-sample means by this instead of by the local count of valid samples (the
    runner passes the count over the whole global batch divided by the number of processes,
    so that averaging gradients over processes gives the global-batch mean exactly).
    Returns a scalar (0 with a graph when nothing is masked, so backward still works). Never
    reads a value to the host (a tensor ``denominator`` stays on the device).
    """
    m = mask.to(per_patch.dtype)
    num = (per_patch * m if weights is None else per_patch * m * weights).sum(1)
    valid = m.sum(1) > 0
    den = (m * weights).sum(1) if normalize_weights and weights is not None else m.sum(1)
    per_sample = torch.where(valid, num / torch.where(valid, den, torch.ones_like(den)).clamp_min(1e-12),
                             torch.zeros_like(num))
    if denominator is None:
        denominator = valid.sum()
    if torch.is_tensor(denominator):
        return per_sample.sum() / denominator.to(per_sample.dtype).clamp_min(1e-12)
    return per_sample.sum() / max(float(denominator), 1e-12)


def attg_weights(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """AttG weights ``exp(M_norm / tau)`` ``[B, N]``, M_norm = per-row min-max normalised scores.

    A constant row (max == min) gets M_norm = 0, i.e. weight 1 everywhere.
    """
    s = scores.float()
    lo = s.amin(dim=-1, keepdim=True)
    rng = s.amax(dim=-1, keepdim=True) - lo
    m_norm = torch.where(rng > 0, (s - lo) / rng.clamp_min(1e-12), torch.zeros_like(s))
    return torch.exp(m_norm / tau)


def masked_loss(pred: torch.Tensor | PackedPrediction, target: torch.Tensor, hidden: torch.Tensor, spec: LossSpec,
                thrown: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                grid: tuple[int, int] | None = None,
                denominator: float | torch.Tensor | None = None,
                normalize_weights: bool = False,
                patch_losses: dict[str, torch.Tensor] | None = None,
                name: str = "", max_count: int | None = None) -> torch.Tensor:
    """Loss of one output modality on its hidden, non-thrown patches.

    ``pred``: the prediction ``[B, C, H, W]``, or a decoder's packed rows
    (:class:`~multimae_att.model.packed.PackedPrediction`, scored by :func:`packed_patch_losses`).
    ``hidden``/``thrown``: bool ``[B, N]`` (1 = hidden / thrown); ``weights``: ``[B, N]`` or None;
    ``denominator`` and ``normalize_weights``: see :func:`masked_mean`; ``max_count``: see
    :func:`counted_patch_losses`. ``patch_losses``: when a dict is given, ``patch_losses[name]``
    receives the detached per-patch losses ``[B, N]`` (0 on patches that do not count), e.g. as
    targets of a loss predictor.
    """
    mask = hidden.bool() if thrown is None else hidden.bool() & ~thrown.bool()
    if isinstance(pred, PackedPrediction):
        per_patch = packed_patch_losses(pred, target, mask, spec)
    else:
        grid = _patch_grid(pred, hidden.shape[1], grid)
        per_patch = counted_patch_losses(pred, target, mask, spec, grid, max_count=max_count)
    if patch_losses is not None:
        patch_losses[name] = per_patch.detach()
    return masked_mean(per_patch, mask, weights, denominator, normalize_weights)


def multimodal_loss(preds: Mapping[str, torch.Tensor | PackedPrediction], targets: Mapping[str, torch.Tensor],
                    hidden: Mapping[str, torch.Tensor],
                    thrown: Mapping[str, torch.Tensor] | None = None,
                    loss_weights: Mapping[str, float] | None = None,
                    specs: Mapping[str, LossSpec] | None = None,
                    attg_scores: Mapping[str, torch.Tensor] | None = None,
                    tau: float = 0.75,
                    denominators: Mapping[str, float | torch.Tensor] | None = None,
                    attg_normalize: bool = False,
                    patch_losses: dict[str, torch.Tensor] | None = None,
                    max_counted: Mapping[str, int] | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of per-output-modality masked losses.

    ``targets`` is keyed by *input* modality (``norm_rgb`` reads ``targets['rgb']``); masks, AttG
    scores, ``denominators`` (see :func:`masked_mean`) and ``max_counted`` (see
    :func:`counted_patch_losses`) likewise. ``loss_weights`` defaults to 1 per output.
    ``attg_normalize``: AttG weights rescaled to mean 1 per sample (see the module docstring).
    ``patch_losses``: a dict to receive each output's detached per-patch losses (see
    :func:`masked_loss`). Returns ``(total,
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
                                 denominator=None if denominators is None else denominators[src],
                                 normalize_weights=attg_normalize, patch_losses=patch_losses, name=out,
                                 max_count=None if max_counted is None else max_counted.get(src))
        term = parts[out] * (1.0 if loss_weights is None else loss_weights.get(out, 1.0))
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no predictions to score")
    return total, parts
