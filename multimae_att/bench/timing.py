"""Timing, peak memory and machine details for the benchmark.

Timings interleave the cases (one call of each case per round, rounds repeated) so that a
change in background load on a shared machine hits every case alike; the ratios are then
reported as ratios of medians and as medians of the per-round ratios (the latter cancels slow
drifts in load). The ratios that have targets are also measured back to back
(:func:`measure_ab`): on a shared CPU a call's CPU time still moves by 10-30 % with what the
machine's other cores (or SMT siblings) do, and two calls a second apart share that far more than
two calls ten cases apart.
"""
from __future__ import annotations

import ctypes
import gc
import os
import platform
import random
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cases: Mapping[str, Callable[[], object]], device: torch.device, warmup: int,
            repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds per call of every case: ``warmup`` untimed rounds, then
    ``repeats`` timed rounds, cases interleaved within a round in a shuffled order (seeded): a
    case that follows a memory-hungry one runs on cold caches, and a fixed order would charge
    that to the same case every round.

    The CPU time (all threads of this process) does not count the time the process waits while
    other processes run, so on a shared CPU with one torch thread it is far steadier than the
    wall time; with several threads it also counts their spin-waits.
    """
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    synchronize(device)
    wall: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            _timed_call(cases[name], device, wall[name], cpu[name])
    return wall, cpu


def _timed_call(fn: Callable[[], object], device: torch.device, wall: list[float], cpu: list[float]) -> None:
    """One call of ``fn``, its wall and process-CPU seconds appended to ``wall`` and ``cpu``
    (the device synchronised before and after, so a GPU's queued work is counted)."""
    synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)


def measure_ab(cases: Mapping[str, Callable[[], object]], pairs: Sequence[tuple[str, str]],
               device: torch.device, repeats: int) -> dict[str, dict[str, list[float]]]:
    """A/B timing of each ``(a, b)`` in ``pairs``: ``repeats`` back-to-back calls of the two
    cases, the order alternating (a b, b a, a b, ...) so that neither always runs second.

    Returns ``{"a/b": {"wall": [...], "cpu": [...]}}``: the ratio ``a / b`` of each pair's wall
    and process-CPU seconds. The caller has warmed the cases up (:func:`measure` runs first).
    """
    ratios: dict[str, dict[str, list[float]]] = {}
    for a, b in pairs:
        wall: dict[str, list[float]] = {a: [], b: []}
        cpu: dict[str, list[float]] = {a: [], b: []}
        for i in range(repeats):
            for name in ((a, b) if i % 2 == 0 else (b, a)):
                _timed_call(cases[name], device, wall[name], cpu[name])
        ratios[f"{a}/{b}"] = {"wall": [x / max(y, 1e-12) for x, y in zip(wall[a], wall[b])],
                              "cpu": [x / max(y, 1e-12) for x, y in zip(cpu[a], cpu[b])]}
    return ratios


def quartiles(values: list[float]) -> list[float]:
    """First and third quartile (both the value itself for one value): the spread to quote."""
    if len(values) < 2:
        return [float(values[0])] * 2
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [float(q[0]), float(q[2])]


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def paired_ratio(times: Mapping[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``num / den`` measured in the same round."""
    return median([a / b for a, b in zip(times[num], times[den])])


def _release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``) so RSS deltas mean something."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure is only less exact
        pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of a block, in MiB above the level at its start.

    CUDA: ``torch.cuda.max_memory_allocated`` (exact, tensors only). CPU: the process's resident
    set sampled every 2 ms by a thread, after returning freed heap pages to the OS (approximate:
    pages the allocator keeps, e.g. in thread caches, are reused without showing up; short
    peaks between two samples are missed).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib = float("nan")
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif os.path.exists("/proc/self/statm"):
            _release_free_memory()
            self._base = self._peak = _rss_bytes()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes())
            self.peak_mib = (self._peak - self._base) / 2**20


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_bf16_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return []
    return sorted({f for f in flags if f in ("amx_bf16", "avx512_bf16", "amx_tile", "avx512f")})


def bf16_supported(device: torch.device) -> bool:
    """bf16 autocast is worth it: CUDA with bf16 support, or a CPU with AMX/AVX512-BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return any(f in _cpu_bf16_flags() for f in ("amx_bf16", "avx512_bf16"))


def machine_info(device: torch.device) -> dict:
    """What the figures depend on: versions, threads, CPU/GPU, load at start."""
    info = {
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "cpu_bf16_flags": _cpu_bf16_flags(),
        "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": str(device), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info
