"""Run-state utilities shared by the pretraining and finetuning runners.

- :func:`save_atomic` / :func:`load_state`: ``torch.save`` to a temporary file in the target
  folder, then ``os.replace`` (a killed process never leaves a half-written file under the final
  name); loading is ``torch.load(weights_only=True)``, never arbitrary unpickling.
- :class:`TrainStateStore`: ``<dir>/state_<step:08d>.pth`` files, keep the last N, load the
  newest readable one for auto-resume (an unreadable one is renamed ``*.corrupt``).
- :func:`capture_rng` / :func:`restore_rng`: torch (CPU and CUDA), numpy, Python ``random`` and any
  named ``torch.Generator`` states, stored as tensors/ints so ``weights_only`` loading accepts them.
- :func:`step_seed`: a 63-bit seed derived from (seed, step, rank, ...) for randomness that must
  not depend on the process history (exact resume without replaying anything).
- :class:`MetricsLogger`: ``metrics.jsonl``, one JSON object per line, flushed per line; on resume,
  lines past the resumed step (written after the last saved state) are dropped so the log reads
  as one uninterrupted run.

A training-state dict is plain data: ``{'model', 'optimizer', 'scaler', 'step', 'epoch',
'data_position', 'rng', 'config', ...}`` (the runner decides the keys; all values must be
tensors, numbers, strings, lists, tuples or dicts of those).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multimae_att.run.folder import STATE_PREFIX, list_states

__all__ = ["save_atomic", "write_text_atomic", "load_state", "LoadedState", "TrainStateStore", "capture_rng",
           "restore_rng", "step_seed", "MetricsLogger"]


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (:func:`multimae_att.checkpoint.save_atomic`:
    temp file in the same folder, fsync, ``os.replace``); returns the path."""
    from multimae_att.checkpoint import save_atomic as _save

    _save(obj, path)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: a temporary file next to it (named after the
    process, so processes never share one), fsync, ``os.replace``; the temporary file is
    removed when the write fails. Readers see the old file or the complete new one. The file
    gets the usual permissions (unlike :func:`save_atomic`'s ``mkstemp``). Returns the path."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def load_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a training-state file with ``weights_only=True`` (plain data only).

    Raises ``FileNotFoundError`` for a missing file and ``RuntimeError`` naming the file for one
    that cannot be read (truncated, corrupt, or holding objects that need unpickling)."""
    import pickle

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"training state not found: {p}")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise RuntimeError(f"cannot load training state {p} with weights_only=True: {e}") from e
    except Exception as e:  # noqa: BLE001 -- truncated zip, bad magic, ...: re-raised with the file name
        raise RuntimeError(f"cannot read training state {p} (truncated or corrupt?): "
                           f"{type(e).__name__}: {e}") from e
    return state


@dataclass(frozen=True)
class LoadedState:
    """A training state read by :meth:`TrainStateStore.load_newest`: its file, step and content."""

    path: Path
    step: int
    state: dict


class TrainStateStore:
    """``<directory>/state_<step:08d>.pth`` training states; keeps the last ``keep_last``.

    Saving never deletes the state just written nor a state newer than it (a run that resumed
    from an older state must not prune what it did not write). Loading falls back to the next
    older state when the newest cannot be read.
    """

    def __init__(self, directory: str | os.PathLike, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.directory / f"{STATE_PREFIX}_{step:08d}.pth"

    def list(self) -> list[tuple[int, Path]]:
        """Saved states as (step, path), oldest first."""
        return list_states(self.directory)

    def latest(self) -> Path | None:
        states = self.list()
        return states[-1][1] if states else None

    def save(self, state: Mapping[str, Any], step: int) -> Path:
        """Write ``state`` for ``step`` atomically, then delete the older states of this run
        beyond the newest ``keep_last`` (states newer than ``step`` are left alone)."""
        path = save_atomic(dict(state), self.path_for(step))
        older = [p for s, p in self.list() if s < step]
        for old in older[:max(0, len(older) - (self.keep_last - 1))]:
            old.unlink(missing_ok=True)
        return path

    def load_newest(self, map_location: str | torch.device = "cpu", warn: Callable[[str], Any] = print,
                    quarantine: bool = True) -> LoadedState | None:
        """The newest readable state, or None when there is none.

        An unreadable state (truncated, corrupt) is reported through ``warn``, renamed
        ``<name>.corrupt`` when ``quarantine`` (keep it for inspection; only one process
        should rename) and the next older one is tried. Raises ``RuntimeError`` naming every
        state when none is readable.
        """
        states = self.list()
        errors = []
        for step, path in reversed(states):
            try:
                state = load_state(path, map_location)
                if not isinstance(state, dict) or "step" not in state:
                    raise RuntimeError("not a training state (no 'step' entry)")
                return LoadedState(path, step, state)
            except (RuntimeError, FileNotFoundError, OSError) as e:
                errors.append(f"  {path}: {e}")
                kept = _quarantine(path) if quarantine else path
                warn(f"warning: training state {path} is unreadable ({e}); kept as {kept}; "
                     "falling back to the next older state")
        if errors:
            raise RuntimeError(f"no readable training state in {self.directory}:\n" + "\n".join(errors)
                               + "\nRemove the folder's states to start over, or restore a good copy.")
        return None

    def load_latest(self, map_location: str | torch.device = "cpu") -> dict | None:
        """The newest readable state's dict (see :meth:`load_newest`), or None."""
        loaded = self.load_newest(map_location)
        return None if loaded is None else loaded.state


def _quarantine(path: Path) -> Path:
    """Rename ``path`` to ``<path>.corrupt`` (``.corrupt2``, ... if taken); returns the new name."""
    target, n = path.with_name(path.name + ".corrupt"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt{n}")
    try:
        path.rename(target)
    except FileNotFoundError:   # another process moved it first
        return target
    return target


def capture_rng(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """RNG states of torch (CPU, CUDA), numpy, ``random`` and the named generators, as plain data."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": _py_state_to_plain(random.getstate()),
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None
                ) -> None:
    """Inverse of :func:`capture_rng`. Named generators missing from ``state`` are an error."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    random.setstate(_py_state_from_plain(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        if name not in state["generators"]:
            raise KeyError(f"no saved state for generator '{name}' "
                           f"(saved: {sorted(state['generators'])})")
        g.set_state(state["generators"][name])


def _py_state_to_plain(st: tuple) -> dict[str, Any]:
    version, internal, gauss_next = st
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next}


def _py_state_from_plain(d: Mapping[str, Any]) -> tuple:
    return d["version"], tuple(int(x) for x in d["internal"].tolist()), d["gauss_next"]


def step_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed from ``seed`` and any keys (step, rank, purpose): stable across processes.

    Used to re-seed randomness per step so that a resumed run draws the same numbers as an
    uninterrupted one without saving or replaying anything.
    """
    h = hashlib.blake2b(repr((int(seed),) + tuple(keys)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class MetricsLogger:
    """Append-only ``metrics.jsonl`` writer (one JSON object per line, main process only).

    ``resume_step``: when resuming, lines whose ``step`` is greater are removed first (they were
    logged after the state the run resumes from, and will be logged again).
    """

    def __init__(self, path: str | os.PathLike, enabled: bool = True,
                 resume_step: int | None = None):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if rec.get("step", -1) <= step:
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


def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return _jsonable(v.tolist()) if v.numel() != 1 else _jsonable(v.item())
    if isinstance(v, (np.generic,)):
        return _jsonable(v.item())
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible
    return v
