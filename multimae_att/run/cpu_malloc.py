"""``train.cpu_malloc``: on a CPU, keep the memory a training step frees for the next step.

Why: a step allocates and frees the same few hundred MB of activations and gradients every
time. glibc's ``malloc`` serves a large block (above its mmap threshold: 128 KiB, rising with
the blocks freed, at most 32 MiB on 64-bit) with a fresh ``mmap`` and returns the top of its heap
to the OS once more than the trim threshold is free, so the next step faults those pages in and
zeroes them again. Measured on the bench's ``small`` preset (1 thread, process CPU time,
docs/BENCHMARKS.md): 37k-54k minor page faults per ``random_step`` with glibc's defaults and
none with :func:`keep_freed_memory`, the step 10 % (bf16) and 5-17 % (fp32) cheaper. How many
faults a step takes also depends on what the process allocated before (the same AMT step took
1 fault in one process and 22k in another), a noise of its own in any step-time comparison.

:func:`keep_freed_memory` fixes both thresholds (``mallopt``; fixing them also ends glibc's
dynamic adjustment): blocks up to 32 MiB come from the heap, and up to 1 GiB of free heap top is
kept. The price: the process keeps its peak heap instead of shrinking between steps. Blocks above
32 MiB (a ``base`` preset's large activations) are still mapped per call: glibc allows no higher
threshold (``M_MMAP_MAX=0`` would serve them from the heap too, not done here). Elsewhere than
glibc (macOS, musl), or with another allocator preloaded, nothing is changed. The setting holds
for the rest of the process: a later run in the same process (a study's worker, a test session)
with ``train.cpu_malloc: default`` keeps it, with a warning. GPU memory has its own caching
allocator: this concerns CPU runs (and the host side of any run, which allocates little).
"""
from __future__ import annotations

import ctypes
import platform
import warnings

__all__ = ["apply_cpu_malloc", "keep_freed_memory", "fixed_thresholds", "MMAP_THRESHOLD", "TRIM_THRESHOLD",
           "CPU_MALLOC_CHOICES"]

CPU_MALLOC_CHOICES = ("keep", "default")
MMAP_THRESHOLD = 32 << 20   # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30    # mallopt takes an int
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # malloc.h


def keep_freed_memory() -> dict[str, int] | None:
    """Fix glibc's mmap and trim thresholds for this process (see the module doc); returns the
    thresholds in force, or None where nothing could be fixed: the C library is not glibc, or
    another allocator (jemalloc, tcmalloc through ``LD_PRELOAD``) serves ``malloc``. For the
    rest of the process: glibc's dynamic thresholds cannot be switched back on."""
    global _FIXED
    if _FIXED is None and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL("libc.so.6")
            interposed = (ctypes.cast(ctypes.CDLL(None).malloc, ctypes.c_void_p).value
                          != ctypes.cast(libc.malloc, ctypes.c_void_p).value)
        except (OSError, AttributeError):
            return None
        if interposed:
            return None
        mallopt = libc.mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD):
            _FIXED = {"mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}
    return fixed_thresholds()


def fixed_thresholds() -> dict[str, int] | None:
    """The thresholds :func:`keep_freed_memory` fixed in this process, None if it has not."""
    return dict(_FIXED) if _FIXED is not None else None


_FIXED: dict[str, int] | None = None


def apply_cpu_malloc(mode: str, stuck_warning: str) -> dict[str, int] | None:
    """``mode`` ``keep``: :func:`keep_freed_memory`; ``default``: leave glibc's thresholds, and
    warn with ``stuck_warning`` when an earlier ``keep`` in this process already fixed them (they
    stay fixed). Returns the thresholds in force (None: glibc's own)."""
    if mode == "keep":
        return keep_freed_memory()
    if fixed_thresholds() is not None:
        warnings.warn(stuck_warning, stacklevel=3)
    return fixed_thresholds()
