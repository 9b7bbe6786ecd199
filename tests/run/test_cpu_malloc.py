"""``train.cpu_malloc``: glibc keeps the memory a step frees (no page faults per step), and the
runners set it on a CPU unless told not to."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from helpers import REPO
from helpers.pretrain import _fresh_accelerate_state, _importable_entry_point, data_root, run_cli, tiny_config

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


# A "step" that allocates 40 blocks of 2 MiB and frees them, in a fresh process. With glibc's
# defaults (mmap threshold 128 KiB at start) each block is mapped and unmapped: the memory goes
# back to the OS and the next step faults it in again. With the thresholds fixed the blocks come
# from the heap and stay there for the next step. (Counting the faults themselves proved
# unsteady: glibc's dynamic thresholds adapt after a first step, by 21k or 41k faults.)
_STEP = '''
import resource, sys, torch
if sys.argv[1] == "keep":
    from multimae_att.run.cpu_malloc import keep_freed_memory
    assert keep_freed_memory() is not None
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
before = rss()
blocks = [torch.ones(1 << 19) for _ in range(40)]
del blocks
print((rss() - before) >> 20)
'''


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_keep_freed_memory_keeps_a_steps_freed_memory_for_the_next():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    kept_mib = {mode: int(subprocess.run([sys.executable, "-c", _STEP, mode], env=env, check=True,
                                         capture_output=True, text=True).stdout.split()[-1])
                for mode in ("default", "keep")}
    assert kept_mib["keep"] >= 64 and kept_mib["default"] <= 16, kept_mib   # of the 80 MiB freed


def test_a_cpu_run_keeps_freed_memory_unless_told_not_to(tmp_path, data_root, monkeypatch):
    import multimae_att.run.cpu_malloc as cpu_malloc

    calls = []
    monkeypatch.setattr(cpu_malloc, "keep_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(cpu_malloc, "fixed_thresholds", lambda: None)   # a fresh process
    cfg = tiny_config(tmp_path / "c.yaml", data_root, train={"max_steps": 1, "final_export": False})
    run_cli("--config", str(cfg), f"output_dir={tmp_path / 'keep'}")
    assert calls == [1]
    run_cli("--config", str(cfg), f"output_dir={tmp_path / 'default'}", "train.cpu_malloc=default")
    assert calls == [1]
    # default in a process where an earlier run fixed them: they stay fixed, and the run says so
    monkeypatch.setattr(cpu_malloc, "fixed_thresholds", lambda: {"mmap_threshold": 1, "trim_threshold": 1})
    with pytest.warns(UserWarning, match="cpu_malloc=default: an earlier run in this process"):
        run_cli("--config", str(cfg), f"output_dir={tmp_path / 'after'}", "train.cpu_malloc=default")
    assert calls == [1]


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_thresholds_are_fixed_once_for_the_process():
    from multimae_att.run.cpu_malloc import MMAP_THRESHOLD, TRIM_THRESHOLD, fixed_thresholds, keep_freed_memory

    first = keep_freed_memory()
    assert first == {"mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD} == fixed_thresholds()
    assert keep_freed_memory() == first
