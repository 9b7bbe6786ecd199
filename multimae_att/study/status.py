"""Is a cell finished? Read from its run folder, never from the study's own records.

Pretraining and finetuning cells are ordinary run folders: their lifecycle status is the one the
runners themselves use (:func:`multimae_att.run.run_status`: *empty*, *in progress*, *finished*).
On top of it the study only asks whether a finished run still belongs to the study:

- ``finished``: the run folder is finished (``metrics.json`` and every output it lists) and was
  made by this cell's config from this cell's starting checkpoint;
- ``stale``: finished, but the saved config differs in keys that change the results (the
  runner's own resume check decides which keys), or the starting checkpoint was replaced after
  the run (newer than its ``metrics.json`` and a SHA-256 other than the one in its provenance).
  The study stops before any work and names the keys: nothing is overwritten silently;
- ``in_progress``: training states but no results (the runner resumes it);
- ``empty``: nothing to resume (the runner starts it fresh).

A diagnostics cell is not a run folder: it is finished when its ``diagnose.json`` exists and is
newer than the checkpoint it reads (else it runs again: it takes seconds and keeps no state).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from multimae_att.run import run_status
from multimae_att.study.plan import DIAGNOSE, PRETRAIN, Cell

__all__ = ["CellStatus", "cell_status"]


@dataclass(frozen=True)
class CellStatus:
    state: str                  # 'finished' | 'stale' | 'in_progress' | 'empty'
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.state} ({self.reason})" if self.reason else self.state


def _config_changes(cell: Cell) -> list[str]:
    """Result-changing differences between the saved ``config.yaml`` and the cell's config."""
    saved_file = Path(cell.out_dir) / "config.yaml"
    if not saved_file.is_file():
        return ["config.yaml is missing"]
    saved = yaml.safe_load(saved_file.read_text()) or {}
    if cell.entry == PRETRAIN:
        from multimae_att.pretrain.config import resume_config_changes
    else:
        from multimae_att.finetune.config import resume_config_changes
    return resume_config_changes(saved, cell.config)[0]


def _newer(path: str | None, than: Path) -> bool:
    return bool(path) and Path(path).is_file() and Path(path).stat().st_mtime > than.stat().st_mtime


def _replaced_init(cell: Cell, results: Path, metrics: dict) -> bool:
    """The starting checkpoint changed since the run finished: newer than its results and, where
    the run recorded the checkpoint's hash, with other contents (a copy or ``touch`` is not a change)."""
    if not _newer(cell.init, results):
        return False
    recorded = ((metrics.get("provenance") or {}).get("init_checkpoint") or {}).get("sha256")
    if not recorded:
        return True
    from multimae_att.run.provenance import file_sha256

    return file_sha256(cell.init) != recorded


def cell_status(cell: Cell) -> CellStatus:
    if cell.entry == DIAGNOSE:
        if not cell.output.is_file():
            return CellStatus("empty")
        if _newer(cell.init, cell.output):
            return CellStatus("empty", f"older than {cell.init}")
        return CellStatus("finished")
    run = run_status(cell.out_dir)
    if run.finished:
        if _replaced_init(cell, run.results, run.metrics):
            return CellStatus("stale", f"its starting checkpoint {cell.init} was replaced after the run "
                                       f"finished ({run.results})")
        changes = _config_changes(cell)
        if changes:
            return CellStatus("stale", "finished with another config: " + "; ".join(changes))
        return CellStatus("finished")
    return CellStatus(run.status)
