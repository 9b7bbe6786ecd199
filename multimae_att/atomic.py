"""Atomic file writes: readers see the old file or the complete new one, never a partial write.

Every write goes to a temporary file next to the target (``.<name>.tmp<pid>``: processes never
share one, and :func:`multimae_att.run.folder.remove_temp_files` recognises the leftovers of a
killed write), is flushed and fsynced, then renamed over the target with ``os.replace``; the
temporary file is removed when the write fails. Torch-free at import (``save_atomic`` imports
torch when called).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["save_atomic", "write_text_atomic", "write_atomic"]


def write_atomic(path: str | os.PathLike, write: Callable[[IO], Any], binary: bool = True) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it over ``path``.

    The folder is created when missing. Returns the path.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    return write_atomic(path, lambda f: f.write(text), binary=False)


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically; returns the path."""
    import torch

    return write_atomic(path, lambda f: torch.save(obj, f))
