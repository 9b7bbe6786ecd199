"""Training states of a run folder: ``<run>/checkpoints/state_<step:08d>.pth``.

- :func:`load_state`: ``torch.load(weights_only=True)``, never arbitrary unpickling; a missing
  or unreadable file is an error naming it;
- :class:`TrainStateStore`: save atomically (:func:`multimae_att.atomic.save_atomic`), keep the
  last N, load the newest readable one for auto-resume (an unreadable one is renamed
  ``*.corrupt`` and the next older one is used).

A training-state dict is plain data: ``{'model', 'optimizer', 'scaler', 'step', 'config', ...}``
(the run skeleton decides the keys, :mod:`multimae_att.run.trainer`; all values must be tensors,
numbers, strings, lists, tuples or dicts of those).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from multimae_att.atomic import save_atomic
from multimae_att.run.folder import STATE_PREFIX, list_states

__all__ = ["load_state", "LoadedState", "TrainStateStore"]


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
    except Exception as e:  # truncated zip, bad magic, ...: re-raised with the file name
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
