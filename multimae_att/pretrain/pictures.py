"""Training pictures: one PNG per modality, a row per sample: input | attention | mask | reconstruction.

- input: rgb de-normalised, depth min-max scaled per image, semseg in a fixed palette;
- attention: the scoring pass's scores on the token grid, min-max per image, as a heat map
  (grey when no scoring pass ran this step);
- mask: the input where tokens are visible, darkened where hidden, red where thrown (AMT);
- reconstruction: the prediction on hidden patches pasted over the visible input (as MultiMAE's
  visualisations), semseg as the arg-max class.

PIL only (matplotlib is not a dependency). Every operation is batched over pixels; the loop is
over the few samples drawn.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from multimae_att.data import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["save_pictures", "render_modality"]

_GAP = 2  # pixels between panels


def _palette(n: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    pal = torch.randint(40, 256, (n, 3), generator=g, dtype=torch.int64).float() / 255
    pal[0] = torch.tensor([0.1, 0.1, 0.1])
    return pal


_PALETTE = _palette()


def _heat(x: torch.Tensor) -> torch.Tensor:
    """[h, w] in [0, 1] -> [3, h, w]: black -> red -> yellow -> white ramp."""
    return torch.stack([(3 * x).clamp(0, 1), (3 * x - 1).clamp(0, 1), (3 * x - 2).clamp(0, 1)])


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


def _to_rgb(modality: str, x: torch.Tensor, size: tuple[int, int], ref: torch.Tensor | None = None
            ) -> torch.Tensor:
    """One sample of a modality -> float [3, H, W] in [0, 1]. ``ref`` fixes the depth range."""
    if modality in ("rgb", "norm_rgb"):
        if modality == "norm_rgb":
            return _minmax(x.float())
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (x.float() * std + mean).clamp(0, 1)
    if modality == "depth":
        r = x.float() if ref is None else ref.float()
        lo, hi = r.min(), r.max()
        y = ((x.float() - lo) / (hi - lo)).clamp(0, 1) if hi > lo else torch.zeros_like(x.float())
        return y.expand(3, -1, -1)
    labels = x.argmax(0) if x.is_floating_point() else x
    img = _PALETTE[labels.long().clamp(0, 255)].permute(2, 0, 1)
    return F.interpolate(img[None], size=size, mode="nearest")[0]


def _patch_mask(mask: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(mask.float().reshape(1, 1, *grid), size=size, mode="nearest")[0]


def render_modality(modality: str, inputs: torch.Tensor, pred: torch.Tensor | None,
                    hidden: torch.Tensor, thrown: torch.Tensor | None, scores: torch.Tensor | None,
                    grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """uint8 [H', W', 3] picture for samples ``inputs[i]`` (one row each, 4 panels)."""
    rows = []
    for i in range(inputs.shape[0]):
        inp = _to_rgb(modality, inputs[i], size)
        hid = _patch_mask(hidden[i], grid, size)
        thr = _patch_mask(thrown[i], grid, size) if thrown is not None else torch.zeros_like(hid)
        att = (_heat(_minmax(scores[i].float().reshape(grid))) if scores is not None
               else torch.full((3, *grid), 0.5))
        att = F.interpolate(att[None], size=size, mode="nearest")[0]
        red = torch.tensor([0.8, 0.1, 0.1]).view(3, 1, 1).expand_as(inp)
        mask_panel = torch.where(thr > 0, red, torch.where(hid > 0, inp * 0.25, inp))
        if pred is not None:
            p = pred[i].detach().float().cpu()
            rec = _to_rgb(modality, p, size, ref=inputs[i] if modality == "depth" else None)
            rec = torch.where(hid > 0, rec, inp)
        else:
            rec = torch.zeros_like(inp)
        panels = [inp, att, mask_panel, rec]
        gap = torch.ones(3, size[0], _GAP)
        rows.append(torch.cat(sum(([p, gap] for p in panels), [])[:-1], dim=2))
        rows.append(torch.ones(3, _GAP, rows[-1].shape[2]))
    img = torch.cat(rows[:-1], dim=1)
    return (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def save_pictures(directory: str | Path, step: int, inputs: Mapping[str, torch.Tensor],
                  preds: Mapping[str, torch.Tensor], hidden: Mapping[str, torch.Tensor],
                  thrown: Mapping[str, torch.Tensor] | None, scores: Mapping[str, torch.Tensor] | None,
                  grids: Mapping[str, tuple[int, int]], num_samples: int = 2) -> list[Path]:
    """Write ``<directory>/step_<step>_<modality>.png`` for every input modality; returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ref = inputs.get("rgb", inputs.get("depth"))
    size = tuple(ref.shape[-2:]) if ref is not None else tuple(4 * s for s in inputs["semseg"].shape[-2:])
    paths = []
    for m, x in inputs.items():
        n = min(num_samples, x.shape[0])
        pick = lambda d: None if d is None or m not in d else d[m][:n].detach().float().cpu()  # noqa: E731
        img = render_modality(m, x[:n].detach().cpu(), None if m not in preds else preds[m][:n],
                              hidden[m][:n].cpu(), pick(thrown), pick(scores), grids[m], size)
        path = directory / f"step_{step:08d}_{m}.png"
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths
