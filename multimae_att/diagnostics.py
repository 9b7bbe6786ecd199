"""Masking diagnostics: do the scores point at the objects, and what does the mask hide?

Three small, batched functions (no Python loop over samples or tokens, no host sync):

- :func:`token_foreground`: semantic labels ``[B, h, w]`` -> bool ``[B, N]`` foreground tokens on a
  ``(gh, gw)`` token grid; a token is foreground when more than ``threshold`` of its label pixels
  are foreground (labels not in ``background_classes``; synthetic scenes: wall 0 and floor 1).
- :func:`fg_auroc`: per image, the AUROC of the scores for foreground vs background tokens, i.e.
  P(score of a foreground token > score of a background token) + 1/2 P(tie), from average ranks
  (Mann-Whitney U). 1 = every object token outranks every background token (``high`` masking then
  hides objects first), 0.5 = no separation, 0 = the scores point at the background. Images without
  a foreground or a background token have no AUROC (``valid`` is False there).
- :func:`hidden_fg_share`: the share of hidden tokens that lie on foreground, pooled over the batch.
  Under random masking it equals the share of foreground tokens (:func:`fg_share`) in expectation.

Per-image AUROCs are averaged over the images that have one (:func:`mean_fg_auroc`): masking ranks
tokens within an image, so the within-image separation is what decides what ``high`` hides.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["token_foreground", "fg_auroc", "mean_fg_auroc", "hidden_fg_share", "fg_share", "step_diagnostics"]


def token_foreground(labels: torch.Tensor, grid: tuple[int, int], background_classes: Sequence[int],
                     threshold: float = 0.5) -> torch.Tensor:
    """Foreground tokens of ``labels`` (int ``[B, h, w]``) on the token grid ``(gh, gw)``.

    Returns bool ``[B, gh * gw]`` in row-major token order (the order of the modality's tokens):
    True where the share of foreground pixels in the token's cell exceeds ``threshold``. The
    label map is pooled over equal cells when ``h, w`` are multiples of the grid, else adaptively.
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must be [B, h, w], got shape {list(labels.shape)}")
    bg = torch.as_tensor(list(background_classes), dtype=labels.dtype, device=labels.device)
    fg = (~torch.isin(labels, bg)).float().unsqueeze(1)  # [B, 1, h, w]
    share = F.adaptive_avg_pool2d(fg, tuple(grid))        # exact cell means for divisible sizes
    return (share > threshold).flatten(1)


def fg_auroc(scores: torch.Tensor, fg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image AUROC of ``scores`` (float ``[B, N]``) for ``fg`` (bool ``[B, N]``) tokens.

    Returns ``(auroc [B] float64, valid [B] bool)``; ``auroc`` is NaN where ``valid`` is False
    (no foreground or no background token). Ties count one half (average ranks).
    """
    if scores.shape != fg.shape or scores.dim() != 2:
        raise ValueError(f"scores {list(scores.shape)} and fg {list(fg.shape)} must both be [B, N]")
    s = scores.detach().double()
    ordered = s.sort(dim=1).values
    below = torch.searchsorted(ordered, s, right=False)       # tokens scored lower
    upto = torch.searchsorted(ordered, s, right=True)         # tokens scored lower or equal
    rank = (below + upto + 1).double() / 2                    # average 1-based rank within the image
    fg = fg.bool()
    n_fg = fg.sum(dim=1).double()
    n_bg = fg.shape[1] - n_fg
    u = (rank * fg).sum(dim=1) - n_fg * (n_fg + 1) / 2        # Mann-Whitney U of the foreground
    valid = (n_fg > 0) & (n_bg > 0)
    auroc = torch.where(valid, u / (n_fg * n_bg).clamp_min(1), torch.full_like(u, float("nan")))
    return auroc, valid


def mean_fg_auroc(scores: torch.Tensor, fg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of per-image AUROCs, number of images with one)`` as tensors (no host sync);
    divide after summing over batches (or processes). Mean = NaN when the count is 0."""
    auroc, valid = fg_auroc(scores, fg)
    return torch.where(valid, auroc, torch.zeros_like(auroc)).sum(), valid.sum()


def hidden_fg_share(hidden: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """Share of hidden tokens (bool ``[B, N]``, 1 = hidden) that are foreground, over the batch
    (float64 scalar; NaN when nothing is hidden)."""
    if hidden.shape != fg.shape:
        raise ValueError(f"hidden {list(hidden.shape)} and fg {list(fg.shape)} differ in shape")
    hidden = hidden.bool()
    return (hidden & fg.bool()).sum().double() / hidden.sum().double()


def fg_share(fg: torch.Tensor) -> torch.Tensor:
    """Share of foreground tokens (the hidden-foreground share random masking has in expectation)."""
    return fg.bool().double().mean()


def step_diagnostics(labels: torch.Tensor, grids: dict[str, tuple[int, int]], hidden: dict[str, torch.Tensor],
                     scores: dict[str, torch.Tensor] | None, background_classes: Sequence[int]
                     ) -> dict[str, torch.Tensor]:
    """The per-step masking diagnostics of a training batch, as 0-d tensors on the batch's device
    (no host sync; call on log steps only): ``mask/hidden_fg_share`` over every modality's hidden
    tokens and, when ``scores`` exist, ``scores/fg_auroc.<modality>`` (mean over the images that
    have one; NaN when none does) of whatever the masking ranks by (attention or predicted losses:
    ``masking.score_source`` in the run's ``config.yaml``; older runs wrote
    ``attn/fg_auroc.<modality>`` for every source). ``labels``: semseg ``[B, h, w]``; ``grids``:
    modality -> token grid; ``hidden``: modality -> bool ``[B, N_m]``; ``scores``: modality ->
    ``[B, N_m]`` or None."""
    fg = {m: token_foreground(labels, grids[m], background_classes) for m in hidden}
    out = {"mask/hidden_fg_share": hidden_fg_share(torch.cat([hidden[m] for m in hidden], dim=1),
                                                   torch.cat([fg[m] for m in hidden], dim=1))}
    for m, s in (scores or {}).items():
        total, count = mean_fg_auroc(s, fg[m])
        out[f"scores/fg_auroc.{m}"] = total / count        # 0 / 0 = NaN: no image with both classes
    return out
