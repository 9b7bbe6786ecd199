"""One geometry per sample, applied to every modality; normalisation; robust depth standardisation.

A sample's geometry is a crop box ``(top, left, height, width)`` in *source-image* pixels, an
output size and a horizontal-flip flag. Every modality is cut from the same box (scaled if a
modality is stored at another resolution) and resized in one step with Pillow's ``resize(box=...)``
(no intermediate crop copy): bicubic for RGB, bilinear for depth, nearest for labels and validity
masks, so label values are never interpolated. The flip is applied after the resize.

Randomness comes from a per-sample generator seeded by ``(seed, epoch, crc32(sample_id))``: the
same sample gets the same crop in the folder and the shard layouts, in any worker, on any rank,
and after a resume.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from multimae_att.modalities import MODALITIES

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "DEPTH_SCALE", "Geometry", "AugmentConfig",
    "sample_rng", "random_resized_crop_box", "center_crop_box", "make_geometry",
    "apply_geometry", "to_tensors", "robust_standardize_depth",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEPTH_SCALE = 2.0 ** 16  # depth tensor = stored 16-bit value / 2**16
# x / 255 then (x - mean) / std, folded into one multiply-add per pixel: x * _RGB_SCALE + _RGB_SHIFT.
_RGB_SCALE = (1.0 / (255.0 * torch.tensor(IMAGENET_STD))).view(3, 1, 1)
_RGB_SHIFT = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)
_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
_RESAMPLE = {name: _FILTERS[m.resample] for name, m in MODALITIES.items()}   # the table's filters


@dataclass(frozen=True)
class Geometry:
    """Crop ``box`` = (top, left, height, width) in source pixels, ``out_size`` = (H, W), ``flip``."""
    box: tuple[float, float, float, float]
    out_size: tuple[int, int]
    flip: bool
    source_size: tuple[int, int]


@dataclass(frozen=True)
class AugmentConfig:
    """Per-sample transform settings (plain values, picklable for DataLoader workers).

    ``train``: random-resized crop (``scale`` of the area, aspect ``ratio``) + flip with
    probability ``hflip``; otherwise a deterministic centre crop of ``eval_crop_pct`` of the
    largest box with the output aspect (``eval_full_image``: the whole source, aspect not kept).
    ``semseg_scale``: semseg is delivered at ``image_size // semseg_scale`` (4 for pretraining,
    1 for finetuning). ``reduce_zero_label``: ADE20K convention, 0 -> 255 (ignore), others -1.
    ``att_map_stride``: a precomputed attention map is delivered at ``image_size // stride``
    (the token grid for 16-px patches). ``native_modalities``: in evaluation, these modalities
    are also delivered untouched at the resolution stored in the file, as ``<modality>_native``
    (for metrics at label resolution; sizes may differ between samples). ``recipe``: a picklable
    callable ``recipe(images, sample_id, epoch) -> dict of tensors`` that replaces the geometry
    and tensor conversion above (finetuning's MultiMAE protocol,
    :mod:`multimae_att.finetune.protocols`); the settings above are then unused.
    """
    image_size: tuple[int, int] = (224, 224)
    train: bool = True
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    semseg_scale: int = 4
    eval_crop_pct: float = 1.0
    eval_full_image: bool = False
    reduce_zero_label: bool = False
    att_map_stride: int = 16
    native_modalities: tuple[str, ...] = ()
    seed: int = 0
    recipe: Any = None
    label_ranges: tuple[tuple[str, int, int | None], ...] = ()   # checked on load, see data.sample

    def __post_init__(self) -> None:
        h, w = self.image_size
        if h % self.semseg_scale or w % self.semseg_scale:
            raise ValueError(f"image_size {self.image_size} is not divisible by semseg_scale {self.semseg_scale}")
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not (0 < self.eval_crop_pct <= 1):
            raise ValueError(f"eval_crop_pct must be in (0, 1], got {self.eval_crop_pct}")
        bad = [m for m in self.native_modalities if m not in ("depth", "semseg", "mask_valid")]
        if bad:
            raise ValueError(f"native_modalities {bad}: only depth, semseg and mask_valid")


def sample_rng(seed: int, epoch: int, sample_id: str) -> np.random.Generator:
    """Generator for one sample's augmentation: a pure function of (seed, epoch, sample id)."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, zlib.crc32(sample_id.encode())])


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, h, w) covering ``scale`` of the area with aspect w/h in ``ratio`` (log-uniform).

    Same sampling rule as the usual RandomResizedCrop: 10 tries, then the largest centred box
    whose aspect is clamped to ``ratio``.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(height: int, width: int, out_size: tuple[int, int],
                    crop_pct: float = 1.0) -> tuple[float, float, float, float]:
    """Centred box with the aspect of ``out_size``, ``crop_pct`` of the largest such box (side)."""
    aspect = out_size[1] / out_size[0]
    h = min(height, width / aspect) * crop_pct
    w = h * aspect
    return (height - h) / 2, (width - w) / 2, h, w


def make_geometry(cfg: AugmentConfig, source_size: tuple[int, int], sample_id: str,
                  epoch: int) -> Geometry:
    """The crop/flip of one sample (random in training, fixed in evaluation)."""
    height, width = source_size
    if cfg.train:
        rng = sample_rng(cfg.seed, epoch, sample_id)
        box = random_resized_crop_box(rng, height, width, cfg.scale, cfg.ratio)
        flip = bool(rng.uniform() < cfg.hflip)
    elif cfg.eval_full_image:
        box, flip = (0.0, 0.0, float(height), float(width)), False
    else:
        box, flip = center_crop_box(height, width, cfg.image_size, cfg.eval_crop_pct), False
    return Geometry(tuple(float(v) for v in box), tuple(cfg.image_size), flip, (height, width))


def apply_geometry(images: Mapping[str, Image.Image], geom: Geometry,
                   semseg_scale: int = 1, att_map_stride: int = 16) -> dict[str, np.ndarray]:
    """Crop+resize+flip each modality image with the same geometry.

    ``images``: modality -> PIL image; a modality stored at another resolution than the source
    (``geom.source_size``) gets the box scaled to its own pixel grid. Returns numpy arrays:
    rgb ``[H, W, 3]`` uint8, depth ``[H, W]`` (uint16/int32), semseg ``[H/s, W/s]``, mask_valid
    ``[H, W]``, att_map ``[H/stride, W/stride]`` (bilinear with Pillow's antialiasing: an
    area average when shrinking).
    """
    top, left, h, w = geom.box
    src_h, src_w = geom.source_size
    out: dict[str, np.ndarray] = {}
    for modality, image in images.items():
        sy, sx = image.height / src_h, image.width / src_w
        pil_box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        out_h, out_w = geom.out_size
        if modality == "semseg":
            out_h, out_w = out_h // semseg_scale, out_w // semseg_scale
        elif modality == "att_map":
            out_h, out_w = max(out_h // att_map_stride, 1), max(out_w // att_map_stride, 1)
        resized = image.resize((out_w, out_h), _RESAMPLE[modality], box=pil_box)
        array = np.array(resized)  # a writable copy (torch.from_numpy needs one)
        out[modality] = np.ascontiguousarray(array[:, ::-1]) if geom.flip else array
    return out


def to_tensors(arrays: Mapping[str, np.ndarray], reduce_zero_label: bool = False) -> dict[str, torch.Tensor]:
    """Arrays from :func:`apply_geometry` -> batch-ready tensors (see docs/INTERFACES.md), by the
    modality's table ``encoding`` (:data:`multimae_att.modalities.Encoding`).

    rgb8 (rgb) float32 ``[3, H, W]`` ImageNet-normalised; depth16 (depth) float32 ``[1, H, W]`` =
    stored / 2**16; labels (semseg) int64 ``[h, w]``; mask (mask_valid) bool ``[1, H, W]``; map
    (att_map) float32 ``[h, w]`` in [0, 1] (stored value / 255 for 8-bit, / 65535 for 16-bit maps).
    """
    out: dict[str, torch.Tensor] = {}
    for modality, array in arrays.items():
        if modality not in MODALITIES:
            raise KeyError(f"unknown modality {modality!r}")
        encoding = MODALITIES[modality].encoding
        if encoding == "rgb8":
            x = torch.from_numpy(array).permute(2, 0, 1).float()
            out[modality] = torch.addcmul(_RGB_SHIFT, x, _RGB_SCALE).contiguous()
        elif encoding == "depth16":
            out[modality] = torch.from_numpy(array.astype(np.float32) / DEPTH_SCALE)[None]
        elif encoding == "labels":
            labels = torch.from_numpy(array.astype(np.int64))
            if reduce_zero_label:  # ADE20K: 0 = "other" is ignored, classes 1..150 -> 0..149
                labels = torch.where(labels == 0, 255, labels - 1)
                labels = torch.where(labels == 254, 255, labels)
            out[modality] = labels
        elif encoding == "mask":
            out[modality] = torch.from_numpy(array > 0)[None]
        else:  # map
            top = 255.0 if array.dtype == np.uint8 else 65535.0
            out[modality] = torch.from_numpy(array.astype(np.float32) / top)
    return out


def robust_standardize_depth(depth: torch.Tensor, mask_valid: torch.Tensor | None = None,
                             trim: tuple[float, float] = (0.1, 0.9), eps: float = 1e-6) -> torch.Tensor:
    """MultiMAE's truncated depth standardisation, per sample, by order statistics.

    ``depth``: float ``[B, 1, H, W]``; ``mask_valid``: optional bool ``[B, 1, H, W]`` (1 = valid).
    Definition (MultiMAE's pretraining step, ``run_pretraining_multimae.py``): sort the ``n``
    values of a sample, keep the sorted positions ``int(0.1 n)`` to ``int(0.9 n)`` (end excluded;
    ties are kept or dropped by position, exactly as the slice of the sorted row), and return
    ``(depth - mean) / sqrt(var + eps)`` with the mean and the unbiased variance of the kept values.

    Computed without sorting when every pixel is valid: two ``kthvalue`` selections give the
    values at both ends of the kept range, and the kept multiset is every value strictly between
    them plus the right number of copies of each end value (counted from ``<`` / ``<=``). Equal to
    MultiMAE's values up to float summation order (tested against its sort-and-slice). With
    ``mask_valid`` the ``n`` valid values of each sample are sorted (invalid ones last) and sliced
    the same way; invalid pixels do not enter the statistics and are transformed like the others
    (callers mask them in the losses). Differences from MultiMAE, only in degenerate samples:
    fewer than 2 kept values (fewer than ~10 valid pixels) use std 1 where MultiMAE's unbiased
    variance is NaN; a sample with no kept value is returned unchanged (mean 0).
    """
    b = depth.shape[0]
    flat = depth.reshape(b, -1).float()
    n_all = flat.shape[1]
    if mask_valid is None and n_all > 0:
        start, stop = int(trim[0] * n_all), int(trim[1] * n_all)  # MultiMAE's slice bounds
        count = torch.full((b, 1), float(max(stop - start, 0)), device=flat.device)
        if stop > start:
            mean, var = _trimmed_moments_by_selection(flat, start, stop)
        else:
            mean, var = torch.zeros_like(count), torch.zeros_like(count)
    else:
        mean, var, count = _trimmed_moments_by_sort(flat, mask_valid, trim)
    std = torch.where(count > 1, (var + eps).sqrt(), torch.ones_like(var))
    return ((flat - mean) / std).reshape(depth.shape).to(depth.dtype)


def _trimmed_moments_by_selection(flat: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance ``[B, 1]`` of sorted positions ``start .. stop-1`` of each row,
    without sorting (see :func:`robust_standardize_depth`); needs ``stop > start``."""
    lo = flat.kthvalue(start + 1, dim=1, keepdim=True).values   # value at sorted position start
    hi = flat.kthvalue(stop, dim=1, keepdim=True).values        # value at sorted position stop - 1
    count = stop - start
    upto_lo = (flat <= lo).sum(1, keepdim=True)
    below_hi = (flat < hi).sum(1, keepdim=True)
    split = lo < hi
    # Copies of the end values inside the kept positions; lo == hi: every kept value is lo.
    n_lo = torch.where(split, upto_lo - start, torch.full_like(upto_lo, count)).to(flat.dtype)
    n_hi = torch.where(split, stop - below_hi, torch.zeros_like(below_hi)).to(flat.dtype)
    inner = (flat > lo) & (flat < hi)
    total = torch.where(inner, flat, 0.0).sum(1, keepdim=True) + n_lo * lo + n_hi * hi
    mean = total / count
    sq = (torch.where(inner, (flat - mean).square(), 0.0).sum(1, keepdim=True)
          + n_lo * (lo - mean).square() + n_hi * (hi - mean).square())
    return mean, sq / max(count - 1, 1)


def _trimmed_moments_by_sort(flat: torch.Tensor, mask_valid: torch.Tensor | None, trim: tuple[float, float]
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, unbiased variance and count ``[B, 1]`` of sorted positions ``int(trim[0] n_b) ..
    int(trim[1] n_b) - 1`` of each row's ``n_b`` valid values (invalid values sort last)."""
    b = flat.shape[0]
    valid = torch.ones_like(flat, dtype=torch.bool) if mask_valid is None else mask_valid.reshape(b, -1).bool()
    ordered = torch.sort(torch.where(valid, flat, torch.full_like(flat, float("inf"))), dim=1).values
    n = valid.sum(1, keepdim=True).double()
    start, stop = torch.floor(trim[0] * n), torch.floor(trim[1] * n)  # int() of a positive float
    pos = torch.arange(flat.shape[1], device=flat.device, dtype=torch.float64)[None, :]
    keep = (pos >= start) & (pos < stop)
    count = keep.sum(1, keepdim=True).to(flat.dtype)
    mean = torch.where(keep, ordered, 0.0).sum(1, keepdim=True) / count.clamp_min(1)
    var = torch.where(keep, (ordered - mean).square(), 0.0).sum(1, keepdim=True) / (count - 1).clamp_min(1)
    return mean, var, count
