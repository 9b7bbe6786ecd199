"""Attention-guided strategies (registered into :data:`~multimae_att.masking.STRATEGIES`).

All work on the padded stacks described in :mod:`multimae_att.masking.strategies`:
``s`` float ``[B, M, N_max]`` (``[B, M, H, N_max]`` for ``heads``), ``n`` int64 ``[M]`` token
counts, ``hide`` int64 ``[B, M]`` = ``N_m - visible``. Higher score = more attended.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from multimae_att.masking.strategies import draw, hide_first, rank_desc, register_strategy, token_valid

__all__ = ["standardise"]


def _check_unit(name: str, param: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"masking strategy {name!r}: {param}={value} must lie in [0, 1]")
    return value


def standardise(s: Tensor, n: Tensor) -> Tensor:
    """Per-image-and-modality z-scores over the real tokens of ``s`` ``[B, M, N_max]``.

    Constant scores give z = 0 (the standard deviation is floored at 1e-6)."""
    valid = token_valid(n, s.shape[-1])
    cnt = n.clamp_min(1)[None, :, None].to(s.dtype)
    mean = (s * valid).sum(-1, keepdim=True) / cnt
    var = (((s - mean) * valid) ** 2).sum(-1, keepdim=True) / cnt
    return (s - mean) / var.sqrt().clamp_min(1e-6)


@register_strategy("high", {}, deterministic=True, origin="AttMask / MultiMAE attention study",
                   summary="hide the most-attended tokens, keep the least-attended visible")
def high(s: Tensor, n: Tensor, hide: Tensor, generator=None):
    """Hide the ``N_m - v`` highest-scored tokens (ties: lower token index hidden first)."""
    return hide_first(s, n, hide), None


@register_strategy("low", {}, deterministic=True, origin="AttMask (low-attention ablation)",
                   summary="inverse of high: hide the least-attended tokens")
def low(s: Tensor, n: Tensor, hide: Tensor, generator=None):
    """Hide the ``N_m - v`` lowest-scored tokens (ties: lower token index hidden first)."""
    return hide_first(-s, n, hide), None


@register_strategy("noisy", {"alpha": 0.5}, origin="MultiMAE attention-masking study",
                   summary="rank by (1-alpha)*z + alpha*eps: alpha=0 is high, alpha=1 is random")
def noisy(s: Tensor, n: Tensor, hide: Tensor, generator=None, *, alpha: float = 0.5):
    """Hide the top of ``(1 - alpha) * z + alpha * eps``, ``z`` per-image-and-modality z-scores,
    ``eps ~ N(0, 1)``. We interpolate rather than add ``alpha * eps`` so that the two ends are
    exact: ``alpha = 0`` is ``high`` (it uses the raw scores, so ties break identically) and
    ``alpha = 1`` ranks by noise only, independently of the scores (uniform random masking).
    """
    alpha = _check_unit("noisy", "alpha", alpha)
    if alpha == 0.0:
        return hide_first(s, n, hide), None
    eps = draw("normal", s.shape, s.device, generator)
    return hide_first((1.0 - alpha) * standardise(s, n) + alpha * eps, n, hide), None


@register_strategy("heads", {"k": 4, "per_sample": False}, per_head=True,
                   origin="MultiMAE attention-masking study",
                   summary="high on scores averaged over a random subset of k heads, drawn per call")
def heads(s: Tensor, n: Tensor, hide: Tensor, generator=None, *, k: int = 4,
          per_sample: bool = False):
    """``s`` is ``[B, M, H, N_max]``. A random subset of ``k`` of the ``H`` heads is drawn per call
    (one subset for the whole batch and all modalities, or one per sample with
    ``per_sample=True``), the scores are averaged over it and ``high`` is applied."""
    B, _M, H, _ = s.shape
    if not 1 <= int(k) <= H:
        raise ValueError(f"masking strategy 'heads': k={k} must lie in [1, H={H}]")
    u = draw("uniform", (B if per_sample else 1, H), s.device, generator)
    chosen = (rank_desc(u) < int(k)).to(s.dtype).expand(B, H)  # [B, H], k ones per row
    mean = torch.einsum("bmhn,bh->bmn", s, chosen) / int(k)
    return hide_first(mean, n, hide), None


@register_strategy("hint", {"show_ratio": 0.1, "show_max": 0.1}, origin="AttMask (AttMask-Hint)",
                   summary="high, then reveal tokens drawn from the top show_max share")
def hint(s: Tensor, n: Tensor, hide: Tensor, generator=None, *, show_ratio: float = 0.1,
         show_max: float = 0.1):
    """AttMask-Hint with an exact visible count.

    ``r = floor(show_ratio * (N_m - v))`` hints, capped by ``v`` and by the top-share size
    ``floor(show_max * N_m)``. The defaults reproduce AttMask's: it reveals
    ``int(show_max * mask_ratio * N)`` tokens, i.e. a ``show_max`` share of the hidden ones. To keep
    exactly ``v`` visible, the hidden set is first extended by ``r`` tokens
    (the ``N_m - v + r`` highest-scored are hidden, i.e. the ``r`` best-scored of
    the otherwise visible tokens are hidden in exchange), then ``r`` tokens drawn uniformly from
    the top ``floor(show_max * N_m)`` by score are revealed. Visible = the ``v - r``
    lowest-scored tokens plus the ``r`` hints. Score ties: lower token index ranks higher.
    """
    show_ratio = _check_unit("hint", "show_ratio", show_ratio)
    show_max = _check_unit("hint", "show_max", show_max)
    N = n[None, :].expand_as(hide)
    vis = N - hide
    top = torch.floor(show_max * N.double() + 1e-9).long()
    r = torch.floor(show_ratio * hide.double() + 1e-9).long()
    r = torch.minimum(torch.minimum(r, vis), top)
    hide_ext = hide + r
    valid = token_valid(n, s.shape[-1])
    rank = rank_desc(torch.where(valid, s, float("-inf")))
    # Hints come from the top share that is hidden after the extension (all of it unless the
    # top share is larger than the hidden set); r <= that pool since r <= top and r <= hide_ext.
    pool = torch.minimum(top, hide_ext)[..., None]
    u = draw("uniform", s.shape, s.device, generator)
    reveal = rank_desc(torch.where(rank < pool, u, -1.0)) < r[..., None]
    return (rank < hide_ext[..., None]) & ~reveal & valid, None


def _amt_thrown_range(n: int, v_min: int, v_max: int, throw_ratio: float) -> tuple[int, int]:
    """Fewest and most thrown tokens of a modality, ``min(floor(t n), n - v)``, over ``v`` in
    ``[v_min, v_max]`` visible."""
    t = math.floor(throw_ratio * n + 1e-9)
    return min(t, n - v_max), min(t, n - v_min)


@register_strategy("amt", {"throw_ratio": 0.4, "eps": 1e-6}, origin="AMT (Attention-driven "
                   "Masking and Throwing)", summary="weighted order by attention: first hidden, "
                   "then floor(t*N) thrown, last v visible",
                   thrown_range=lambda n, lo, hi, p: _amt_thrown_range(n, lo, hi, p["throw_ratio"]))
def amt(s: Tensor, n: Tensor, hide: Tensor, generator=None, *, throw_ratio: float = 0.4,
        eps: float = 1e-6):
    """Weighted permutation without replacement of each modality's tokens, weights ``w`` = the
    scores clipped at 0, drawn as a Gumbel top-k: order by ``log(w + eps) + G``, ``G ~ Gumbel``,
    so high-weight tokens tend to come first. The last ``v`` of the order are visible, the
    ``min(floor(throw_ratio * N_m), N_m - v)`` before them are thrown, the rest hidden. Zero
    weights are fine (``log(eps)``); all-zero weights give a uniform random order.
    """
    t = _check_unit("amt", "throw_ratio", throw_ratio)
    if not float(eps) > 0:
        raise ValueError(f"masking strategy 'amt': eps={eps} must be > 0")
    # Gumbel noise as -log(E), E ~ Exp(1); floor E so a (rare) exact 0 cannot give +inf.
    gumbel = -draw("exponential", s.shape, s.device, generator).clamp_min(1e-30).log()
    key = torch.log(s.clamp_min(0) + float(eps)) + gumbel
    valid = token_valid(n, s.shape[-1])
    rank = rank_desc(torch.where(valid, key, float("-inf")))
    n_throw = torch.minimum(torch.floor(t * n.double() + 1e-9).long()[None, :], hide)
    first_thrown = (hide - n_throw)[..., None]
    hidden = rank < first_thrown
    thrown = (rank >= first_thrown) & (rank < hide[..., None])
    return hidden, thrown
