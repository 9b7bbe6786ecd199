"""scripts/gpu_check.sh --dry-run: the GPU check's own code (bench, data, three runs, summary) on the CPU."""
import json
import os
import subprocess

import pytest

from helpers import REPO


@pytest.mark.slow
def test_gpu_check_dry_run_writes_the_summary(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "gpu_check"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out),
                           "--steps", "2"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"fresh", "cache", "amt"}
    for run in summary["runs"].values():
        assert run["steps"] == 2 and run["s_per_step"] > 0 and run["samples_per_s"] > 0
    assert summary["bench"]["efficiency"]["random_step"] > 0
    assert "cached_step/random_step" in summary["bench"]["ratios"]
    assert summary["ddp"].startswith("skipped")
    assert "gpu_check done" in proc.stdout


def test_gpu_check_refuses_without_a_gpu_unless_dry(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
