"""Training pictures a person can read: one figure per input modality, one row per sample.

Panels, each titled:

- **input**: rgb de-normalised, depth in a colour map (range of that sample's input), semseg in
  a fixed palette;
- **scores** (only when this step's masks came from scores; a random-masking step has none):
  the scores on the token grid, with a colour bar naming their source;
- **mask**: the input where tokens are visible, greyed out where hidden, red-striped where
  thrown (AMT), with the per-sample counts; a figure legend says which is which;
- **reconstruction**: the prediction on hidden patches pasted over the visible input (as
  MultiMAE's visualisations; thrown patches stay striped: nothing is predicted there); semseg as
  the arg-max class.

Semseg rows end with a legend of the classes in the picture (names when the dataset gives them:
``<data.root>/semseg_classes.json``). The header gives the step, the masking strategy and the
modality; each row says whether its sample was masked by the strategy or at random
(``masking.prob``, warm-up).

matplotlib (Agg canvas, no pyplot state) draws the figure once; :func:`render_modality` returns
it as a uint8 ``[H, W, 3]`` array that is written as PNG and sent to the experiment trackers
(the run skeleton's ``log_image``). Cost: ~0.6 s of a CPU core per modality at 224 px, every
``log.pictures_every`` steps, on the main process only.
"""
from __future__ import annotations

import colorsys
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from multimae_att.data import IMAGENET_MEAN, IMAGENET_STD
from multimae_att.modalities import get_modality

__all__ = ["PictureInfo", "render_modality", "save_pictures", "picture_info",
           "read_semseg_class_names", "semseg_palette", "PANEL_TITLES"]

PANEL_TITLES = ("input", "scores", "mask", "reconstruction")
THROWN_RGB = (0.85, 0.12, 0.12)
DEPTH_CMAP, SCORE_CMAP = "viridis", "inferno"
MAX_CLASSES_IN_LEGEND = 10
PANEL_INCHES, DPI = 2.0, 100


@dataclass(frozen=True)
class PictureInfo:
    """What a picture's header and colour bars say (fixed for a run)."""

    strategy: str = ""
    score_source: str = "scores"
    class_names: Mapping[int, str] | None = None


# The first 20 classes get matplotlib's qualitative tab10 colours, then their light tab20 partners
# (written out: no matplotlib import for the palette): the classes of small label sets, such as
# the synthetic scenes', are told apart at a glance.
_QUALITATIVE = ("1f77b4 ff7f0e 2ca02c d62728 9467bd 8c564b e377c2 7f7f7f bcbd22 17becf "
                "aec7e8 ffbb78 98df8a ff9896 c5b0d5 c49c94 f7b6d2 c7c7c7 dbdb8d 9edae5").split()


def semseg_palette(n: int = 256) -> np.ndarray:
    """Fixed colours ``[n, 3]`` in [0, 1]: tab10 then light tab20 for classes 0-19, then hues
    spaced by the golden angle; the same class has the same colour in every picture and run."""
    out = np.empty((n, 3))
    for k in range(n):
        if k < len(_QUALITATIVE):
            out[k] = [int(_QUALITATIVE[k][i:i + 2], 16) / 255 for i in (0, 2, 4)]
            continue
        hue = (k * 0.618033988749895 + 0.08) % 1.0
        out[k] = colorsys.hsv_to_rgb(hue, (0.55, 0.85, 0.7)[k % 3], (0.95, 0.75)[(k // 3) % 2])
    return out


_PALETTE = semseg_palette()


def read_semseg_class_names(root: str | os.PathLike | None) -> dict[int, str] | None:
    """``{index: name}`` from ``semseg_classes.json`` (``{"0": "wall", ...}``) in the dataset
    folder ``root`` (or the folder of a shard index / list file); None when there is none."""
    if not root or "://" in str(root) or str(root).startswith("pipe:"):
        return None
    folder = Path(root)
    folder = folder if folder.is_dir() else folder.parent
    for candidate in (folder, folder.parent):
        path = candidate / "semseg_classes.json"
        if path.is_file():
            try:
                return {int(k): str(v) for k, v in json.loads(path.read_text()).items()}
            except (ValueError, AttributeError) as err:
                raise ValueError(f"{path}: expected {{\"index\": \"name\", ...}} ({err})") from None
    return None


def picture_info(cfg: Any) -> PictureInfo:
    """The header facts of a pretraining config: strategy, score source, semseg class names."""
    m = cfg.masking
    source = getattr(m, "score_source", "attention")
    if source == "attention":
        query = "global token's" if m.score_query == "global" else "mean"
        source = f"attention ({query} query, layer {m.score_layer})"
    if m.cache.enabled:
        source += ", cached"
    return PictureInfo(strategy=m.strategy, score_source=source,
                       class_names=read_semseg_class_names(cfg.data.root))


# ----------------------------------------------------------------------------- pixels
def _to_rgb(modality: str, x: torch.Tensor, size: tuple[int, int], depth_range: tuple[float, float]
            ) -> np.ndarray:
    """One sample of a modality -> float ``[H, W, 3]`` in [0, 1] at ``size``, coloured as the
    modality table says (``picture``: image, colormap or palette)."""
    picture = get_modality(modality).picture
    if picture == "image":
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        img = (x.float() * std + mean).clamp(0, 1)
        return img.permute(1, 2, 0).numpy()
    if picture == "colormap":
        from matplotlib import colormaps

        lo, hi = depth_range
        y = ((x.float()[0] - lo) / (hi - lo)).clamp(0, 1) if hi > lo else torch.zeros_like(x.float()[0])
        return colormaps[DEPTH_CMAP](y.numpy())[..., :3]
    if picture != "palette":
        raise ValueError(f"no picture convention for modality {modality!r} (the modality table has none)")
    labels = _labels(x)
    img = torch.from_numpy(_PALETTE)[labels.clamp(0, len(_PALETTE) - 1)].permute(2, 0, 1)
    return F.interpolate(img[None], size=size, mode="nearest")[0].permute(1, 2, 0).numpy()


def _labels(x: torch.Tensor) -> torch.Tensor:
    """semseg labels ``[h, w]`` from labels or logits ``[C, h, w]``."""
    return (x.argmax(0) if x.is_floating_point() else x).long()


def _patches(mask: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """bool ``[N]`` on the token grid -> bool ``[H, W, 1]`` at pixel size."""
    up = F.interpolate(mask.float().reshape(1, 1, *grid), size=size, mode="nearest")[0, 0]
    return up.numpy()[..., None] > 0


def _grey_out(img: np.ndarray) -> np.ndarray:
    """Hidden patches: a dim grey of the input's luminance (no colour, so no colour-map value
    can be mistaken for it)."""
    lum = img @ np.array([0.299, 0.587, 0.114])
    return np.repeat((0.15 + 0.3 * lum)[..., None], 3, axis=-1)


def _stripes(img: np.ndarray, thrown: np.ndarray) -> np.ndarray:
    """Thrown patches (bool ``[H, W, 1]``): red and white diagonal stripes (drawn in the pixels,
    not as matplotlib patches: ~free even when AMT throws 40 % of 196 tokens)."""
    h, w = img.shape[:2]
    period = max(4, round(h / 16))
    yy, xx = np.mgrid[:h, :w]
    red = (((yy + xx) % period) < period / 2)[..., None]
    stripes = np.where(red, np.asarray(THROWN_RGB), 1.0)
    return np.where(thrown, stripes, img)


# ----------------------------------------------------------------------------- figure
def render_modality(modality: str, inputs: torch.Tensor, preds: torch.Tensor | None,
                    hidden: torch.Tensor, thrown: torch.Tensor | None, scores: torch.Tensor | None,
                    grid: tuple[int, int], size: tuple[int, int], step: int = 0,
                    info: PictureInfo = PictureInfo(), guided: torch.Tensor | None = None) -> np.ndarray:
    """The figure of ``modality`` for samples ``inputs[i]`` as a uint8 ``[H, W, 3]`` array.

    ``inputs`` ``[n, C, h, w]`` (semseg ``[n, h, w]`` labels), ``preds`` the output adapter's
    ``[n, C, h, w]`` or None, ``hidden`` / ``thrown`` bool ``[n, N]`` (1 = hidden / thrown),
    ``scores`` float ``[n, N]`` or None (no score panel), ``grid`` the token grid of this
    modality, ``size`` the display size of a panel, ``guided`` bool ``[n]`` or None.
    """
    fig = build_figure(modality, inputs, preds, hidden, thrown, scores, grid, size, step, info, guided)
    return figure_array(fig)


def build_figure(modality, inputs, preds, hidden, thrown, scores, grid, size, step=0,
                 info: PictureInfo = PictureInfo(), guided=None):
    """The matplotlib ``Figure`` behind :func:`render_modality` (same arguments)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    n = inputs.shape[0]
    titles = [t for t in PANEL_TITLES if t != "scores" or scores is not None]
    semseg = get_modality(modality).picture == "palette"     # class labels: a palette and a legend
    cols = len(titles) + (1 if semseg else 0)               # semseg: a legend column
    widths = [1.0] * len(titles) + ([0.9] if semseg else [])
    fig = Figure(figsize=(PANEL_INCHES * sum(widths) + (0.5 if scores is not None else 0.0),
                          PANEL_INCHES * n + 0.9), dpi=DPI, layout="constrained")
    axes = np.asarray(fig.subplots(n, cols, squeeze=False, width_ratios=widths))
    header = f"step {step}  ·  strategy: {info.strategy or '?'}  ·  modality: {modality}"
    fig.suptitle(header, fontsize=11, fontweight="bold")
    for i in range(n):
        x = inputs[i].detach().float().cpu() if not semseg else inputs[i].detach().cpu()
        depth_range = (float(x.min()), float(x.max())) if get_modality(modality).picture == "colormap" \
            else (0.0, 1.0)
        inp = _to_rgb(modality, x, size, depth_range)
        hid = _patches(hidden[i].cpu(), grid, size)
        thr = thrown[i].cpu() if thrown is not None else torch.zeros_like(hidden[i].cpu())
        thr_px = _patches(thr, grid, size)
        panels: dict[str, Any] = {"input": inp, "mask": _stripes(np.where(hid, _grey_out(inp), inp), thr_px)}
        rec = None
        if preds is not None:
            rec = _to_rgb(modality, preds[i].detach().float().cpu(), size, depth_range)
            panels["reconstruction"] = _stripes(np.where(hid, rec, inp), thr_px)
        n_visible = int(hidden[i].numel() - hidden[i].sum() - thr.sum())
        counts = (f"{n_visible} visible · {int(hidden[i].sum())} hidden"
                  + (f" · {int(thr.sum())} thrown" if thrown is not None else ""))
        for ax, title in zip(axes[i], titles):
            ax.set_xticks([])
            ax.set_yticks([])
            if title == "scores":
                s = scores[i].detach().float().cpu().reshape(grid).numpy()
                im = ax.imshow(s, cmap=SCORE_CMAP, interpolation="nearest")
                bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
                bar.set_label(info.score_source, fontsize=7)
                bar.ax.tick_params(labelsize=6)
                ax.set_title("scores", fontsize=9)
                continue
            if title == "reconstruction" and rec is None:
                ax.text(0.5, 0.5, "no decoder\nfor this modality", ha="center", va="center", fontsize=8)
                ax.set_title(title, fontsize=9)
                continue
            ax.imshow(panels[title], interpolation="nearest")
            label = {"input": "input", "mask": f"mask\n{counts}",
                     "reconstruction": "reconstruction\n(hidden patches predicted)"}[title]
            ax.set_title(label, fontsize=8 if "\n" in label else 9)
        row = f"sample {i}"
        if guided is not None:
            row += "\nmasked by the strategy" if bool(guided[i]) else "\nrandom mask"
        axes[i, 0].set_ylabel(row, fontsize=8)
        if semseg:
            _class_legend(axes[i, -1], x, None if preds is None else _labels(preds[i].detach().cpu()),
                          info.class_names)
    legend = [Patch(facecolor="none", edgecolor="0.4", label="visible: input, encoded"),
              Patch(facecolor="0.3", label="hidden: greyed out, reconstructed")]
    if thrown is not None:
        legend.append(Patch(facecolor="white", edgecolor=THROWN_RGB, hatch="////", linewidth=0,
                            label="thrown: neither encoded nor reconstructed"))
    fig.legend(handles=legend, loc="outside lower center", ncols=len(legend), fontsize=8, frameon=False)
    return fig


def _class_legend(ax, labels: torch.Tensor, predicted: torch.Tensor | None,
                  names: Mapping[int, str] | None) -> None:
    """The classes of the input (and the prediction), most frequent first, with their colours."""
    from matplotlib.patches import Patch

    ax.axis("off")
    shown = labels.flatten() if predicted is None else torch.cat([labels.flatten(), predicted.flatten()])
    classes, counts = shown.unique(return_counts=True)
    order = classes[counts.argsort(descending=True)].tolist()
    handles = [Patch(facecolor=_PALETTE[min(c, len(_PALETTE) - 1)],
                         label=(names or {}).get(c, f"class {c}"))
               for c in order[:MAX_CLASSES_IN_LEGEND]]
    title = "classes" + (f" (+{len(order) - MAX_CLASSES_IN_LEGEND} more)"
                         if len(order) > MAX_CLASSES_IN_LEGEND else "")
    ax.legend(handles=handles, loc="center left", fontsize=7, title=title, title_fontsize=8, frameon=False)


def figure_array(fig) -> np.ndarray:
    """Draw a matplotlib figure on an Agg canvas -> uint8 ``[H, W, 3]``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# ----------------------------------------------------------------------------- outputs
def save_pictures(directory: str | Path, step: int, inputs: Mapping[str, torch.Tensor],
                  preds: Mapping[str, torch.Tensor], hidden: Mapping[str, torch.Tensor],
                  thrown: Mapping[str, torch.Tensor] | None, scores: Mapping[str, torch.Tensor] | None,
                  grids: Mapping[str, tuple[int, int]], num_samples: int = 2,
                  info: PictureInfo = PictureInfo(), guided: torch.Tensor | None = None
                  ) -> dict[str, np.ndarray]:
    """Write ``<directory>/step_<step>_<modality>.png`` for every input modality; returns the
    pictures as ``{modality: uint8 [H, W, 3]}`` (for the trackers).

    ``scores``: the scores the masks were drawn from, or None when they were random (no score
    panel). ``guided``: bool ``[B]``, which samples the strategy masked.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    first, x0 = next(iter(inputs.items()))      # the image size, from any input and its stride level
    size = tuple((get_modality(first).stride or 1) * s for s in x0.shape[-2:])
    pictures = {}
    for m, x in inputs.items():
        n = min(num_samples, x.shape[0])
        pred, thr, score = (None if d is None or m not in d else d[m][:n] for d in (preds, thrown, scores))
        img = render_modality(m, x[:n], pred, hidden[m][:n], thr, score, grids[m], size, step=step,
                              info=info, guided=None if guided is None else guided[:n])
        Image.fromarray(img).save(directory / f"step_{step:08d}_{m}.png")
        pictures[m] = img
    return pictures
