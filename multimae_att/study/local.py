"""The local launcher: up to ``jobs`` cells at once, each in one of ``jobs`` long-lived worker
processes (spawned once, so Python + torch start once per worker, not once per cell; see
:mod:`multimae_att.study.cellrun`). Each worker gets ``threads`` torch threads (default: the cores
divided by ``jobs``) and, on a machine with GPUs, one GPU (worker i: GPU i mod count). With
``gpus_per_cell >= 2`` a worker instead starts each run as an Accelerate launch over its own
``gpus_per_cell`` GPUs (the diagnostics stay in-process).

A cell starts when the cells it depends on are finished; among the ready cells the first in plan
order goes first. A failed cell is reported (its log in ``<study_dir>/logs/``) and the cells that
depend on it are skipped; independent cells go on. Ctrl-C stops the workers; a worker also dies
with the launcher (Linux parent-death signal), so a killed study leaves no stray writer, and the
same command continues: finished cells are skipped, interrupted ones resume from their training
states through the runners' own resume.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections.abc import Callable
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from multimae_att.study.plan import Cell

__all__ = ["run_local", "default_threads", "log_path", "record_path"]


def default_threads(jobs: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // jobs)


def log_path(study_dir: str | os.PathLike, cell: Cell) -> Path:
    return Path(study_dir) / "logs" / f"{cell.id}.log"


def record_path(study_dir: str | os.PathLike, cell: Cell) -> Path:
    return Path(study_dir) / "records" / f"{cell.id}.json"


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the launcher dies (prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _worker_main(conn, threads: int, devices: str | None, launch: tuple[int, int] | None, parent: int) -> None:
    """``devices``: CUDA_VISIBLE_DEVICES of this worker; ``launch``: (GPUs, rendezvous port) to
    run each cell as an Accelerate launch, None to run it in this process."""
    _die_with_parent()
    if os.getppid() != parent:      # the launcher died before the signal was armed
        os._exit(1)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the launcher decides what Ctrl-C stops
    from multimae_att.study.cellrun import preload, run_cell_here, run_command
    from multimae_att.study.plan import DIAGNOSE, cell_job_command

    preload()   # imports once per worker, not inside the first cell's measurement
    while True:
        msg = conn.recv()
        if msg is None:
            return
        cell, log = msg
        if launch is not None and cell.entry != DIAGNOSE:
            record = run_command(cell.id, cell_job_command(cell, launch[0], port=launch[1]), log)
            record["threads"] = threads
        else:
            record = run_cell_here(cell, log, threads)
        conn.send(record)


class _Worker:
    def __init__(self, ctx, threads: int, devices: str | None, launch: tuple[int, int] | None) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, threads, devices, launch, os.getpid()),
                                name="study-worker")
        self.proc.start()
        child.close()
        self.args = threads, devices, launch
        self.cell: Cell | None = None

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=5)
        self.conn.close()


def _devices(jobs: int, gpus_per_cell: int) -> list[tuple[str | None, tuple[int, int] | None]]:
    """Per worker: (CUDA_VISIBLE_DEVICES, Accelerate launch (GPUs, port) or None)."""
    try:
        import torch
        count = torch.cuda.device_count()
    except Exception:   # noqa: BLE001 -- no usable CUDA
        count = 0
    if gpus_per_cell >= 2:
        if count < jobs * gpus_per_cell:
            from multimae_att.config import ConfigError
            raise ConfigError(f"gpus_per_cell={gpus_per_cell} x jobs={jobs} needs {jobs * gpus_per_cell} "
                              f"GPUs; this machine has {count}")
        return [(",".join(str(i * gpus_per_cell + k) for k in range(gpus_per_cell)), (gpus_per_cell, 29500 + i))
                for i in range(jobs)]
    return [(str(i % count) if count else None, None) for i in range(jobs)]


def run_local(cells: list[Cell], todo: list[Cell], study_dir: str, jobs: int, threads: int,
              on_record: Callable[[Cell, dict[str, Any]], None], print_fn=print,
              gpus_per_cell: int = 1, outcome: dict[str, str] | None = None) -> dict[str, str]:
    """Run ``todo`` (a subset of ``cells`` in plan order) respecting dependencies.

    ``on_record(cell, record)`` is called in this process after each attempt. Returns (and fills
    ``outcome`` as cells end, so a Ctrl-C leaves what was done) cell id -> 'ok' | 'failed' |
    'skipped' for the cells of ``todo``. Ctrl-C kills the workers and re-raises.
    """
    pending_ids = {c.id for c in todo}
    done = {c.id for c in cells if c.id not in pending_ids}       # finished before this run
    outcome = {} if outcome is None else outcome
    queue = list(todo)
    if not queue:
        return outcome
    ctx = mp.get_context("spawn")
    workers = [_Worker(ctx, threads, *d) for d in _devices(min(jobs, len(queue)), gpus_per_cell)]
    total, count = len(queue), 0
    try:
        while queue or any(w.cell for w in workers):
            blocked = [c for c in queue if any(outcome.get(d) in ("failed", "skipped") for d in c.deps)]
            for c in blocked:
                queue.remove(c)
                outcome[c.id] = "skipped"
                count += 1
                print_fn(f"[{count}/{total}] skipped {c.id} (a cell it needs failed)")
            for w in workers:
                if w.cell is not None:
                    continue
                ready = next((c for c in queue if all(d in done for d in c.deps)), None)
                if ready is None:
                    break
                queue.remove(ready)
                w.cell = ready
                w.conn.send((ready, str(log_path(study_dir, ready))))
                print_fn(f"start {ready.id}")
            busy = [w for w in workers if w.cell is not None]
            if not busy:
                if queue:   # cannot happen with a well-formed plan; never spin
                    raise RuntimeError(f"no runnable cell among {[c.id for c in queue]}")
                break
            wait([w.conn for w in busy] + [w.proc.sentinel for w in busy])
            for i, w in enumerate(workers):
                if w.cell is None:
                    continue
                if w.conn.poll():
                    record = w.conn.recv()
                elif not w.proc.is_alive():
                    record = {"ok": False, "error": f"worker process died (exit code {w.proc.exitcode})"}
                    w.conn.close()
                    workers[i] = _Worker(ctx, *w.args)
                else:
                    continue
                cell, w.cell = w.cell, None
                workers[i].cell = None
                on_record(cell, record)
                count += 1
                if record["ok"]:
                    done.add(cell.id)
                    outcome[cell.id] = "ok"
                    print_fn(f"[{count}/{total}] done {cell.id}: {record.get('wall_s', 0):.1f} s wall, "
                             f"{record.get('cpu_s', 0):.1f} s CPU")
                else:
                    outcome[cell.id] = "failed"
                    print_fn(f"[{count}/{total}] FAILED {cell.id}: {record.get('error')} "
                             f"(log: {log_path(study_dir, cell)})")
    except KeyboardInterrupt:
        for w in workers:
            if w.proc.is_alive():
                w.proc.kill()
        raise
    finally:
        for w in workers:
            w.stop()
    return outcome
