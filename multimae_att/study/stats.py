"""Aggregation over seeds: mean ± std per variant, and the paired difference to the baseline.

Pairing: seed s of a variant and seed s of the baseline share the warm start, the seed of the
continuation run and of every evaluation (data order, head initialisation, subsets), so the
per-seed difference ``d_s = x_variant,s - x_baseline,s`` removes what the two runs share. Reported:
the mean of ``d_s``, its standard error ``std(d) / sqrt(n)`` (sample std, ``ddof = 1``), and how
many seeds have a difference of the same sign as the mean (``k/n``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Summary", "Paired", "summarize", "paired", "fmt"]


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float          # sample std (ddof = 1); NaN with fewer than 2 values


@dataclass(frozen=True)
class Paired:
    n: int              # seeds present in both
    mean: float         # mean of the per-seed differences (variant - baseline)
    se: float           # std(d, ddof = 1) / sqrt(n); NaN with fewer than 2 pairs
    agree: int          # seeds whose difference has the sign of the mean (zero counts with zero)


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return math.nan
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def summarize(values) -> Summary:
    xs = _finite(values)
    if not xs:
        return Summary(0, math.nan, math.nan)
    return Summary(len(xs), sum(xs) / len(xs), _std(xs))


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def paired(variant: Mapping[int, float], baseline: Mapping[int, float]) -> Paired:
    """Paired difference over the seeds both have a (finite) value for."""
    seeds = [s for s in variant if s in baseline and len(_finite([variant[s], baseline[s]])) == 2]
    d = [float(variant[s]) - float(baseline[s]) for s in seeds]
    if not d:
        return Paired(0, math.nan, math.nan, 0)
    mean = sum(d) / len(d)
    se = _std(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan
    return Paired(len(d), mean, se, sum(1 for x in d if _sign(x) == _sign(mean)))


def _digits(scale: float) -> int:
    if math.isnan(scale) or scale == 0:
        return 2
    return 2 if abs(scale) >= 1 else 3 if abs(scale) >= 0.01 else 4


def fmt(mean: float, spread: float, scale: float | None = None, signed: bool = False) -> str:
    """``'41.25 ± 1.31'`` (``spread`` NaN: the mean alone); digits from ``scale`` (default the mean)."""
    if math.isnan(mean):
        return "–"
    d = _digits(mean if scale is None else scale)
    head = f"{mean:+.{d}f}" if signed else f"{mean:.{d}f}"
    return head if math.isnan(spread) else f"{head} ± {spread:.{d}f}"
