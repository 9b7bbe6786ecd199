"""The local launcher: up to ``jobs`` cells at once, each in one of ``jobs`` long-lived worker
processes (spawned once, so Python + torch start once per worker, not once per cell; see
:mod:`multimae_att.study.cellrun`). Each worker gets ``threads`` torch threads (default: the cores
divided by ``jobs``) and, on a machine with GPUs, one GPU (worker i: GPU i mod count). With
``gpus_per_cell >= 2`` a worker instead starts each run as an Accelerate launch over its own
``gpus_per_cell`` GPUs (the diagnostics stay in-process).

A cell starts when the cells it depends on are finished; among the ready cells the first in plan
order goes first. A failed cell is reported (its log in ``<study_dir>/logs/``) and the cells that
depend on it are skipped; independent cells go on.

Stopping: Ctrl-C (SIGINT) or ``kill <pid>`` (SIGTERM; a study started with ``&`` from a script
ignores SIGINT) stops the running cells cleanly: each worker gets SIGTERM, its cell unwinds
(:class:`multimae_att.study.cellrun.CellStopped`) and its attempt is recorded with its wall and CPU
seconds up to then (``interrupted: stopped``); a worker still running after
:data:`multimae_att.study.cellrun.STOP_GRACE_S` + 10 s is killed and its attempt measured from here
(``interrupted: killed``), as is the attempt of a worker that died on its own (``died``). A worker
also dies with the launcher (Linux parent-death signal), and a cell's Accelerate launch gets SIGTERM
when its worker dies, so neither a killed worker nor a study killed with SIGKILL leaves a stray
writer (but the latter leaves no record of its running cells). The same command continues: finished cells
are skipped, interrupted ones resume from their training states through the runners' own resume.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from multimae_att.study.cellrun import STOP_GRACE_S, CellStopped, die_with_parent
from multimae_att.study.plan import Cell

__all__ = ["run_local", "default_threads", "log_path", "record_path", "process_cpu_seconds"]


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


def process_cpu_seconds(pid: int) -> float | None:
    """CPU seconds of process ``pid`` and its reaped children, from ``/proc/<pid>/stat`` (Linux;
    still readable for a dead process until it is reaped); None where there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")   # utime stime cutime cstime
    except (OSError, ValueError, IndexError):
        return None


def _stop_cell(signum, frame) -> None:
    """A worker's SIGTERM while it runs a cell: end the cell (once; the record is still to be sent)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise CellStopped(f"stopped by the study launcher ({signal.Signals(signum).name})")


def _worker_main(conn, threads: int, devices: str | None, launch: tuple[int, int] | None,
                 entries: tuple[str, ...], parent: int) -> None:
    """``devices``: CUDA_VISIBLE_DEVICES of this worker; ``launch``: (GPUs, rendezvous port) to
    run each cell as an Accelerate launch, None to run it in this process; ``entries``: the entry
    points of the cells to come (imported first)."""
    die_with_parent(signal.SIGKILL, parent)   # no stray writer after the launcher
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the launcher decides what Ctrl-C stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # between cells; during one it stops the cell
    from multimae_att.study.cellrun import preload, run_cell_here, run_command
    from multimae_att.study.plan import DIAGNOSE, cell_job_command

    preload(entries)   # imports once per worker, not inside the first cell's measurement
    while True:
        msg = conn.recv()
        if msg is None:
            return
        cell, log = msg
        signal.signal(signal.SIGTERM, _stop_cell)
        try:
            if launch is not None and cell.entry != DIAGNOSE:
                record = run_command(cell.id, cell_job_command(cell, launch[0], port=launch[1]), log)
                record["threads"] = threads
            else:
                record = run_cell_here(cell, log, threads)
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        conn.send(record)
        if record.get("interrupted"):   # the launcher is stopping
            return


class _Worker:
    def __init__(self, ctx, threads: int, devices: str | None, launch: tuple[int, int] | None,
                 entries: tuple[str, ...]) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, threads, devices, launch, entries, os.getpid()),
                                name="study-worker")
        self.proc.start()
        child.close()
        self.args = threads, devices, launch, entries
        self.cell: Cell | None = None
        self.since: tuple[float, float | None, str] = (0.0, None, "")   # the cell's start: wall, CPU, time

    def send(self, cell: Cell, log: str) -> None:
        self.cell = cell
        self.since = (time.perf_counter(), process_cpu_seconds(self.proc.pid), time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.conn.send((cell, log))

    def result(self) -> dict[str, Any] | None:
        """The attempt of the running cell once it has ended (the worker's record; measured from
        here when the worker died without one), None while it runs."""
        if self.conn.poll():
            try:
                return self.conn.recv()
            except (EOFError, OSError):   # the worker ended without a record
                pass
        cpu = process_cpu_seconds(self.proc.pid)   # before is_alive() reaps a dead worker
        if self.proc.is_alive():
            return None
        return self.unreported(f"worker process died (exit code {self.proc.exitcode})", "died", cpu)

    def unreported(self, error: str, how: str, cpu: float | None) -> dict[str, Any]:
        """The attempt of a cell whose worker gave no record: wall seconds since it was sent, the
        worker's CPU seconds (with its reaped children) since then (a worker's first cell may be
        sent while its imports still run: then they are counted too), ``interrupted: how``."""
        t0, c0, started = self.since
        return {"ok": False, "error": error, "interrupted": how, "measured_by": "launcher",
                "wall_s": round(time.perf_counter() - t0, 3),
                "cpu_s": round(cpu - c0, 3) if cpu is not None and c0 is not None else None,
                "threads": self.args[0], "started": started, "pid": self.proc.pid,
                "peak_rss_mb": None, "peak_cuda_mb": None}

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(timeout=5)
        if self.proc.is_alive():   # SIGTERM is ignored between cells
            self.proc.kill()
            self.proc.join(timeout=5)
        self.conn.close()


def _stop_running(workers: list[_Worker], finish: Callable[[_Worker, dict[str, Any]], None],
                  grace: float = STOP_GRACE_S + 10) -> None:
    """Stop the running cells: SIGTERM to their workers (each cell unwinds and its worker sends
    the measured attempt), SIGKILL to those still running after ``grace`` seconds (measured
    here); ``finish(worker, attempt)`` for each."""
    busy = [w for w in workers if w.cell is not None]
    for w in busy:
        with contextlib.suppress(ProcessLookupError):
            os.kill(w.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while busy:
        left = deadline - time.monotonic()
        if left <= 0:
            for w in busy:
                cpu = process_cpu_seconds(w.proc.pid)
                w.proc.kill()
                w.proc.join(timeout=5)
                finish(w, w.unreported(f"did not stop within {grace:.0f} s; killed", "killed", cpu))
            return
        wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=left)
        for w in list(busy):
            attempt = w.result()
            if attempt is not None:
                busy.remove(w)
                finish(w, attempt)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises ``KeyboardInterrupt('SIGTERM')`` here, like Ctrl-C (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    'skipped' | 'stopped' for the cells of ``todo``. Ctrl-C or SIGTERM stops the running cells,
    records their attempts (see the module docstring) and raises ``KeyboardInterrupt`` (its
    argument ``'SIGTERM'`` for a SIGTERM).
    """
    pending_ids = {c.id for c in todo}
    done = {c.id for c in cells if c.id not in pending_ids}       # finished before this run
    outcome = {} if outcome is None else outcome
    queue = list(todo)
    if not queue:
        return outcome
    ctx = mp.get_context("spawn")
    entries = tuple(sorted({c.entry for c in queue}))
    workers = [_Worker(ctx, threads, *d, entries) for d in _devices(min(jobs, len(queue)), gpus_per_cell)]

    def stopped(w: _Worker, attempt: dict[str, Any]) -> None:
        cell, w.cell = w.cell, None
        on_record(cell, attempt)
        outcome[cell.id] = "ok" if attempt.get("ok") else "stopped"
        cpu = attempt.get("cpu_s")
        print_fn(f"stopped {cell.id} ({attempt.get('interrupted') or 'ended'}): {attempt.get('wall_s', 0):.1f} s wall, "
                 + (f"{cpu:.1f} s CPU" if cpu is not None else "CPU unknown") + " recorded")

    with _sigterm_interrupts():
        try:
            _run_queue(queue, done, outcome, workers, ctx, study_dir, on_record, print_fn)
        except KeyboardInterrupt:
            _stop_running(workers, stopped)
            raise
        finally:
            for w in workers:
                w.stop()
    return outcome


def _run_queue(queue: list[Cell], done: set[str], outcome: dict[str, str], workers: list[_Worker], ctx,
               study_dir: str, on_record: Callable[[Cell, dict[str, Any]], None], print_fn) -> None:
    """The launcher's loop: start ready cells on idle workers (a fresh worker where the last one
    died), record each ended attempt; ``workers`` is updated in place."""
    total, count = len(queue), 0
    while queue or any(w.cell for w in workers):
        blocked = [c for c in queue if any(outcome.get(d) in ("failed", "skipped") for d in c.deps)]
        for c in blocked:
            queue.remove(c)
            outcome[c.id] = "skipped"
            count += 1
            print_fn(f"[{count}/{total}] skipped {c.id} (a cell it needs failed)")
        for i, w in enumerate(workers):
            if w.cell is not None:
                continue
            ready = next((c for c in queue if all(d in done for d in c.deps)), None)
            if ready is None:
                break
            queue.remove(ready)
            if not w.proc.is_alive():   # its previous cell killed it: a fresh worker
                w.stop()
                workers[i] = w = _Worker(ctx, *w.args)
            w.send(ready, str(log_path(study_dir, ready)))
            print_fn(f"start {ready.id}")
        busy = [w for w in workers if w.cell is not None]
        if not busy:
            if queue:   # cannot happen with a well-formed plan; never spin
                raise RuntimeError(f"no runnable cell among {[c.id for c in queue]}")
            break
        wait([w.conn for w in busy] + [w.proc.sentinel for w in busy])
        for w in workers:
            if w.cell is None:
                continue
            record = w.result()
            if record is None:
                continue
            cell, w.cell = w.cell, None
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
