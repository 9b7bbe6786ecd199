"""The local launcher: up to ``jobs`` cells at once, each in one of ``jobs`` long-lived worker
processes (spawned once, so Python + torch start once per worker, not once per cell; see
:mod:`multimae_att.study.cellrun`). Each worker gets ``threads`` torch threads (default: the cores
divided by ``jobs``) and, on a machine with GPUs, one GPU (worker i: GPU i mod count).

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
import sys
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable

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


def _worker_main(conn, threads: int, gpu: int | None, parent: int) -> None:
    _die_with_parent()
    if os.getppid() != parent:      # the launcher died before the signal was armed
        os._exit(1)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the launcher decides what Ctrl-C stops
    from multimae_att.study.cellrun import preload, run_cell_here

    preload()   # imports once per worker, not inside the first cell's measurement
    while True:
        msg = conn.recv()
        if msg is None:
            return
        cell, log = msg
        conn.send(run_cell_here(cell, log, threads))


class _Worker:
    def __init__(self, ctx, threads: int, gpu: int | None) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, threads, gpu, os.getpid()),
                                name="study-worker")
        self.proc.start()
        child.close()
        self.threads, self.gpu = threads, gpu
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


def run_local(cells: list[Cell], todo: list[Cell], study_dir: str, jobs: int, threads: int,
              on_record: Callable[[Cell, dict[str, Any]], None], print_fn=print) -> dict[str, str]:
    """Run ``todo`` (a subset of ``cells`` in plan order) respecting dependencies.

    ``on_record(cell, record)`` is called in this process after each attempt. Returns
    cell id -> 'ok' | 'failed' | 'skipped' for the cells of ``todo``.
    """
    pending_ids = {c.id for c in todo}
    done = {c.id for c in cells if c.id not in pending_ids}       # finished before this run
    outcome: dict[str, str] = {}
    queue = list(todo)
    if not queue:
        return outcome
    try:
        import torch
        gpus = torch.cuda.device_count()
    except Exception:   # noqa: BLE001 -- no usable CUDA
        gpus = 0
    ctx = mp.get_context("spawn")
    workers = [_Worker(ctx, threads, i % gpus if gpus else None) for i in range(min(jobs, len(queue)))]
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
                    workers[i] = _Worker(ctx, w.threads, w.gpu)
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
        print("interrupted: stopping the workers; run the same command again to continue", file=sys.stderr)
        for w in workers:
            if w.proc.is_alive():
                w.proc.kill()
        raise
    finally:
        for w in workers:
            w.stop()
    return outcome
