"""Masking strategies: seeded, pure, batched functions behind one registry.

Contract (docs/INTERFACES.md). ``make_masks(name, scores, visible, generator=None, **params)``:

- ``scores``: dict modality -> float tensor ``[B, N_m]`` (``[B, H, N_m]`` for per-head strategies
  such as ``heads``); for ``random`` only the shapes are used. Dict order = modality order.
- ``visible``: int tensor ``[B, M]``, visible tokens per sample and modality (from
  :func:`~multimae_att.masking.sample_budgets`), ``0 <= visible[b, m] <= N_m``.
- returns :class:`Masks`: ``hidden`` dict modality -> bool ``[B, N_m]`` (True = hidden, i.e.
  reconstructed), ``thrown`` dict of the same shapes or None (AMT: neither encoded nor
  reconstructed). ``hidden`` and ``thrown`` are disjoint; visible = neither, and per sample and
  modality exactly ``visible[b, m]`` tokens are visible.

How it works: the modalities are padded to a common length and stacked to ``[B, M, N_max]`` so
one sort serves all of them. Each strategy builds a *key*; tokens are ranked by descending key
(``torch.sort(stable=True)``), and the first ``N_m - v`` ranks are hidden. **Ties** are broken
by token index: among equal keys the lower index comes first (so for ``high`` the lower index is
hidden first, for ``low`` too). Padding gets key ``-inf`` and a higher index, so it always ranks
after every real token and is never hidden or visible.
"""
from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from multimae_att.device_checks import check, to_device

__all__ = ["Masks", "Strategy", "STRATEGIES", "register_strategy", "make_masks", "validate",
           "draw"]


@dataclass
class Masks:
    """Result of a strategy.

    Attributes:
        hidden: modality -> bool ``[B, N_m]``, True = hidden (reconstructed by the decoder).
        thrown: modality -> bool ``[B, N_m]``, True = thrown (AMT), or None. Disjoint from hidden.
        guided: bool ``[B]``, True where the attention-guided strategy was used (False where a
            policy fell back to random), or None when not tracked.
    """

    hidden: dict[str, Tensor]
    thrown: dict[str, Tensor] | None = None
    guided: Tensor | None = None

    def visible(self) -> dict[str, Tensor]:
        """modality -> bool ``[B, N_m]``, True = visible (encoded)."""
        out = {}
        for m, h in self.hidden.items():
            t = self.thrown[m] if self.thrown is not None else torch.zeros_like(h)
            out[m] = ~(h | t)
        return out


@dataclass(frozen=True)
class Strategy:
    """A registered strategy.

    ``fn(key_input, n, hide, generator, **params) -> (hidden, thrown_or_None)`` works on padded
    stacks: ``key_input`` float ``[B, M, N_max]`` (``[B, M, H, N_max]`` if ``per_head``), ``n``
    int64 ``[M]`` token counts, ``hide`` int64 ``[B, M]`` = ``N_m - visible``; it returns bool
    ``[B, M, N_max]`` masks (False on padding). A strategy with ``uses_progress`` (a curriculum)
    also gets ``progress``: the position in the run, 0 at the first step and 1 at the last.
    """

    name: str
    fn: Callable[..., tuple[Tensor, Tensor | None]]
    defaults: Mapping[str, Any]
    needs_scores: bool = True
    per_head: bool = False
    deterministic: bool = False  # True: the generator is not used (masks depend on scores only)
    origin: str = ""
    summary: str = ""
    uses_progress: bool = False  # True: fn takes ``progress`` in [0, 1] (see make_masks)
    # (N_m, v_min, v_max, params) -> (fewest, most) tokens of a modality with N_m tokens that a
    # sample with v_min..v_max of them visible gets thrown; None = (0, 0), the strategy throws
    # nothing. Lets the decoders and the losses size their tensors without reading the masks.
    thrown_range: Callable[[int, int, int, Mapping[str, Any]], tuple[int, int]] | None = None


STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str, defaults: Mapping[str, Any] | None = None, *,
                      needs_scores: bool = True, per_head: bool = False,
                      deterministic: bool = False, origin: str = "",
                      summary: str = "", uses_progress: bool = False,
                      thrown_range: Callable | None = None) -> Callable:
    """Decorator adding ``fn`` to :data:`STRATEGIES` under ``name`` with its parameter defaults."""
    def deco(fn: Callable) -> Callable:
        if name in STRATEGIES:
            raise ValueError(f"masking strategy {name!r} is already registered")
        STRATEGIES[name] = Strategy(name, fn, dict(defaults or {}), needs_scores, per_head,
                                    deterministic, origin, summary, uses_progress, thrown_range)
        return fn
    return deco


def get_strategy(name: str) -> Strategy:
    """Registry look-up with an error that names the valid strategies."""
    if name not in STRATEGIES:
        close = difflib.get_close_matches(name, list(STRATEGIES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown masking strategy {name!r}{hint}; "
                         f"valid: {sorted(STRATEGIES)}")
    return STRATEGIES[name]


def check_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults of strategy ``name`` overridden by ``params``; unknown keys raise ValueError."""
    strat = get_strategy(name)
    unknown = [k for k in params if k not in strat.defaults]
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r} for masking strategy {name!r}; "
                         f"valid parameters: {sorted(strat.defaults) or 'none'}")
    return {**strat.defaults, **params}


# ----------------------------------------------------------------------------- helpers

def _stack_padded(tensors: list[Tensor], fill: float) -> Tensor:
    """Pad the last dim of each tensor to the longest and stack at dim 1: ``[B, M, ..., N_max]``."""
    n_max = max(t.shape[-1] for t in tensors)
    return torch.stack([torch.nn.functional.pad(t, (0, n_max - t.shape[-1]), value=fill)
                        for t in tensors], dim=1)


def token_valid(n: Tensor, n_max: int) -> Tensor:
    """bool ``[M, N_max]``: True on real tokens, False on padding."""
    return torch.arange(n_max, device=n.device) < n[:, None]


def rank_desc(key: Tensor) -> Tensor:
    """Rank along the last dim by descending key (0 = largest), ties -> lower index first."""
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    ar = torch.arange(key.shape[-1], device=key.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ar)


def hide_first(key: Tensor, n: Tensor, hide: Tensor) -> Tensor:
    """Hide the ``hide[b, m]`` tokens with the largest key: bool ``[B, M, N_max]``."""
    valid = token_valid(n, key.shape[-1])
    rank = rank_desc(torch.where(valid, key, float("-inf")))
    return (rank < hide[..., None]) & valid


def draw(kind: str, shape: tuple[int, ...], device: torch.device,
         generator: torch.Generator | None = None) -> Tensor:
    """float32 random tensor on ``device``: ``uniform`` [0, 1), ``normal`` N(0, 1) or
    ``exponential`` Exp(1).

    Drawn on the generator's device and moved when that differs, so a CPU generator can drive
    masks of CUDA scores (and gives the same masks on either device)."""
    src = generator.device if generator is not None else device
    if kind == "uniform":
        x = torch.rand(shape, device=src, generator=generator)
    elif kind == "normal":
        x = torch.randn(shape, device=src, generator=generator)
    elif kind == "exponential":
        x = torch.empty(shape, device=src).exponential_(generator=generator)
    else:
        raise ValueError(f"unknown distribution {kind!r}")
    return x.to(device)


# ----------------------------------------------------------------------------- entry points

def make_masks(name: str, scores: Mapping[str, Tensor], visible: Tensor,
               generator: torch.Generator | None = None, *, progress: float | None = None,
               **params: Any) -> Masks:
    """Masks from strategy ``name`` (see the module docstring for shapes and conventions).

    ``progress``: position in the run in [0, 1] (step / total steps), required by curriculum
    strategies (``Strategy.uses_progress``, e.g. ``hpm``) and ignored by the others.
    Raises ValueError for an unknown strategy or parameter, a wrong ``visible`` shape or range,
    non-finite scores for a score-driven strategy, or a missing or non-finite ``progress``.
    """
    strat = get_strategy(name)
    p = check_params(name, params)
    if strat.uses_progress:
        if progress is None or not math.isfinite(float(progress)):
            raise ValueError(f"masking strategy {name!r} follows the run's progress: pass "
                             f"progress in [0, 1] (got {progress})")
        p["progress"] = min(max(float(progress), 0.0), 1.0)
    mods = list(scores)
    if not mods:
        raise ValueError("make_masks needs at least one modality in scores")
    sizes = [scores[m].shape[-1] for m in mods]  # host ints: slicing by them needs no sync
    n = torch.tensor(sizes, dtype=torch.int64)
    B = scores[mods[0]].shape[0]
    _check_visible(visible, B, n, mods)
    for m in mods:
        want = 3 if strat.per_head else 2
        if scores[m].ndim != want or scores[m].shape[0] != B:
            shape = "[B, H, N_m]" if strat.per_head else "[B, N_m]"
            raise ValueError(f"strategy {name!r} needs scores[{m!r}] of shape {shape} with B={B}, "
                             f"got {tuple(scores[m].shape)}")
    device = scores[mods[0]].device
    n = to_device(n, device)
    key_input = _stack_padded([scores[m].float() for m in mods], 0.0)
    if strat.needs_scores:
        check(torch.isfinite(key_input), f"strategy {name!r} got non-finite attention scores")
    hide = n[None, :] - visible.to(device=device, dtype=torch.int64)
    hidden, thrown = strat.fn(key_input, n, hide, generator, **p)
    split = lambda x: {m: x[:, i, :sizes[i]] for i, m in enumerate(mods)}  # noqa: E731
    return Masks(split(hidden), None if thrown is None else split(thrown))


def _check_visible(visible: Tensor, B: int, n: Tensor, mods: list[str]) -> None:
    if visible.shape != (B, len(mods)):
        raise ValueError(f"visible must be [B, M] = [{B}, {len(mods)}] (modalities {mods}), "
                         f"got {tuple(visible.shape)}")
    if visible.is_floating_point() or visible.dtype == torch.bool:
        raise ValueError(f"visible must be an integer tensor, got {visible.dtype}")
    check((visible >= 0) & (visible <= to_device(n, visible.device)[None, :]),
          f"visible counts must lie in [0, N_m] with N = {dict(zip(mods, n.tolist()))}")


def validate(masks: Masks, visible: Tensor | None = None, K: int | None = None,
             num_tokens: Mapping[str, int] | None = None) -> None:
    """Check the mask invariants; raise ValueError naming the first violation.

    - every mask is bool ``[B, N_m]`` (``N_m`` from ``num_tokens`` if given), same B everywhere;
    - ``thrown`` (if any) has the same keys/shapes and is disjoint from ``hidden``;
    - per sample and modality the visible count equals ``visible[b, m]`` (if given);
    - per sample the visible total equals ``K`` (if given).
    """
    mods = list(masks.hidden)
    B = None
    for m in mods:
        h = masks.hidden[m]
        if h.dtype != torch.bool or h.ndim != 2:
            raise ValueError(f"hidden[{m!r}] must be bool [B, N_m], got {h.dtype} {tuple(h.shape)}")
        B = h.shape[0] if B is None else B
        if h.shape[0] != B:
            raise ValueError(f"hidden[{m!r}] has batch {h.shape[0]}, expected {B}")
        if num_tokens is not None and h.shape[1] != num_tokens[m]:
            raise ValueError(f"hidden[{m!r}] has {h.shape[1]} tokens, expected {num_tokens[m]}")
        if masks.thrown is not None:
            t = masks.thrown.get(m)
            if t is None or t.dtype != torch.bool or t.shape != h.shape:
                raise ValueError(f"thrown[{m!r}] must be bool {tuple(h.shape)}")
            if bool((t & h).any()):
                raise ValueError(f"thrown[{m!r}] overlaps hidden[{m!r}]")
    counts = torch.stack([v.sum(1) for v in masks.visible().values()], 1)  # [B, M]
    if visible is not None:
        bad = counts.cpu() != visible.cpu().to(torch.int64)
        if bool(bad.any()):
            b, i = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"sample {b}, modality {mods[i]!r}: {int(counts[b, i])} visible "
                             f"tokens, expected {int(visible[b, i])}")
    if K is not None and bool((counts.sum(1) != K).any()):
        raise ValueError(f"visible totals {counts.sum(1).tolist()} differ from K={K}")


# ----------------------------------------------------------------------------- strategies

@register_strategy("random", {}, needs_scores=False, origin="MultiMAE",
                   summary="uniformly random visible tokens (the MultiMAE baseline)")
def random_masking(key_input: Tensor, n: Tensor, hide: Tensor, generator=None):
    """Uniform random: i.i.d. uniform keys, hide the largest (scores unused)."""
    shape = key_input.shape[:2] + key_input.shape[-1:]
    return hide_first(draw("uniform", shape, key_input.device, generator), n, hide), None
