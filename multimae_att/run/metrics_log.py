"""``metrics.jsonl``: one JSON object per line, appended and flushed per record (torch-free).

On resume, lines past the resumed step (written after the last saved state) are dropped first,
so the log reads as one uninterrupted run; so is the evaluation line (``val/*`` keys) of the
resumed step itself when that evaluation runs again (a state saved before it).
"""
from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from multimae_att.atomic import write_text_atomic

__all__ = ["MetricsLogger", "is_evaluation"]


class MetricsLogger:
    """Append-only ``metrics.jsonl`` writer (one JSON object per line, main process only).

    ``resume_step``: when resuming, lines whose ``step`` is greater are removed first (they were
    logged after the state the run resumes from, and will be logged again); with
    ``redo_evaluation`` also the evaluation lines (``val/*`` keys) of ``resume_step`` itself.
    """

    def __init__(self, path: str | os.PathLike, enabled: bool = True,
                 resume_step: int | None = None, redo_evaluation: bool = False):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            self._truncate_after(resume_step, redo_evaluation)

    def _truncate_after(self, step: int, redo_evaluation: bool = False) -> None:
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            at = rec.get("step", -1)
            if at < step or (at == step and not (redo_evaluation and is_evaluation(rec))):
                kept.append(line)
        write_text_atomic(self.path, "".join(k + "\n" for k in kept))

    def log(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")

    @staticmethod
    def read(path: str | os.PathLike) -> list[dict[str, Any]]:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def is_evaluation(record: Mapping[str, Any]) -> bool:
    """An evaluation's line (``val/<name>`` keys, :meth:`multimae_att.run.trainer.Run.log_evaluation`)."""
    return any(str(k).startswith("val/") for k in record)


def _jsonable(v: Any) -> Any:
    """Plain JSON values: tensors (one element -> a number) and numpy scalars unwrapped, NaN and
    inf as strings (JSON has none; keep them visible)."""
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    torch = sys.modules.get("torch")   # no tensor can exist before torch is imported
    if torch is not None and isinstance(v, torch.Tensor):
        return _jsonable(v.tolist()) if v.numel() != 1 else _jsonable(v.item())
    np = sys.modules.get("numpy")
    if np is not None and isinstance(v, np.generic):
        return _jsonable(v.item())
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
