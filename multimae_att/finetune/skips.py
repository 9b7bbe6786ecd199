"""Corrupt evaluation samples: never substituted, left out of the metrics, reported.

The evaluation loaders run with ``on_corrupt="mark"``: a sample that cannot be read (or whose
labels lie outside ``[0, classes)``) keeps its place in the batch as a zero placeholder with
``valid`` False and a ``skip_reason`` naming the file (:mod:`multimae_att.data.sample`). The
evaluation gathers ``valid`` with the per-sample statistics and drops the invalid rows, so every
metric is computed over the readable samples only, each counted once. :class:`EvalSkips`
collects the reasons and applies ``data.eval_on_corrupt`` at the end: ``error`` raises
:class:`CorruptEvalData` naming the files; ``skip`` / ``skip_ok`` return the skipped sample ids
(``metrics.json``: ``skipped_eval_samples``), and the runner exits non-zero for ``skip``.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["CorruptEvalData", "EvalSkips"]

_SHOWN = 5  # reasons quoted in an error message


class CorruptEvalData(RuntimeError):
    """The evaluation met corrupt samples and ``data.eval_on_corrupt`` is ``error``."""


class EvalSkips:
    """Reasons of the corrupt samples met in one evaluation (on this process)."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}   # sample id -> reason

    @staticmethod
    def valid(batch: dict[str, Any], size: int, device: torch.device) -> torch.Tensor:
        """uint8 ``[B]``: 1 for real samples (all of them when the loader does not mark)."""
        flags = batch.get("valid")
        if flags is None:
            return torch.ones(size, dtype=torch.uint8, device=device)
        return torch.as_tensor(flags, device=device).to(torch.uint8)

    def add(self, batch: dict[str, Any]) -> None:
        """Remember the placeholders of ``batch`` (id and reason)."""
        for sample_id, reason in zip(batch.get("sample_id", []), batch.get("skip_reason", [])):
            if reason:
                self.reasons[str(sample_id)] = reason

    def finish(self, accelerator, policy: str) -> list[str]:
        """Sorted ids of every process's skipped samples (a padded duplicate counts once);
        raise :class:`CorruptEvalData` when there are any and ``policy`` is ``error``."""
        from accelerate.utils import gather_object

        pairs = sorted(self.reasons.items())
        if getattr(accelerator, "num_processes", 1) > 1:
            pairs = sorted(set(map(tuple, gather_object(pairs))))
        reasons = dict(pairs)
        if reasons and policy == "error":
            shown = "; ".join(list(reasons.values())[:_SHOWN])
            more = f"; ... ({len(reasons) - _SHOWN} more)" if len(reasons) > _SHOWN else ""
            raise CorruptEvalData(
                f"{len(reasons)} evaluation sample(s) could not be used: {shown}{more}. Fix or remove "
                "them, or leave them out of the metrics with data.eval_on_corrupt=skip (listed in "
                "metrics.json as skipped_eval_samples)")
        return sorted(reasons)
