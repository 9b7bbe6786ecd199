"""Exact resume: a run killed with SIGKILL and restarted equals an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from test_pretrain import REPO, data_root, tiny_config

from multimae_att.run.metrics_log import MetricsLogger

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
STEPS = 12


def pretrain_command(cfg: Path, out: Path) -> list[str]:
    return [sys.executable, str(REPO / "run_pretrain.py"), "--config", str(cfg), f"output_dir={out}"]


def comparable_metrics(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "step_time"} for r in MetricsLogger.read(out / "metrics.jsonl")]


def kill_once_logged(command: list[str], out: Path, step: int = 5) -> None:
    """Start ``command`` and SIGKILL it as soon as ``out/metrics.jsonl`` logs ``step``."""
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        log = out / "metrics.jsonl"
        if log.exists() and any(r["step"] >= step for r in _safe_read(log)):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"


def test_sigkill_then_restart_equals_uninterrupted(tmp_path, data_root):
    # Randomness everywhere: noisy masks, per-sample guided/random mix, drop-path, adaptive
    # budgets (saved state), gradient accumulation over epoch boundaries (16 samples, 4 per step).
    cfg = tiny_config(tmp_path / "c.yaml", data_root,
                      model={"drop_path_rate": 0.1},
                      data={"batch_size": 2},
                      masking={"strategy": "noisy", "prob": 0.7, "adaptive": {"enabled": True}},
                      optim={"accum_steps": 2, "clip_grad": 1.0},
                      train={"max_steps": STEPS, "epochs": 10, "save_every": 3, "keep_last": 1})
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(pretrain_command(cfg, ref), check=True, env=ENV, capture_output=True, timeout=300)

    # Kill once step 5 is logged: the state of step 3 is on disk, the run is mid-way.
    kill_once_logged(pretrain_command(cfg, cut), cut, step=5)
    assert not (cut / "final.pth").exists()
    subprocess.run(pretrain_command(cfg, cut), check=True, env=ENV, capture_output=True, timeout=300)

    assert comparable_metrics(cut) == comparable_metrics(ref)  # every logged value, steps 1..12
    assert [r["step"] for r in comparable_metrics(cut)] == list(range(1, STEPS + 1))
    a = torch.load(ref / "final.pth", weights_only=True)["model"]
    b = torch.load(cut / "final.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _safe_read(path: Path) -> list[dict]:
    import json
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return out
