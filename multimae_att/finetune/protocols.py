"""MultiMAE's finetuning data recipes (``data.protocol: multimae``), per sample, in the data workers.

MultiMAE prepares semseg and depth data with albumentations 1.1.0 on OpenCV arrays
(``utils/datasets_semseg.py::simple_transform``, ``utils/dataset_regression.py::nyu_transform``).
This module redoes those recipes with torch ops on one sample's planes (``[C, H, W]`` tensors):

* ``lsj`` (semseg training): horizontal flip (p 0.5); longest side resized to ``image_size``
  (aspect kept, sizes rounded); colour jitter on RGB only (p 0.5: brightness 0.4, contrast 0.4,
  saturation 0.2, hue 0.1, in random order); large-scale jitter: both sides x s, s ~ U[0.1, 2.0],
  truncated to integers; padding at the bottom and right to ``image_size`` (RGB 128, labels
  ignored, depth and validity marked as padding); random ``image_size`` crop.
* ``letterbox`` (semseg evaluation): longest side resized to ``image_size``, padded as above;
  scored at that size, the padding ignored (its labels are ``ignore_index``).
* ``nyu`` (NYUv2 depth training): shortest side resized to ``image_size``; flip (p 0.5); colour
  jitter (p 0.5: brightness 0.1255, contrast 0.4, saturation [0.5, 1.5], hue [-0.2, 0.2]) and
  greyscale (p 0.3) on RGB; random ``image_size`` crop.
* ``center_crop`` (NYUv2 depth evaluation): shortest side resized to ``image_size``, centre crop.

Resampling follows OpenCV's: RGB bilinear with half-pixel centres and *no* antialiasing (OpenCV's
``INTER_LINEAR``), rounded to 8 bit; depth, labels and validity by OpenCV's ``INTER_NEAREST``
(source index ``floor(i * in / out)``), so depth values are never mixed across edges. Brightness,
contrast, saturation, hue and greyscale follow albumentations' 8-bit arithmetic (lookup tables,
truncation, OpenCV's integer grey weights and 8-bit HSV with hue in 2-degree steps). Randomness: one
generator per sample seeded by ``(seed, epoch, sample id)`` (:func:`multimae_att.data.transforms.sample_rng`), drawn in
albumentations' order, so a sample gets the same augmentation in any worker and after a resume.

Every recipe sample has the modalities in the usual conventions (:func:`to_tensors`) plus
``padding`` (bool ``[1, H, W]``, True = added pixel): padded semseg is ``ignore_index``, padded
depth 0 (invalid) and padded ``mask_valid`` False. Depth *inputs* are then standardised in the
task (:func:`multimae_depth_input`): trimmed statistics over the image's pixels (padding excluded),
then padding and invalid pixels set to 0.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from multimae_att.data import EpochSampler, MultiModalLoader
from multimae_att.data.transforms import sample_rng, to_tensors

__all__ = [
    "LSJ_SCALE",
    "NYU_JITTER",
    "PAD_RGB",
    "RECIPES",
    "SEMSEG_JITTER",
    "Jitter",
    "MultiMAERecipe",
    "color_jitter",
    "eval_sample_indices",
    "make_recipe",
    "multimae_depth_input",
    "nearest_index",
    "plane_size",
    "resize",
    "resize_planes",
    "select_eval_samples",
    "side_resize_size",
    "to_gray",
    "to_planes",
    "trimmed_standardize_depth",
]

PAD_RGB = 128.0                # MultiMAE's PadIfNeeded value for images
LSJ_SCALE = (0.1, 2.0)         # RandomScale(scale_limit=(0.1 - 1, 2.0 - 1))
NYU_GREY_P = 0.3
EVAL_SAMPLE_SEED = 0           # MultiMAE: np.random.seed(0); np.random.permutation(n)[:max_images]
_GREY_WEIGHTS = (9798, 19235, 3735)   # OpenCV RGB2GRAY for 8 bit: (w . rgb + 2^14) >> 15
_HSV_SHIFT = 12                        # OpenCV RGB2HSV for 8 bit: fixed-point tables, hue 0..179


@dataclass(frozen=True)
class Jitter:
    """albumentations ``ColorJitter``: factor ranges (hue as a fraction of the colour circle), p."""
    brightness: tuple[float, float]
    contrast: tuple[float, float]
    saturation: tuple[float, float]
    hue: tuple[float, float]
    p: float = 0.5


# ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.5) (MoCo-v3 / DINO)
SEMSEG_JITTER = Jitter((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
# ColorJitter(brightness=0.1255, contrast=0.4, saturation=[0.5, 1.5], hue=[-0.2, 0.2], p=0.5) (BYOL)
NYU_JITTER = Jitter((1 - 0.1255, 1 + 0.1255), (0.6, 1.4), (0.5, 1.5), (-0.2, 0.2))

Planes = dict[str, torch.Tensor]   # modality -> [C, H, W]; 'padding' bool [1, H, W]


# ------------------------------------------------------------------------------ geometry

def plane_size(planes: Planes) -> tuple[int, int]:
    return tuple(planes["padding"].shape[-2:])


def nearest_index(n_in: int, n_out: int) -> torch.Tensor:
    """OpenCV ``INTER_NEAREST`` source index of each of ``n_out`` pixels: floor(i * in / out)."""
    step = 1.0 / (n_out / n_in)   # OpenCV: ifx = 1 / inv_scale, inv_scale = out / in (doubles)
    return torch.from_numpy(np.minimum(np.floor(np.arange(n_out) * step), n_in - 1).astype(np.int64))


def resize(x: torch.Tensor, size: tuple[int, int], bilinear: bool) -> torch.Tensor:
    """``x`` ``[C, h, w]`` to ``size``: bilinear without antialiasing, rounded and clipped to
    [0, 255] (8-bit images), or nearest (any dtype, values copied). Same size: ``x`` itself."""
    h, w = size
    if tuple(x.shape[-2:]) == (h, w):
        return x
    if bilinear:
        y = F.interpolate(x[None].float(), size=(h, w), mode="bilinear", align_corners=False,
                          antialias=False)[0]
        return y.round().clamp(0, 255)
    return x[:, nearest_index(x.shape[-2], h)[:, None], nearest_index(x.shape[-1], w)[None, :]]


def resize_planes(planes: Planes, size: tuple[int, int]) -> Planes:
    """Every plane to ``size`` (each from its own size): RGB bilinear, everything else nearest."""
    return {m: resize(x, size, bilinear=m == "rgb") for m, x in planes.items()}


def side_resize_size(size: tuple[int, int], target: int, longest: bool) -> tuple[int, int]:
    """albumentations ``LongestMaxSize`` / ``SmallestMaxSize``: that side to ``target``, the other
    scaled alike and rounded (half to even)."""
    h, w = size
    scale = target / float(max(h, w) if longest else min(h, w))
    if scale == 1.0:
        return h, w
    return round(h * scale), round(w * scale)


def hflip(planes: Planes) -> Planes:
    return {m: x.flip(-1) for m, x in planes.items()}


def pad_to(planes: Planes, target: int) -> Planes:
    """``PadIfNeeded(target, target, position=TOP_LEFT)``: pad bottom/right to at least ``target``.
    RGB gets 128, ``padding`` True, every other plane 0 (made ignore / invalid when finished)."""
    h, w = plane_size(planes)
    bottom, right = max(target - h, 0), max(target - w, 0)
    if not (bottom or right):
        return planes
    value = {"rgb": PAD_RGB, "padding": True}
    return {m: F.pad(x, (0, right, 0, bottom), value=value.get(m, 0)) for m, x in planes.items()}


def crop(planes: Planes, top: int, left: int, height: int, width: int) -> Planes:
    return {m: x[:, top:top + height, left:left + width] for m, x in planes.items()}


def random_crop(planes: Planes, target: int, rng: np.random.Generator) -> Planes:
    """albumentations ``RandomCrop``: offsets int((H - target) * u), u ~ U[0, 1)."""
    h, w = plane_size(planes)
    top, left = int((h - target) * rng.random()), int((w - target) * rng.random())
    return crop(planes, top, left, target, target)


def center_crop(planes: Planes, target: int) -> Planes:
    h, w = plane_size(planes)
    return crop(planes, (h - target) // 2, (w - target) // 2, target, target)


# -------------------------------------------------------------------------------- colour

def grey(rgb: torch.Tensor) -> torch.Tensor:
    """OpenCV ``RGB2GRAY`` of an 8-bit image ``[3, H, W]`` (integer weights): ``[1, H, W]``."""
    r, g, b = rgb.long()
    wr, wg, wb = _GREY_WEIGHTS
    return ((wr * r + wg * g + wb * b + (1 << 14)) >> 15)[None].to(rgb.dtype)


def to_gray(rgb: torch.Tensor) -> torch.Tensor:
    """albumentations ``ToGray``: grey value in all three channels."""
    return grey(rgb).expand(3, -1, -1).clone()


def _lut(rgb: torch.Tensor, table: np.ndarray) -> torch.Tensor:
    """8-bit lookup (OpenCV ``LUT``); ``table`` float [256], clipped to [0, 255] and truncated."""
    return torch.from_numpy(np.clip(table, 0, 255).astype(np.uint8)).to(rgb.dtype)[rgb.long()]


def adjust_brightness(rgb: torch.Tensor, factor: float) -> torch.Tensor:
    if factor == 1:
        return rgb
    return _lut(rgb, np.arange(256) * factor)


def adjust_contrast(rgb: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with the mean grey value (albumentations: of the OpenCV grey image)."""
    if factor == 1:
        return rgb
    mean = float(grey(rgb).double().mean())
    return _lut(rgb, np.arange(256) * factor + mean * (1 - factor))


def adjust_saturation(rgb: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with the grey image (OpenCV ``addWeighted``: rounded, saturated)."""
    if factor == 1:
        return rgb
    return (rgb.double() * factor + grey(rgb).double() * (1 - factor)).round().clamp(0, 255).to(rgb.dtype)


def _rgb_to_hsv8(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OpenCV ``RGB2HSV`` for 8 bit (integer tables): hue 0..179, saturation and value 0..255."""
    r, g, b = rgb.long()
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    i = torch.arange(256, dtype=torch.float64)
    sdiv = torch.where(i > 0, torch.round((255 << _HSV_SHIFT) / i.clamp(min=1)), 0.0).long()
    hdiv = torch.where(i > 0, torch.round((180 << _HSV_SHIFT) / (6.0 * i.clamp(min=1))), 0.0).long()
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * sdiv[v] + half) >> _HSV_SHIFT
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * hdiv[diff] + half) >> _HSV_SHIFT
    return torch.where(h < 0, h + 180, h), s, v


def _hsv8_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """OpenCV ``HSV2RGB`` for 8 bit (float32 sectors, rounded): ``[3, H, W]`` float 0..255."""
    hf = h.float() * (6.0 / 180.0)
    sf, vf = s.float() * (1.0 / 255.0), v.float() * (1.0 / 255.0)
    hf = hf - 6.0 * torch.floor(hf / 6.0)
    sector = torch.floor(hf)
    frac = hf - sector
    sector = sector.long().clamp(0, 5)
    tab = torch.stack([vf, vf * (1.0 - sf), vf * (1.0 - sf * frac), vf * (1.0 - sf * (1.0 - frac))])
    order = torch.tensor([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])   # (b, g, r)
    idx = order[sector].permute(2, 0, 1)                          # [3 (b, g, r), H, W]
    bgr = tab.gather(0, idx)
    rgb = torch.where(s[None] == 0, vf[None].expand(3, -1, -1), bgr.flip(0))
    return (rgb * 255.0).floor().clamp(0, 255)


def adjust_hue(rgb: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the hue by ``shift`` of the colour circle in OpenCV's 8-bit HSV (albumentations:
    hue lookup ``uint8((h + 180 shift) mod 180)``)."""
    if shift == 0:
        return rgb
    h, s, v = _rgb_to_hsv8(rgb)
    lut = torch.from_numpy(np.mod(np.arange(256, dtype=np.int16) + 180 * shift, 180).astype(np.uint8)).long()
    return _hsv8_to_rgb(lut[h], s, v).to(rgb.dtype)


_COLOUR_OPS: tuple[Callable[[torch.Tensor, float], torch.Tensor], ...] = (
    adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(rgb: torch.Tensor | None, jitter: Jitter, rng: np.random.Generator) -> torch.Tensor | None:
    """albumentations ``ColorJitter`` (applied by the caller with probability ``jitter.p``): the
    four factors drawn uniformly, then applied in a random order. The draws are made even
    without RGB (``rgb`` None), so the sample's later draws do not depend on its modalities."""
    factors = [rng.uniform(*r) for r in (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)]
    order = rng.permutation(4)
    if rgb is not None:
        for i in order:
            rgb = _COLOUR_OPS[i](rgb, factors[i])
    return rgb


def _maybe_jitter(planes: Planes, jitter: Jitter, rng: np.random.Generator) -> Planes:
    if rng.random() < jitter.p:
        rgb = color_jitter(planes.get("rgb"), jitter, rng)
        if rgb is not None:
            planes = {**planes, "rgb": rgb}
    return planes


# ------------------------------------------------------------------------------- recipes

def _lsj(planes: Planes, size: int, rng: np.random.Generator) -> Planes:
    if rng.random() < 0.5:
        planes = hflip(planes)
    planes = resize_planes(planes, side_resize_size(plane_size(planes), size, longest=True))
    planes = _maybe_jitter(planes, SEMSEG_JITTER, rng)
    s = rng.uniform(*LSJ_SCALE)
    h, w = plane_size(planes)
    # int() as albumentations' scale(); at least 1 px (OpenCV would refuse an empty image)
    planes = resize_planes(planes, (max(int(h * s), 1), max(int(w * s), 1)))
    return random_crop(pad_to(planes, size), size, rng)


def _letterbox(planes: Planes, size: int, rng: np.random.Generator | None) -> Planes:
    planes = resize_planes(planes, side_resize_size(plane_size(planes), size, longest=True))
    return pad_to(planes, size)


def _nyu(planes: Planes, size: int, rng: np.random.Generator) -> Planes:
    planes = resize_planes(planes, side_resize_size(plane_size(planes), size, longest=False))
    if rng.random() < 0.5:
        planes = hflip(planes)
    planes = _maybe_jitter(planes, NYU_JITTER, rng)
    if rng.random() < NYU_GREY_P and "rgb" in planes:
        planes = {**planes, "rgb": to_gray(planes["rgb"])}
    return random_crop(planes, size, rng)


def _center_crop(planes: Planes, size: int, rng: np.random.Generator | None) -> Planes:
    planes = resize_planes(planes, side_resize_size(plane_size(planes), size, longest=False))
    return center_crop(planes, size)


RECIPES = {"lsj": _lsj, "nyu": _nyu, "letterbox": _letterbox, "center_crop": _center_crop}
TRAINING = ("lsj", "nyu")


def to_planes(images: Mapping[str, Image.Image]) -> Planes:
    """PIL images -> ``[C, H, W]`` tensors: rgb float 0..255, the rest in integer dtypes; plus
    ``padding`` (all False) at the reference (rgb, else first) modality's size."""
    planes: Planes = {}
    for m, image in images.items():
        a = np.asarray(image)
        if m == "rgb":
            planes[m] = torch.from_numpy(a.astype(np.float32)).permute(2, 0, 1)
        elif m in ("depth", "semseg", "mask_valid"):
            planes[m] = torch.from_numpy(a.astype(np.int32 if a.dtype == np.uint16 else a.dtype))[None]
        else:
            raise ValueError(f"protocol multimae: no recipe for modality {m!r} "
                             "(rgb, depth, semseg, mask_valid)")
    ref = planes["rgb"] if "rgb" in planes else next(iter(planes.values()))
    planes["padding"] = torch.zeros((1, *ref.shape[-2:]), dtype=torch.bool)
    return planes


@dataclass(frozen=True)
class MultiMAERecipe:
    """One of MultiMAE's data recipes (``kind``: lsj, nyu, letterbox, center_crop) as the data
    package's per-sample ``recipe``: PIL images in, batch-ready tensors out (see module doc).
    ``semseg_scale``: semseg as an *input* is delivered at 1/scale (nearest, as MultiMAE's
    pseudo labels)."""
    kind: str
    image_size: int
    seed: int = 0
    ignore_index: int = 255
    reduce_zero_label: bool = False
    semseg_scale: int = 1

    def __post_init__(self) -> None:
        if self.kind not in RECIPES:
            raise ValueError(f"unknown recipe {self.kind!r}; expected one of {sorted(RECIPES)}")

    def __call__(self, images: Mapping[str, Image.Image], sample_id: str, epoch: int) -> dict[str, Any]:
        rng = sample_rng(self.seed, epoch, sample_id) if self.kind in TRAINING else None
        planes = RECIPES[self.kind](to_planes(images), self.image_size, rng)
        padding = planes.pop("padding")
        arrays = {}
        for m, x in planes.items():
            if m == "rgb":
                arrays[m] = x.permute(1, 2, 0).to(torch.uint8).numpy()
            else:
                arrays[m] = x[0].numpy()
        out = to_tensors(arrays, self.reduce_zero_label)
        if "semseg" in out:
            out["semseg"] = out["semseg"].masked_fill(padding[0], self.ignore_index)
            if self.semseg_scale > 1:
                out["semseg"] = resize(out["semseg"][None], tuple(
                    n // self.semseg_scale for n in out["semseg"].shape), bilinear=False)[0]
        if "depth" in out:
            out["depth"] = out["depth"].masked_fill(padding, 0.0)
        if "mask_valid" in out:
            out["mask_valid"] = out["mask_valid"] & ~padding
        out["padding"] = padding
        return out


def make_recipe(cfg, train: bool) -> MultiMAERecipe | None:
    """The recipe of ``cfg`` (a :class:`FinetuneConfig`) for the training or evaluation data, or
    None when the data package's own geometry is used (protocol ours, image-level tasks)."""
    if cfg.data.protocol != "multimae" or not cfg.task_facts().dense:
        return None
    kind = cfg.aug() if train else cfg.eval_mode()
    semseg_scale = 4 if "semseg" in cfg.model.in_modalities else 1
    return MultiMAERecipe(kind, cfg.data.image_size, seed=cfg.train.seed,
                          ignore_index=cfg.task.ignore_index,
                          reduce_zero_label=cfg.task.reduce_zero_label, semseg_scale=semseg_scale)


# --------------------------------------------------------------------------- depth input

def trimmed_standardize_depth(depth: torch.Tensor, keep: torch.Tensor | None = None,
                              trim: float = 0.1, eps: float = 1e-6) -> torch.Tensor:
    """MultiMAE's robust depth standardisation, per sample, batched (one sort, no loop).

    ``depth`` ``[B, 1, H, W]``; ``keep`` bool ``[B, 1, H, W]`` (pixels the statistics use; None =
    all). With the n kept values sorted, the statistics use positions ``int(trim * n)`` up to
    (excluding) ``int((1 - trim) * n)``; returns ``(depth - mean) / sqrt(var + eps)`` with the
    unbiased variance. A sample with fewer than 2 such values uses variance 1.
    """
    b = depth.shape[0]
    flat = depth.reshape(b, -1).float()
    keep = torch.ones_like(flat, dtype=torch.bool) if keep is None else keep.reshape(b, -1)
    n = keep.sum(1).double()
    ordered = torch.sort(torch.where(keep, flat, torch.full_like(flat, float("inf"))), dim=1).values
    lo, hi = (n * trim).long(), (n * (1 - trim)).long()
    pos = torch.arange(flat.shape[1], device=flat.device)[None]
    sel = (pos >= lo[:, None]) & (pos < hi[:, None])
    count = sel.sum(1, keepdim=True)
    mean = torch.where(sel, ordered, 0.0).sum(1, keepdim=True) / count.clamp(min=1)
    var = torch.where(sel, (ordered - mean) ** 2, 0.0).sum(1, keepdim=True) / (count - 1).clamp(min=1)
    var = torch.where(count > 1, var, torch.ones_like(var))
    return ((flat - mean) / torch.sqrt(var + eps)).reshape(depth.shape).to(depth.dtype)


def multimae_depth_input(depth: torch.Tensor, padding: torch.Tensor | None = None,
                         mask_valid: torch.Tensor | None = None, standardize: bool = True) -> torch.Tensor:
    """A depth *input* as MultiMAE's semseg finetuning feeds it: standardised with trimmed
    statistics over the non-padded pixels (invalid ones included, as MultiMAE), then padded and
    invalid (``~mask_valid``) pixels set to 0. Shapes ``[B, 1, H, W]``."""
    keep = None if padding is None else ~padding
    if standardize:
        depth = trimmed_standardize_depth(depth, keep)
    drop = torch.zeros_like(depth, dtype=torch.bool) if padding is None else padding
    if mask_valid is not None:
        drop = drop | ~mask_valid.bool()
    return depth.masked_fill(drop, 0.0)


# ----------------------------------------------------------------------- evaluation set

def eval_sample_indices(n: int, max_samples: int | None) -> list[int]:
    """MultiMAE's evaluation subset: the first ``max_samples`` of a seed-0 permutation of the
    ``n`` sorted samples (numpy's legacy generator, as ``np.random.seed(0)``), in that order."""
    if max_samples is None:
        return list(range(n))
    return np.random.RandomState(EVAL_SAMPLE_SEED).permutation(n)[:max_samples].tolist()


class SelectedSamples(Dataset):
    """``base`` restricted to ``indices`` (in that order); other attributes come from ``base``."""

    def __init__(self, base: Dataset, indices: list[int]) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.base[self.indices[index]]

    def sample_ids(self) -> list[str]:
        ids = self.base.sample_ids()
        return [ids[i] for i in self.indices]

    def __getattr__(self, name: str) -> Any:   # set_epoch, skipped, ...
        if name in ("base", "indices"):
            raise AttributeError(name)
        return getattr(self.base, name)


def select_eval_samples(loader: MultiModalLoader, max_samples: int | None, where: str = "") -> MultiModalLoader:
    """``loader`` over :func:`eval_sample_indices` of its (sorted, folder-layout) samples."""
    if max_samples is None:
        return loader
    if isinstance(loader.dataset, IterableDataset):
        raise ValueError(f"data.max_eval_samples={max_samples} needs the folder layout (sorted file "
                         f"stems); {where or 'the evaluation split'} is read from shards")
    subset = SelectedSamples(loader.dataset, eval_sample_indices(len(loader.dataset), max_samples))
    return MultiModalLoader(subset, sampler=EpochSampler(len(subset), shuffle=False, pad=False),
                            batch_size=loader.batch_size, num_workers=loader.num_workers,
                            collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=False)
