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
(source index ``floor(i * in / out)``), so depth values are never mixed across edges. LSJ's
rescale resamples only the crop window (:func:`resized_crop`: the same source pixels and weights
as resizing the whole image, then padding and cropping; labels, depth and validity bit-identical,
RGB within 1 grey level on ~3 values in 10^5, see :func:`resize_window`). Brightness,
contrast, saturation, hue and greyscale follow albumentations' 8-bit arithmetic (lookup tables,
truncation, OpenCV's integer grey weights and 8-bit HSV with hue in 2-degree steps), each evaluated
once per table entry and looked up per pixel (bit-identical to evaluating it per pixel). Randomness: one
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
    "bilinear_taps",
    "color_jitter",
    "eval_sample_indices",
    "make_recipe",
    "multimae_depth_input",
    "nearest_index",
    "plane_size",
    "resize",
    "resize_planes",
    "resize_window",
    "resized_crop",
    "select_eval_samples",
    "side_resize_size",
    "to_gray",
    "to_planes",
    "trimmed_standardize_depth",
]

PAD_RGB = 128.0                # MultiMAE's PadIfNeeded value for images
# pad_to's fill per plane (rgb grey, padding marked); every other plane 0
_PAD_VALUES = {"rgb": PAD_RGB, "padding": True}
LSJ_SCALE = (0.1, 2.0)         # RandomScale(scale_limit=(0.1 - 1, 2.0 - 1))
NYU_GREY_P = 0.3
WINDOW_AREA = 0.8              # resized_crop resamples RGB in the window below this share of the image
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


def bilinear_taps(n_in: int, n_out: int, start: int, stop: int) -> tuple[torch.Tensor, ...]:
    """The two source taps of output pixels ``start .. stop - 1`` of a bilinear resize of one axis
    from ``n_in`` to ``n_out`` (half-pixel centres, no antialiasing), on torch's CPU kernel's grid:
    float32 position ``max(scale (i + 1/2) - 1/2, 0)``, ``scale = in / out`` (float32), evaluated
    as one fused multiply-add as the kernel is compiled (exact in float64, then rounded once);
    ``i0 = floor``, ``i1 = i0 + 1`` (``i0`` at the last pixel), ``w1 = position - i0``, ``w0 = 1 - w1``.
    Same size: the identity (the kernel's shortcut). Returns ``i0, i1`` int64 and ``w0, w1`` float32."""
    i = np.arange(start, stop)
    if n_in == n_out:
        return (torch.from_numpy(i), torch.from_numpy(i),
                torch.ones(len(i), dtype=torch.float32), torch.zeros(len(i), dtype=torch.float32))
    scale = np.float32(n_in) / np.float32(n_out)
    pos = (np.float64(scale) * (i.astype(np.float32) + np.float32(0.5)) - 0.5).astype(np.float32)
    pos = np.maximum(pos, np.float32(0))
    i0 = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
    w1 = np.clip(pos - i0.astype(np.float32), 0, 1).astype(np.float32)
    i1 = i0 + (i0 < n_in - 1)
    return tuple(torch.from_numpy(a) for a in (i0, i1, np.float32(1) - w1, w1))


def resize_window(x: torch.Tensor, size: tuple[int, int], top: int, left: int, height: int, width: int,
                  bilinear: bool) -> torch.Tensor:
    """Rows ``top .. top + height - 1`` and columns ``left .. left + width - 1`` of
    ``resize(x, size, bilinear)``, computed from the source pixels they use only (the window must
    lie inside ``size``). Nearest: the same source indices, so the same values, bit for bit.
    Bilinear: the same taps and weights (:func:`bilinear_taps`), each output pixel
    ``(x00 w0 + x01 w1) v0 + (x10 w0 + x11 w1) v1`` (columns blended first, as torch's kernel) in
    float32, rounded and clipped; the kernel fuses some of these multiply-adds (which ones depends on
    its code path), so a float result can differ in the last bit, and the rounding of a value within
    that bit of a half flips: at most 1 grey level, on ~1 value in 10^4 (measured over random
    windows; tests/finetune/test_finetune_lsj_window.py)."""
    h_in, w_in = x.shape[-2:]
    if not bilinear:
        rows = nearest_index(h_in, size[0])[top:top + height]
        cols = nearest_index(w_in, size[1])[left:left + width]
        return x[:, rows[:, None], cols[None, :]]
    if (h_in, w_in) == tuple(size):   # resize() returns x itself
        return x[:, top:top + height, left:left + width]
    r0, r1, v0, v1 = bilinear_taps(h_in, size[0], top, top + height)
    c0, c1, w0, w1 = bilinear_taps(w_in, size[1], left, left + width)
    top_in, left_in = int(r0[0]), int(c0[0])           # the source window the taps read
    src = x[:, top_in:int(r1[-1]) + 1, left_in:int(c1[-1]) + 1].float()
    # columns first; every gather along a contiguous dim (hence the transposes): several times
    # faster in torch than index_select along the last dim
    cols = src.transpose(1, 2).contiguous()                                   # [C, W read, H read]
    cols = _blend(cols, c0 - left_in, c1 - left_in, w0, w1)                   # [C, width, H read]
    rows = _blend(cols.transpose(1, 2).contiguous(), r0 - top_in, r1 - top_in, v0, v1)
    return rows.round_().clamp_(0, 255)                                       # [C, height, width]


def _blend(x: torch.Tensor, i0: torch.Tensor, i1: torch.Tensor, w0: torch.Tensor,
           w1: torch.Tensor) -> torch.Tensor:
    """``x[:, i0] w0 + x[:, i1] w1`` along dim 1 of ``x`` ``[C, N, M]``: ``[C, len(i0), M]``."""
    return x.index_select(1, i0).mul_(w0[:, None]).add_(x.index_select(1, i1).mul_(w1[:, None]))


def resized_crop(planes: Planes, size: tuple[int, int], top: int, left: int, target: int) -> Planes:
    """``random_crop``'s ``target`` x ``target`` window at (top, left) of ``pad_to(resize_planes(
    planes, size), target)``, resampling only the pixels the window shows (:func:`resize_window`);
    the part past the resized image is filled as :func:`pad_to` fills it."""
    height, width = min(target, size[0] - top), min(target, size[1] - left)
    if height < 1 or width < 1 or (height < target and top) or (width < target and left):
        raise ValueError(f"crop ({top}, {left}) of {target} px does not start inside the resized "
                         f"{size} image (pad_to pads at the bottom/right only)")
    out = {}
    for m, x in planes.items():
        if m == "rgb" and height * width > WINDOW_AREA * size[0] * size[1]:
            # nearly all of it is shown: torch's one-pass kernel on the whole image is cheaper
            window = resize(x, size, bilinear=True)[:, top:top + height, left:left + width]
        else:
            window = resize_window(x, size, top, left, height, width, bilinear=m == "rgb")
        if (height, width) == (target, target):
            out[m] = window
        else:
            out[m] = torch.full((x.shape[0], target, target), _PAD_VALUES.get(m, 0), dtype=x.dtype)
            out[m][:, :height, :width] = window
    return out


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
    return {m: F.pad(x, (0, right, 0, bottom), value=_PAD_VALUES.get(m, 0)) for m, x in planes.items()}


def crop(planes: Planes, top: int, left: int, height: int, width: int) -> Planes:
    return {m: x[:, top:top + height, left:left + width] for m, x in planes.items()}


def crop_offsets(size: tuple[int, int], target: int, rng: np.random.Generator) -> tuple[int, int]:
    """albumentations ``RandomCrop``'s (top, left) on an image of ``size`` (each side at least
    ``target``): int((H - target) * u), then the same for W, u ~ U[0, 1)."""
    return int((size[0] - target) * rng.random()), int((size[1] - target) * rng.random())


def random_crop(planes: Planes, target: int, rng: np.random.Generator) -> Planes:
    """albumentations ``RandomCrop`` (offsets: :func:`crop_offsets`)."""
    return crop(planes, *crop_offsets(plane_size(planes), target, rng), target, target)


def center_crop(planes: Planes, target: int) -> Planes:
    h, w = plane_size(planes)
    return crop(planes, (h - target) // 2, (w - target) // 2, target, target)


# -------------------------------------------------------------------------------- colour

def _lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for a 1-D ``table`` (index_select: several times faster than ``table[index]``)."""
    return table.index_select(0, index.reshape(-1)).reshape(index.shape)


def grey(rgb: torch.Tensor) -> torch.Tensor:
    """OpenCV ``RGB2GRAY`` of an 8-bit image ``[3, H, W]`` (integer weights): ``[1, H, W]``."""
    r, g, b = rgb.to(torch.int32)   # the weighted sums stay below 2^23
    wr, wg, wb = _GREY_WEIGHTS
    return ((wr * r + wg * g + wb * b + (1 << 14)) >> 15)[None].to(rgb.dtype)


def to_gray(rgb: torch.Tensor) -> torch.Tensor:
    """albumentations ``ToGray``: grey value in all three channels."""
    return grey(rgb).expand(3, -1, -1).clone()


def _lut(rgb: torch.Tensor, table: np.ndarray) -> torch.Tensor:
    """8-bit lookup (OpenCV ``LUT``); ``table`` float [256], clipped to [0, 255] and truncated."""
    return _lookup(torch.from_numpy(np.clip(table, 0, 255).astype(np.uint8)).to(rgb.dtype), rgb.to(torch.int32))


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
    # the same float64 arithmetic, once per (channel value, grey value) pair, then looked up
    value, grey_value = torch.arange(256, dtype=torch.float64)[:, None], torch.arange(256, dtype=torch.float64)
    table = (value * factor + grey_value * (1 - factor)).round().clamp(0, 255).to(rgb.dtype).reshape(-1)
    return _lookup(table, rgb.to(torch.int32) * 256 + grey(rgb).to(torch.int32))


def _hsv_tables() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OpenCV's 8-bit HSV tables. ``sdiv``, ``hdiv`` [256] int32: the fixed-point divisors of
    RGB2HSV. ``coef`` [3 (r, g, b), 256] float32: HSV2RGB gives each channel ``v (1 - s c)`` with
    ``c`` = 0 (v), 1 (p), frac (q) or 1 - frac (t), chosen by the hue's sector; the same float32
    products as OpenCV's sector table (x 0 and x 1 are exact), so no per-pixel selection is needed."""
    i = torch.arange(256, dtype=torch.float64)
    sdiv = torch.where(i > 0, torch.round((255 << _HSV_SHIFT) / i.clamp(min=1)), 0.0).int()
    hdiv = torch.where(i > 0, torch.round((180 << _HSV_SHIFT) / (6.0 * i.clamp(min=1))), 0.0).int()
    hf = torch.arange(256).float() * (6.0 / 180.0)
    hf = hf - 6.0 * torch.floor(hf / 6.0)
    sector = torch.floor(hf)
    frac = hf - sector
    values = torch.stack([torch.zeros(256), torch.ones(256), frac, 1.0 - frac])       # v, p, q, t
    order = torch.tensor([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])   # (b, g, r)
    pick = order[sector.long().clamp(0, 5)].flip(-1).T                                 # [3 (r, g, b), 256]
    return sdiv, hdiv, values.gather(0, pick)


_SDIV, _HDIV, _HSV_COEF = _hsv_tables()


def _rgb_to_hsv8(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OpenCV ``RGB2HSV`` for 8 bit (integer tables): hue 0..179, saturation and value 0..255
    (int32; the fixed-point products stay below 2^28)."""
    r, g, b = rgb.to(torch.int32)
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _lookup(_SDIV, v) + half) >> _HSV_SHIFT
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _lookup(_HDIV, diff) + half) >> _HSV_SHIFT
    return torch.where(h < 0, h + 180, h), s, v


def _hsv8_to_rgb(coef: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """OpenCV ``HSV2RGB`` for 8 bit (float32 sectors, rounded down): ``[3, H, W]`` float 0..255,
    from each pixel's ``coef`` ``[3, H, W]`` (:func:`_hsv_tables`), saturation and value."""
    sf, vf = s.float() * (1.0 / 255.0), v.float() * (1.0 / 255.0)
    return (vf * (1.0 - sf * coef) * 255.0).floor().clamp(0, 255)


def adjust_hue(rgb: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the hue by ``shift`` of the colour circle in OpenCV's 8-bit HSV (albumentations:
    hue lookup ``uint8((h + 180 shift) mod 180)``)."""
    if shift == 0:
        return rgb
    h, s, v = _rgb_to_hsv8(rgb)
    lut = torch.from_numpy(np.mod(np.arange(256, dtype=np.int16) + 180 * shift, 180).astype(np.uint8)).long()
    coef = _HSV_COEF[:, lut]                     # [3, 256]: old hue -> the new hue's coefficients
    coef = torch.stack([_lookup(c, h) for c in coef])
    return _hsv8_to_rgb(coef, s, v).to(rgb.dtype)


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
    scaled = (max(int(h * s), 1), max(int(w * s), 1))
    # RandomCrop's offsets on the padded image (pad_to: at least `size`), then only the crop is
    # resampled: the same pixels as resize -> pad -> crop (resized_crop), about half the time at s > 1
    top, left = crop_offsets((max(scaled[0], size), max(scaled[1], size)), size, rng)
    return resized_crop(planes, scaled, top, left, size)


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
