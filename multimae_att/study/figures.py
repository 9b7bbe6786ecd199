"""The report's PNG figures (matplotlib, Agg): one bar chart per metric (mean over seeds, error bar =
std, one dot per seed, baseline bar darker), the pretraining loss curves of all variants, and a
summary grid of every metric for the README."""
from __future__ import annotations

import math
from pathlib import Path

__all__ = ["bar_chart", "loss_curves", "summary_grid"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax, title: str, variants: list[str], per_variant: dict[str, dict[int, float]], baseline: str) -> None:
    from multimae_att.study.stats import summarize

    xs = range(len(variants))
    sums = [summarize(per_variant.get(v, {}).values()) for v in variants]
    means = [0.0 if math.isnan(s.mean) else s.mean for s in sums]
    errs = [0.0 if math.isnan(s.std) else s.std for s in sums]
    colors = ["#555555" if v == baseline else "#4c72b0" for v in variants]
    ax.bar(xs, means, yerr=errs, color=colors, capsize=3, alpha=0.85)
    for i, v in enumerate(variants):
        vals = [x for x in per_variant.get(v, {}).values() if x is not None and not math.isnan(x)]
        ax.plot([i] * len(vals), vals, "k.", markersize=3)
    finite = [m for s, m in zip(sums, means) if s.n]
    if finite:   # zoom on the differences: bars start near the smallest value, not at zero
        lo = min(min(finite) - max(errs) * 1.5, min(finite) * 0.98 if min(finite) > 0 else min(finite))
        hi = max(finite) + max(errs) * 1.5
        if hi > lo:
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.set_xticks(list(xs))
    ax.set_xticklabels(variants, rotation=60, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def bar_chart(path: Path, title: str, variants: list[str], per_variant: dict[str, dict[int, float]],
              baseline: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(variants) + 1.5), 3.2))
    _bars(ax, title, variants, per_variant, baseline)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_curves(path: Path, curves: dict[str, list[tuple[list[int], list[float]]]], baseline: str,
                warm: tuple[list[int], list[float]] | None = None) -> Path:
    """``curves``: variant -> one (steps, losses) per seed; thin lines per seed, thick = mean."""
    plt = _plt()
    cmap = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, 2 if warm else 1, figsize=(11 if warm else 7, 4), squeeze=False)
    ax = axes[0, -1]
    for i, (variant, runs) in enumerate(curves.items()):
        color = "black" if variant == baseline else cmap(i % 20)
        for steps, losses in runs:
            ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.7)
        common = sorted(set.intersection(*(set(s) for s, _ in runs))) if runs else []
        if common:
            mean = [sum(dict(zip(s, loss))[t] for s, loss in runs) / len(runs) for t in common]
            ax.plot(common, mean, color=color, linewidth=1.6, label=variant)
    ax.set_xlabel("step of the continuation")
    ax.set_ylabel("pretraining loss (sum over outputs)")
    ax.set_title("continuation runs (thin: seeds, thick: mean)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    if warm:
        axes[0, 0].plot(*warm, color="black")
        axes[0, 0].set_title("warm start (random masking)", fontsize=9)
        axes[0, 0].set_xlabel("step")
        axes[0, 0].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_grid(path: Path, panels: list[tuple[str, dict[str, dict[int, float]]]], variants: list[str],
                 baseline: str, cols: int = 4) -> Path:
    """All metrics in one picture (``panels``: (title, variant -> seed -> value))."""
    plt = _plt()
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.9 * rows), squeeze=False)
    for ax, (title, per_variant) in zip(axes.flat, panels):
        _bars(ax, title, variants, per_variant, baseline)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
