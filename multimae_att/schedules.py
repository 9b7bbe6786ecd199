"""Schedules as pure functions of the global optimizer step (nothing to replay on resume).

Learning rate: linear warm-up then a half-cycle cosine, written in *epochs* of one (possibly
longer) reference schedule, so that continual pretraining can ride the tail of the original
run. With ``e`` the position in that reference schedule (fractional epochs)::

    e < W :  lr(e) = base * e / W
    e >= W:  lr(e) = min + (base - min) * 0.5 * (1 + cos(pi * (e - W) / (T - W)))

and ``e = start_epoch + step / steps_per_epoch`` for the run's own global ``step``.

- *tail* (the continued recipe): ``T = 1700, W = 40, start_epoch = 1600``: the 100 extra epochs
  use exactly the learning rates epochs 1600 -> 1700 of a 1700-epoch run would have used;
- *restart*: ``T = 100, W = 20, start_epoch = 0``: a fresh cosine over the new epochs;
- *lr x 10*: ``base`` (and ``min``) multiplied by ``lr_scale = 10``.

MultiMAE and MAE evaluate the same formula per iteration (based on their ``cosine_scheduler``
/ ``adjust_learning_rate``); ``base = blr * global_batch / 256`` is the usual linear scaling.

AttG temperature: a half-cycle cosine from ``tau0`` to ``tau_end`` over the run's steps. The
AttG paper (Sick et al.) schedules tau to *increase* on a half cosine from 0.75 (a decreasing
tau did worse in its ablation), so the runner's default is 0.75 -> 1.5 (``loss.attg.*``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["cosine_lr", "LRSchedule", "scaled_lr", "tau_schedule"]


def cosine_lr(epoch: float, base_lr: float, min_lr: float, warmup_epochs: float,
              total_epochs: float) -> float:
    """Learning rate at (fractional) ``epoch`` of a warm-up + cosine schedule; see module doc.

    Past ``total_epochs`` the rate stays at ``min_lr``.
    """
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    if epoch >= total_epochs:
        return min_lr
    progress = (epoch - warmup_epochs) / (total_epochs - warmup_epochs)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled_lr(blr: float, global_batch: int, lr_scale: float = 1.0) -> float:
    """``blr * global_batch / 256 * lr_scale`` (linear scaling rule, then the ablation factor)."""
    return blr * global_batch / 256.0 * lr_scale


@dataclass(frozen=True)
class LRSchedule:
    """A warm-up + cosine schedule positioned in a reference schedule.

    ``base_lr``/``min_lr`` are absolute (already batch-scaled, already multiplied by any
    ablation factor); ``start_epoch`` is where step 0 of this run sits in the reference.
    """

    base_lr: float
    min_lr: float
    warmup_epochs: float
    total_epochs: float
    start_epoch: float
    steps_per_epoch: float

    def __post_init__(self) -> None:
        if self.steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be > 0, got {self.steps_per_epoch}")
        if not 0 <= self.warmup_epochs < self.total_epochs:
            raise ValueError("need 0 <= warmup_epochs < total_epochs, got "
                             f"{self.warmup_epochs} and {self.total_epochs}")

    def epoch(self, step: int) -> float:
        """Position in the reference schedule at the run's global optimizer ``step``."""
        return self.start_epoch + step / self.steps_per_epoch

    def __call__(self, step: int) -> float:
        return cosine_lr(self.epoch(step), self.base_lr, self.min_lr, self.warmup_epochs,
                         self.total_epochs)


def tau_schedule(step: int, total_steps: int, tau0: float = 0.75, tau_end: float = 0.75) -> float:
    """AttG temperature: half-cycle cosine from ``tau0`` (step 0) to ``tau_end`` (``total_steps``)."""
    if total_steps <= 0:
        return tau_end
    progress = min(max(step / total_steps, 0.0), 1.0)
    return tau_end + (tau0 - tau_end) * 0.5 * (1.0 + math.cos(math.pi * progress))
