"""Hard Patches Mining's easy-to-hard curriculum (registered as strategy ``hpm``).

Based on HPM (Wang et al., "Hard Patches Mining for Masked Image Modeling", CVPR 2023): of the
tokens to hide, a share ``s(t)`` is the top of the scores (HPM: the highest predicted
reconstruction losses) and the rest is drawn uniformly at random among the remaining tokens;
``s`` grows linearly over training, so masking starts random (easy) and becomes harder.

Differences from HPM's code (``generate_mask``), same idea:

- ``s(t) = share_start + (share_end - share_start) * t`` with ``t`` the run's progress per step
  (HPM: ``0.5 * (epoch + 1) / epochs``, per epoch); defaults 0 -> 0.5 as HPM's;
- per modality, on the exact hidden count of each sample's budget (``N_m - v``), with
  ``floor(s * (N_m - v))`` top tokens as HPM's ``int(...)``;
- batched: one sort for the ranks and one for the random part (HPM loops over the samples and
  shuffles with NumPy's global generator); it works with either score source
  (``masking.score_source``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from multimae_att.masking.strategies import draw, hide_first, rank_desc, register_strategy, token_valid

__all__ = ["hpm_share"]


def hpm_share(progress: float, share_start: float = 0.0, share_end: float = 0.5) -> float:
    """Share of the hidden tokens taken from the top of the scores at ``progress`` in [0, 1]."""
    t = min(max(float(progress), 0.0), 1.0)
    return float(share_start) + (float(share_end) - float(share_start)) * t


def _check_share(param: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"masking strategy 'hpm': {param}={value} must lie in [0, 1]")


@register_strategy("hpm", {"share_start": 0.0, "share_end": 0.5}, uses_progress=True,
                   origin="HPM (Hard Patches Mining)",
                   summary="easy-to-hard: a growing share of the hidden tokens from the top of the "
                           "scores, the rest uniformly random")
def hpm(s: Tensor, n: Tensor, hide: Tensor, generator=None, *, share_start: float = 0.0,
        share_end: float = 0.5, progress: float = 1.0):
    """Hide ``top = floor(share * (N_m - v))`` highest-scored tokens (ties: lower index first),
    then ``N_m - v - top`` tokens drawn uniformly among the others; ``share`` from
    :func:`hpm_share`. Keys: the top tokens get 2 (above every uniform draw in [0, 1)), the
    others their draw, and the ``N_m - v`` largest keys are hidden: exact counts by construction.
    """
    _check_share("share_start", share_start)
    _check_share("share_end", share_end)
    share = hpm_share(progress, share_start, share_end)
    top = torch.floor(share * hide.double() + 1e-9).long()                        # [B, M]
    valid = token_valid(n, s.shape[-1])
    is_top = rank_desc(torch.where(valid, s, float("-inf"))) < top[..., None]
    u = draw("uniform", s.shape, s.device, generator)
    return hide_first(torch.where(is_top, torch.full_like(u, 2.0), u), n, hide), None
