"""Is a cell finished? Read from its run folder, never from the study's own records.

- ``finished``: the run's final output exists (``final.pth``, ``metrics.json``, ``diagnose.json``)
  and was made by this cell's config and from this cell's starting checkpoint;
- ``stale``: a final output exists, but the saved config differs in keys that change the results
  (the runner's own resume check decides which keys), or the starting checkpoint is newer than the
  output. The study stops before any work and names the keys: nothing is overwritten silently;
- ``in_progress``: the folder holds something but no final output (the runner resumes it);
- ``empty``: nothing there yet.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from multimae_att.study.plan import DIAGNOSE, FINETUNE, PRETRAIN, Cell

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


def cell_status(cell: Cell) -> CellStatus:
    out = Path(cell.out_dir)
    if cell.output.is_file():
        if cell.init and Path(cell.init).is_file() and \
                Path(cell.init).stat().st_mtime > cell.output.stat().st_mtime:
            if cell.entry == DIAGNOSE:   # derived from the checkpoint in seconds: run it again
                return CellStatus("empty", f"older than {cell.init}")
            return CellStatus("stale", f"its starting checkpoint {cell.init} is newer than {cell.output.name}")
        if cell.entry in (PRETRAIN, FINETUNE):
            changes = _config_changes(cell)
            if changes:
                return CellStatus("stale", "finished with another config: " + "; ".join(changes))
        return CellStatus("finished")
    if cell.entry == DIAGNOSE:     # a diagnostics run has no partial state worth keeping
        return CellStatus("empty")
    if out.is_dir() and any(out.iterdir()):
        return CellStatus("in_progress")
    return CellStatus("empty")
