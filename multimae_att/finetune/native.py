"""Evaluation at label resolution: padded batches of native-size targets, per-sample upsampling.

With ``data.eval_mode=full`` the model sees the whole image resized to the square input size
(``image_size`` x ``image_size``: the encoder's positional grid is built for that size), while
the targets (``semseg``, ``depth``, ``mask_valid``) come untouched at the resolution stored in
the files, as ``<modality>_native``. Samples of one batch may have different label sizes, so
:func:`native_collate` pads them to the largest height and width with values that never count
(semseg: ``ignore_index``; depth: 0, which is invalid; mask_valid: False) and records each
sample's size in ``native_size`` ``[B, 2]`` (height, width). :func:`upsample_to_native` then
resizes every prediction bilinearly to its own sample's label size, all samples in one
``grid_sample`` call (no loop over samples), on the padded canvas.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from multimae_att.data import collate

__all__ = ["NATIVE_SUFFIX", "native_collate", "make_native_collate", "upsample_to_native"]

NATIVE_SUFFIX = "_native"


def _pad_value(key: str, ignore_index: int) -> Any:
    modality = key[:-len(NATIVE_SUFFIX)]
    if modality == "semseg":
        return ignore_index
    if modality in ("depth", "mask_valid"):   # depth 0 = invalid pixel; mask_valid False
        return 0
    raise KeyError(f"native_collate: no padding value for {key!r}")


def native_collate(samples: Sequence[Mapping[str, Any]], ignore_index: int = 255) -> dict[str, Any]:
    """:func:`multimae_att.data.collate` plus padded ``*_native`` targets and ``native_size``.

    ``*_native`` tensors are ``[..., h_i, w_i]`` per sample (semseg ``[h, w]`` int64, depth
    ``[1, h, w]`` float, mask_valid ``[1, h, w]`` bool); the batch holds ``[B, ..., H, W]`` with
    H, W the largest sizes, padded with values that are never counted (see module doc), and
    ``native_size`` int64 ``[B, 2]`` = (h_i, w_i). All native modalities of a sample share one size.
    """
    keys = [k for k in samples[0] if k.endswith(NATIVE_SUFFIX)]
    batch = collate([{k: v for k, v in s.items() if k not in keys} for s in samples])
    if not keys:
        return batch
    sizes = torch.tensor([tuple(s[keys[0]].shape[-2:]) for s in samples], dtype=torch.int64)
    height, width = (int(v) for v in sizes.max(0).values)
    for key in keys:
        first = samples[0][key]
        out = torch.full((len(samples), *first.shape[:-2], height, width),
                         _pad_value(key, ignore_index), dtype=first.dtype)
        for i, s in enumerate(samples):   # the copy a stack would do, into a larger canvas
            h, w = s[key].shape[-2:]
            if (h, w) != tuple(sizes[i].tolist()):
                raise ValueError(f"{batch['sample_id'][i]}: {key} is {h}x{w} but "
                                 f"{keys[0]} is {tuple(sizes[i].tolist())}")
            out[i, ..., :h, :w] = s[key]
        batch[key] = out
    batch["native_size"] = sizes
    return batch


def make_native_collate(ignore_index: int) -> Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]:
    """A picklable :func:`native_collate` for DataLoader workers."""
    return partial(native_collate, ignore_index=ignore_index)


def upsample_to_native(pred: torch.Tensor, sizes: torch.Tensor, out_hw: Sequence[int]) -> torch.Tensor:
    """Resize each sample's prediction bilinearly to its own label size, on a padded canvas.

    pred: float ``[B, C, h, w]`` (logits or depth); sizes: int ``[B, 2]`` target (height,
    width) per sample; out_hw: (H, W) >= every size. Returns ``[B, C, H, W]`` float32 where
    ``[i, :, :h_i, :w_i]`` equals ``F.interpolate(pred[i:i+1], (h_i, w_i), mode='bilinear',
    align_corners=False)`` (up to float rounding) and the rest repeats the border (the padded
    targets there never count). Pixel centres map as (y + 0.5) * h / h_i - 0.5, clamped to the
    image, which is what ``grid_sample`` computes for the normalised grid below with
    ``align_corners=False`` and border padding.
    """
    b = pred.shape[0]
    height, width = int(out_hw[0]), int(out_hw[1])
    sizes = sizes.to(pred.device, torch.float32)
    ys = torch.arange(height, device=pred.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=pred.device, dtype=torch.float32) + 0.5
    gy = 2.0 * ys[None, :] / sizes[:, 0:1] - 1.0                 # [B, H]
    gx = 2.0 * xs[None, :] / sizes[:, 1:2] - 1.0                 # [B, W]
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # [B, H, W, 2]
    return F.grid_sample(pred.float(), grid.expand(b, height, width, 2), mode="bilinear",
                         padding_mode="border", align_corners=False)
