"""A run folder's lifecycle status, read from its files alone (no torch, nothing loaded).

Both runners write the same layout into ``output_dir``::

    config.yaml                  resolved config of the latest invocation that trained
    metrics.jsonl                one record per logged step (the training log)
    checkpoints/state_<step>.pth training states (exact resume), the newest ``train.keep_last``
    metrics.json                 final results, provenance and the list of exported ``outputs``
    final.pth | checkpoint-*.pth exported weights
    previous-<time>/             older runs moved aside by ``--overwrite``

:func:`run_status` says which of three states a folder is in: *empty* (nothing to resume or
report: no training state, no results), *in progress* (training states, no complete results) or
*finished* (``metrics.json`` and every exported file it lists under ``outputs``). The study runner
and ``python -m multimae_att.show`` use it to skip finished runs
and to report on a folder; the runners use it to decide between a fresh
start, a resume and "nothing to do".
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RunStatus", "run_status", "EMPTY", "IN_PROGRESS", "FINISHED", "STATES_DIR", "RESULTS_FILE",
           "LOG_FILE", "CONFIG_FILE", "PREVIOUS_PREFIX", "FINAL_OUTPUTS", "list_states", "move_to_previous",
           "remove_temp_files", "read_results"]

EMPTY, IN_PROGRESS, FINISHED = "empty", "in_progress", "finished"
STATES_DIR = "checkpoints"
RESULTS_FILE = "metrics.json"
LOG_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
PREVIOUS_PREFIX = "previous-"
STATE_PREFIX = "state"
FINAL_OUTPUTS = ("final.pth", "checkpoint-best.pth", "checkpoint-last.pth")
_STATE_NAME = re.compile(rf"^{STATE_PREFIX}_(\d+)\.pth$")
# Temporary files of an interrupted atomic write: multimae_att.atomic (".<name>.tmp<pid>"), and
# ".tmp_<name>.<random>" of earlier versions' checkpoint.save_atomic.
_TEMP_NAME = re.compile(r"^\.tmp_.+|^\..+\.tmp\d+$")


@dataclass(frozen=True)
class RunStatus:
    """What :func:`run_status` found in ``output_dir``.

    ``status``: ``'empty'``, ``'in_progress'`` or ``'finished'``. ``step``: the step of the
    results when finished, else of the newest training state (None when there is none).
    ``states``: training states ``(step, path)``, oldest first. ``results``: ``metrics.json``
    when finished. ``outputs``: exported weights present (``final.pth``, ``checkpoint-*.pth``).
    """

    output_dir: Path
    status: str
    step: int | None = None
    states: tuple[tuple[int, Path], ...] = ()
    results: Path | None = None
    outputs: tuple[Path, ...] = ()
    metrics: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    @property
    def in_progress(self) -> bool:
        return self.status == IN_PROGRESS

    @property
    def empty(self) -> bool:
        return self.status == EMPTY

    @property
    def latest_state(self) -> Path | None:
        return self.states[-1][1] if self.states else None

    def where(self) -> str:
        """``results in D/metrics.json, weights in D/final.pth`` (finished runs)."""
        parts = [f"results in {self.results}"] if self.results else []
        if self.outputs:
            parts.append("weights in " + ", ".join(str(p) for p in self.outputs))
        return ", ".join(parts)


def list_states(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """Training states ``<directory>/state_<step:08d>.pth`` as ``(step, path)``, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for entry in os.scandir(d):
        m = _STATE_NAME.match(entry.name)
        if m and entry.is_file():
            found.append((int(m.group(1)), Path(entry.path)))
    return sorted(found)


def read_results(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``output_dir/metrics.json`` as a dict, or None when it is missing or not a JSON object
    (it is written atomically, so a half-written file cannot be mistaken for results)."""
    try:
        data = json.loads((Path(output_dir) / RESULTS_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def run_status(output_dir: str | os.PathLike) -> RunStatus:
    """The lifecycle status of ``output_dir`` (a folder that does not exist is empty)."""
    out = Path(output_dir)
    states = tuple(list_states(out / STATES_DIR))
    outputs = tuple(out / n for n in FINAL_OUTPUTS if (out / n).is_file())
    results = read_results(out)
    declared = results.get("outputs", []) if results is not None else []
    if results is not None and all((out / str(name)).is_file() for name in declared):
        step = results.get("step", states[-1][0] if states else None)
        return RunStatus(out, FINISHED, step if isinstance(step, int) else None, states,
                         out / RESULTS_FILE, outputs, results)
    if states:
        return RunStatus(out, IN_PROGRESS, states[-1][0], states, None, outputs)
    return RunStatus(out, EMPTY, None, (), None, outputs)


def move_to_previous(output_dir: str | os.PathLike, now: float | None = None) -> Path | None:
    """Move everything in ``output_dir`` (but earlier ``previous-*`` folders) into a new
    ``output_dir/previous-<YYYYmmdd-HHMMSS>/``; nothing is deleted. Returns that folder, or
    None when there was nothing to move."""
    out = Path(output_dir)
    entries = [e for e in out.iterdir() if not e.name.startswith(PREVIOUS_PREFIX)] if out.is_dir() else []
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    target, n = out / f"{PREVIOUS_PREFIX}{stamp}", 1
    while target.exists():
        n += 1
        target = out / f"{PREVIOUS_PREFIX}{stamp}-{n}"
    target.mkdir()
    for e in entries:
        shutil.move(str(e), str(target / e.name))
    return target


def remove_temp_files(output_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of interrupted atomic writes in ``output_dir`` and its
    ``checkpoints/`` (a process killed mid-save leaves one; a training state's is as large as
    the state). Call only while no process of the run writes. Returns the deleted paths."""
    removed = []
    for d in (Path(output_dir), Path(output_dir) / STATES_DIR):
        if not d.is_dir():
            continue
        for entry in os.scandir(d):
            if _TEMP_NAME.match(entry.name) and entry.is_file():
                Path(entry.path).unlink(missing_ok=True)
                removed.append(Path(entry.path))
    return sorted(removed)
