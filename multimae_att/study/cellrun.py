"""Run one cell inside the current process, as its entry point would, and measure it.

Why in-process: starting Python + torch + timm + Accelerate costs ~3.7 CPU-seconds per process
on a 2-core CPU (measured), which for ~200 small cells is minutes of pure start-up. The local
launcher therefore keeps a few long-lived worker processes (:mod:`multimae_att.study.local`) and
runs cell after cell in each. What one cell could leave behind for the next is reset here before
every cell: Accelerate's per-process singletons, torch/numpy/Python RNG states, the number of torch
threads, the default dtype, grad mode, environment variables, working directory and ``sys.argv``.
The runners seed everything they draw themselves; ``tests/study/test_study.py`` checks that a cell run
after another one in the same worker gives bit-identical weights to a fresh ``python run_pretrain.py``.

Measurement per cell: wall and CPU seconds (this process and its reaped children), peak resident
memory (``VmHWM``, reset before the cell through ``/proc/self/clear_refs`` on Linux) and peak CUDA
memory when a GPU is used. A cell the launcher stops (:class:`CellStopped`, raised in the worker by
its SIGTERM) is measured up to that moment and its attempt marked ``interrupted: stopped``.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import random
import resource
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from multimae_att.study.plan import DIAGNOSE, FINETUNE, PRETRAIN, Cell, entry_path

__all__ = ["run_cell_here", "run_command", "entry_main", "fresh_state", "preload", "cpu_seconds",
           "CellStopped", "STOP_GRACE_S", "die_with_parent"]

_MAINS: dict[str, Callable] = {}
STOP_GRACE_S = 30.0   # seconds a stopped cell's own child processes get to end before SIGKILL


class CellStopped(BaseException):
    """The launcher stopped the cell running here (SIGTERM to its worker): the cell unwinds and
    its attempt is recorded, measured up to this moment (not an ``Exception``: runners that catch
    errors must not swallow it)."""


def entry_main(entry: str) -> Callable:
    """``main(argv)`` of a runner script (``*.py``, loaded from the repository root) or of a
    module (``multimae_att.diagnose``)."""
    if entry not in _MAINS:
        if not entry.endswith(".py"):
            module = importlib.import_module(entry)
        else:
            spec = importlib.util.spec_from_file_location(f"_study_{Path(entry).stem}", entry_path(entry))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        _MAINS[entry] = module.main
    return _MAINS[entry]


def preload(entries: Iterable[str] = (PRETRAIN, FINETUNE, DIAGNOSE)) -> None:
    """Import what the cells of these entry points need (torch, timm, Accelerate, the runners,
    the diagnostics), so no cell's measurement holds the imports."""
    import accelerate  # noqa: F401

    for entry in entries:
        entry_main(entry)
    if PRETRAIN in entries:
        importlib.import_module("multimae_att.pretrain.loop")
    if FINETUNE in entries:
        importlib.import_module("multimae_att.finetune.engine")


def fresh_state(threads: int) -> None:
    """Reset what a previous cell in this process may have changed (see the module docstring)."""
    import numpy as np
    import torch
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(threads)
    torch.set_default_dtype(torch.float32)
    torch.set_grad_enabled(True)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


def cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@contextmanager
def _redirected(log_path: Path) -> Iterator[None]:
    """stdout and stderr (file descriptors 1 and 2, so child processes too) appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_cell_here(cell: Cell, log_path: str | os.PathLike, threads: int) -> dict[str, Any]:
    """Run ``cell`` in this process with its output appended to ``log_path``; returns the
    attempt's record: ``ok``, ``error``, ``wall_s``, ``cpu_s``, ``peak_rss_mb``, ``peak_cuda_mb``,
    ``threads``, ``host``, ``started``, ``load_before``/``load_after`` (1-minute load average), and
    ``interrupted: 'stopped'`` for a cell ended by :class:`CellStopped` (a ``KeyboardInterrupt`` is
    re-raised once the attempt is measured)."""
    import torch

    env, cwd, argv = dict(os.environ), os.getcwd(), list(sys.argv)
    fresh_state(threads)
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_reset = _reset_peak_rss()
    record: dict[str, Any] = {"ok": False, "error": None, "threads": threads, "host": socket.gethostname(),
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                              "load_before": os.getloadavg()[0], "pid": os.getpid()}
    t0, c0 = time.perf_counter(), cpu_seconds()
    interrupt: KeyboardInterrupt | None = None
    with _redirected(Path(log_path)):
        print(f"=== {cell.id}: {' '.join(cell.command())}", flush=True)
        try:
            sys.argv = [cell.entry, *cell.argv]
            entry_main(cell.entry)(list(cell.argv))
            record["ok"] = True
        except SystemExit as e:          # the runners exit with a message on a config error
            record["ok"] = e.code in (0, None)
            if not record["ok"]:
                record["error"] = str(e.code)
                print(e.code, file=sys.stderr)
        except BaseException as e:  # noqa: BLE001 -- recorded; KeyboardInterrupt re-raised below
            record["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            if isinstance(e, (CellStopped, KeyboardInterrupt)):
                record["interrupted"] = "stopped"
            if isinstance(e, KeyboardInterrupt):
                interrupt = e
        finally:
            sys.argv = argv
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(env)
    record["wall_s"] = round(time.perf_counter() - t0, 3)
    record["cpu_s"] = round(cpu_seconds() - c0, 3)
    peak = _peak_rss_mb() if rss_reset else None   # without the reset it would be the worker's peak
    record["peak_rss_mb"] = round(peak, 1) if peak is not None else None
    record["peak_cuda_mb"] = (round(torch.cuda.max_memory_allocated() / 2**20, 1)
                              if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    record["load_after"] = os.getloadavg()[0]
    if interrupt is not None:
        raise interrupt
    return record


def _prctl() -> Callable[..., int] | None:
    """The C library's ``prctl`` (Linux), None elsewhere."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(sig: int, parent: int, prctl: Callable[..., int] | None = None) -> None:
    """Linux: have the kernel send ``sig`` to this process when its parent (pid ``parent``) dies
    (prctl ``PR_SET_PDEATHSIG``); exit at once if the parent is already gone. Elsewhere nothing
    is armed. ``prctl``: the C function looked up beforehand (:func:`_prctl`), as a child between
    fork and exec must do no more than call it (no ``dlopen``, no import: another thread of the
    parent may have held their locks at the fork)."""
    prctl = prctl or _prctl()
    if prctl is None or prctl(1, int(sig)) != 0:
        return
    if os.getppid() != parent:   # the parent died before the signal was armed
        os._exit(1)


def _signal_group(child, sig: int) -> None:
    """``sig`` to the child's process group: the child and every process it started."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, sig)


def run_command(cell_id: str, command: list[str], log_path: str | os.PathLike,
                cwd: str | None = None) -> dict[str, Any]:
    """Run a cell as a child process (an Accelerate launch of its runner), output appended to
    ``log_path``; the attempt's record as :func:`run_cell_here`'s (CPU seconds and peak memory of
    the reaped children: the launcher and every process it started).

    The child leads a process group of its own. Stopped here (:class:`CellStopped`,
    ``KeyboardInterrupt``), the whole group gets SIGTERM, SIGKILL after :data:`STOP_GRACE_S`, and
    the child is reaped before the attempt is measured. Should this process die first (killed by
    the launcher), the child gets SIGTERM from the kernel (:func:`die_with_parent`), which
    ``python -m multimae_att.launch`` passes on to its group (Accelerate's single-process launcher
    would not)."""
    import subprocess

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    record: dict[str, Any] = {"host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                              "load_before": os.getloadavg()[0], "job_id": os.environ.get("SLURM_JOB_ID")}
    t0 = time.perf_counter()
    interrupt: BaseException | None = None
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    prctl = _prctl()
    arm = functools.partial(die_with_parent, signal.SIGTERM, os.getpid(), prctl) if prctl is not None else None
    with open(log_path, "a") as log:
        log.write(f"=== {cell_id}: {' '.join(command)}\n")
        log.flush()
        child = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                 preexec_fn=arm)
        try:
            code = child.wait()
        except (CellStopped, KeyboardInterrupt) as e:
            interrupt = e
            _signal_group(child, signal.SIGTERM)
            try:
                code = child.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(child, signal.SIGKILL)
                code = child.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    record.update(ok=code == 0 and interrupt is None, error=None if code == 0 else f"exit code {code}",
                  wall_s=round(time.perf_counter() - t0, 3),
                  cpu_s=round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 3),
                  peak_rss_mb=round(after.ru_maxrss / 1024, 1), peak_cuda_mb=None,
                  load_after=os.getloadavg()[0])
    if interrupt is not None:
        record.update(error=f"{type(interrupt).__name__}: {interrupt} (exit code {code})", interrupted="stopped")
        if isinstance(interrupt, KeyboardInterrupt):
            raise interrupt
    return record
