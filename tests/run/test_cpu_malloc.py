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


def _huge_pages_always() -> bool:
    """Transparent huge pages for every mapping: a heap then faults in 2-MiB pages, far fewer."""
    try:
        return "[always]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False

# A "step" that allocates 40 blocks of 2 MiB and frees them: with glibc's defaults the freed heap
# top (80 MiB, above the dynamic trim threshold) goes back to the OS and is faulted in again.
_STEPS = '''
import resource, sys, torch
if sys.argv[1] == "keep":
    from multimae_att.run.cpu_malloc import keep_freed_memory
    assert keep_freed_memory() is not None
def step():
    blocks = [torch.ones(1 << 19) for _ in range(40)]
    del blocks
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


@pytest.mark.skipif(not GLIBC or _huge_pages_always(), reason="glibc malloc, 4-KiB pages")
def test_keep_freed_memory_ends_the_page_faults_of_repeated_steps():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    faults = {mode: int(subprocess.run([sys.executable, "-c", _STEPS, mode], env=env, check=True,
                                       capture_output=True, text=True).stdout.split()[-1])
              for mode in ("default", "keep")}
    # 5 steps x 80 MiB = 100k pages at most; glibc's default trims and refaults most of them
    assert faults["default"] > 20_000, faults
    assert faults["keep"] < faults["default"] / 5, faults


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
