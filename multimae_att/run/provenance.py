"""Where a result comes from: init checkpoint (path + content hash), config hash, code version.

Recorded in every training state (the init checkpoint's identity, so a resume can check it),
in ``metrics.json`` and in the exported weights (``final.pth``, ``checkpoint-*.pth``) under
``provenance``. Nothing here loads a checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["sha256_file", "file_sha256", "local_checkpoint", "checkpoint_identity", "config_hash", "code_version",
           "provenance", "describe_identity"]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read now (4 MiB chunks; ~1 s per GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """:func:`sha256_file`, read once per process while the file keeps its path, inode, size and
    change time: the hub's check of a cached checkpoint
    (:func:`multimae_att.hub.resolve_checkpoint`) and the run's record of ``init.checkpoint``
    (:func:`checkpoint_identity`) share one read."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(p)
    return _DIGESTS[key]


_DIGESTS: dict[tuple, str] = {}


def local_checkpoint(spec: str) -> Path | None:
    """The local file ``init.checkpoint`` stands for, without downloading anything
    (:func:`multimae_att.hub.local_path`: a path as is, a published name or URL its copy in the
    hub cache); None when that file is not there."""
    from multimae_att.hub import local_path

    p = local_path(spec)
    return p if p.is_file() else None


def checkpoint_identity(spec: str | None, accelerator: Any = None) -> dict[str, Any] | None:
    """``init.checkpoint`` as ``{'path': as given, 'file': absolute path, 'sha256': hex}``;
    None without one. When the file is not on disk (yet) ``file``/``sha256`` are None (the
    runner's own loading reports a missing file where it needs it).

    With an ``accelerator`` of several processes only the main process reads and hashes the
    file (one read of a possibly large file, not one per process) and the others receive its
    identity; an error there is raised in every process."""
    from multimae_att.run.on_main import run_on_main

    return run_on_main(accelerator, lambda: _identity(spec), share=True)


def _identity(spec: str | None) -> dict[str, Any] | None:
    if not spec:
        return None
    p = local_checkpoint(spec)
    if p is None:
        return {"path": spec, "file": None, "sha256": None}
    return {"path": spec, "file": str(p.resolve()), "sha256": file_sha256(p)}


def describe_identity(ident: Mapping[str, Any] | None) -> str:
    """``'a.pth' (sha256 0123abcd...)`` or ``None``, for messages."""
    if not ident:
        return "None"
    digest = ident.get("sha256")
    return f"{ident.get('file') or ident.get('path')!r}" + (f" (sha256 {digest[:12]}...)" if digest else "")


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 (first 16 hex digits) of a resolved config dict (canonical JSON, sorted keys),
    without ``output_dir``: the same config run in two folders has the same hash."""
    body = {k: v for k, v in config.items() if k != "output_dir"}
    text = json.dumps(body, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def code_version() -> dict[str, Any]:
    """``{'version': package version, 'git_commit': sha or None, 'git_dirty': bool or None}``;
    the git fields come from the checkout the package is imported from, when it is one."""
    from multimae_att import __version__

    here = Path(__file__).resolve().parents[2]
    commit, dirty = None, None
    if (here / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, timeout=10, check=True).stdout.strip() or None
            status = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10, check=True).stdout
            dirty = bool(status.strip())
        except (OSError, subprocess.SubprocessError):
            commit, dirty = None, None
    return {"version": __version__, "git_commit": commit, "git_dirty": dirty}


def provenance(config: Mapping[str, Any], step: int, init: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``provenance`` entry of final outputs: step, config hash, init checkpoint, code."""
    return {"step": int(step), "config_hash": config_hash(config),
            "init_checkpoint": dict(init) if init else None, **code_version()}
