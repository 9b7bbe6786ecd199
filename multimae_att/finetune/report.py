"""What a finetuning run states at start and reports at the end.

* :func:`protocol_line`: the data protocol with its resolved training augmentation, evaluation
  mode and reporting rule, printed before any work so a log says which numbers it holds.
* :func:`global_batch_line`: processes x per-process batch x accumulation steps, and a warning
  when that differs from ``optim.recipe_global_batch`` (semseg and depth recipes use an absolute
  learning rate, so another global batch is another recipe).
* :func:`reported_metrics`: the evaluation ``metrics.json`` holds (``train.report``: the best
  one by the task's key, or the last one), with where it came from.
"""
from __future__ import annotations

from typing import Any

__all__ = ["global_batch_line", "protocol_line", "reported_metrics"]


def protocol_line(cfg, best_key: str, trains: bool = True) -> str:
    """``protocol multimae: train aug lsj, eval letterbox, report best (by miou)`` and the like."""
    d = cfg.data
    subset = f" on the first {d.max_eval_samples} of a seed-0 permutation" if d.max_eval_samples else ""
    if not trains:
        return f"protocol {d.protocol}: eval {cfg.eval_mode()}{subset} (frozen features, no training)"
    report = cfg.report()
    rule = f"best (by {best_key})" if report == "best" else "last"
    return f"protocol {d.protocol}: train aug {cfg.aug()}, eval {cfg.eval_mode()}{subset}, report {rule}"


def global_batch_line(cfg, processes: int) -> tuple[str, str | None]:
    """(``global batch G = P processes x B x A accumulation steps``, warning or None)."""
    b, a = cfg.data.batch_size, cfg.optim.accum_steps
    g = processes * b * a
    line = (f"global batch {g} = {processes} process{'es' if processes != 1 else ''} x {b} per "
            f"process x {a} accumulation step{'s' if a != 1 else ''}")
    recipe = cfg.optim.recipe_global_batch
    if recipe is None:
        return line, None
    if g == recipe:
        return f"{line} (the recipe's)", None
    hint = ""
    if recipe % (processes * b) == 0:
        hint = (f"; with {processes} process{'es' if processes != 1 else ''} set "
                f"optim.accum_steps={recipe // (processes * b)}")
    lr = "the learning rate is absolute (optim.lr)" if cfg.optim.lr is not None else \
        "optim.blr is rescaled to the new batch"
    return line, (f"WARNING: global batch {g} ({processes} x {b} x {a}) differs from the recipe's "
                  f"optim.recipe_global_batch={recipe}; {lr}, so results are not the recipe's{hint}")


def reported_metrics(cfg, last: dict[str, Any], best: dict[str, Any] | None) -> dict[str, Any]:
    """``last`` or ``best`` (each ``{'epoch', 'step', 'metrics'}``) as the flat dict of
    ``metrics.json``: the metrics plus ``report`` (best | last), ``report_epoch``, ``report_step``."""
    chosen = best if cfg.report() == "best" and best is not None else last
    return {**chosen["metrics"], "report": cfg.report(), "report_epoch": chosen["epoch"],
            "report_step": chosen["step"]}
