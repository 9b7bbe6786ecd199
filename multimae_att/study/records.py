"""The study's own bookkeeping, kept apart from the run folders: one JSON file per cell under
``<study_dir>/records/`` listing every attempt (wall and CPU seconds, peak memory, threads, host,
load average, error; ``interrupted``: ``stopped`` / ``killed`` / ``died`` for an attempt that ended
before its run did, measured up to then), and ``<study_dir>/invocations.jsonl`` with one line per
``run_study.py`` run.
They feed the cost rows of the report; whether a cell is finished is read from its run folder
(:mod:`multimae_att.study.status`), never from here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from multimae_att.atomic import write_text_atomic

__all__ = ["append_record", "read_record", "append_invocation", "update_invocation", "read_invocations"]


def append_record(path: str | os.PathLike, cell_id: str, attempt: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(p.read_text()) if p.is_file() else {"cell": cell_id, "attempts": []}
    data["attempts"].append(attempt)
    write_text_atomic(p, json.dumps(data, indent=1) + "\n")


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """Totals over the attempts: ``cpu_s``, ``wall_s`` (sums), ``peak_rss_mb``, ``peak_cuda_mb``
    (maxima), ``attempts``, ``interrupted_attempts`` (stopped, killed or died before their run
    ended: their time up to then is in the sums), ``unmeasured_attempts`` (no CPU seconds: the sum
    is a lower bound); empty when the cell has no record (e.g. it was run by hand)."""
    p = Path(path)
    if not p.is_file():
        return {}
    attempts = json.loads(p.read_text()).get("attempts", [])

    def total(key: str) -> float | None:
        vals = [a[key] for a in attempts if a.get(key) is not None]
        return round(sum(vals), 3) if vals else None

    def peak(key: str) -> float | None:
        vals = [a[key] for a in attempts if a.get(key) is not None]
        return max(vals) if vals else None

    return {"cpu_s": total("cpu_s"), "wall_s": total("wall_s"), "peak_rss_mb": peak("peak_rss_mb"),
            "peak_cuda_mb": peak("peak_cuda_mb"), "attempts": len(attempts),
            "interrupted_attempts": sum(1 for a in attempts if a.get("interrupted")),
            "unmeasured_attempts": sum(1 for a in attempts if a.get("cpu_s") is None),
            "threads": attempts[-1].get("threads") if attempts else None}


def append_invocation(study_dir: str | os.PathLike, entry: dict[str, Any]) -> int:
    """Append an invocation line (written at the start, so a killed run leaves its line);
    returns its index for :func:`update_invocation`."""
    runs = read_invocations(study_dir)
    p = Path(study_dir) / "invocations.jsonl"
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a") as f:
        f.write(json.dumps(entry) + "\n")
    return len(runs)


def update_invocation(study_dir: str | os.PathLike, index: int, entry: dict[str, Any]) -> None:
    """Complete line ``index`` with ``entry`` (at the end of the invocation)."""
    runs = read_invocations(study_dir)
    runs[index].update(entry)
    write_text_atomic(Path(study_dir) / "invocations.jsonl", "".join(json.dumps(r) + "\n" for r in runs))


def read_invocations(study_dir: str | os.PathLike) -> list[dict[str, Any]]:
    p = Path(study_dir) / "invocations.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
