"""Two CPU processes (gloo DDP through Accelerate) agree with one process on the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from multimae_att.run.metrics_log import MetricsLogger

from helpers import REPO
from helpers.pretrain import make_synthetic, tiny_config

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("cache", [False, True])
def test_two_processes_match_one(tmp_path, cache):
    data = make_synthetic(tmp_path / "data")
    if not cache:  # labels out of range: skipped and counted by whichever process draws them
        for png in sorted((data / "train" / "semseg").rglob("*.png"))[::4]:
            labels = np.array(Image.open(png))
            labels[0, 0] = 200
            Image.fromarray(labels).save(png)
    # Adam's eps well above the float noise of gradient all-reduce keeps the comparison tight.
    masking = {"strategy": "noisy"}
    steps = 3
    if cache:  # full-image refreshes at steps 0 and 4 (4 steps per epoch), each process its half
        masking["cache"] = {"enabled": True, "grid": 8, "refresh_every": 1}
        steps = 5
    cfg = tiny_config(tmp_path / "c.yaml", data, data={"batch_size": 2},
                      masking=masking, optim={"eps": 1e-4, "clip_grad": 1.0},
                      train={"max_steps": steps, "epochs": 2})
    launch = [sys.executable, "-m", "multimae_att.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(29517 + cache)]
    two, one = tmp_path / "two", tmp_path / "one"
    subprocess.run([*launch, str(REPO / "run_pretrain.py"), "--config", str(cfg), f"output_dir={two}"],
                   check=True, env=ENV, capture_output=True, timeout=300)
    subprocess.run([sys.executable, str(REPO / "run_pretrain.py"), "--config", str(cfg),
                    f"output_dir={one}", "data.batch_size=4"],
                   check=True, env=ENV, capture_output=True, timeout=300)
    r1, r2 = MetricsLogger.read(one / "metrics.jsonl"), MetricsLogger.read(two / "metrics.jsonl")
    assert [r["step"] for r in r2] == list(range(1, steps + 1))
    if cache:  # the two processes together refreshed every cell of every sample at epoch 1
        assert (np.load(two / "attention_cache" / "stamps.npy") == 1).all()
    if not cache:  # the run's count, summed over the processes
        assert r2[-1]["skipped_samples"] == r1[-1]["skipped_samples"] > 0
    for a, b in zip(r1, r2):
        assert a["lr"] == b["lr"] and a["visible"] == b["visible"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        for m in a["losses"]:
            assert b["losses"][m] == pytest.approx(a["losses"][m], rel=1e-5, abs=1e-6)
    w1 = torch.load(one / "final.pth", weights_only=True)["model"]
    w2 = torch.load(two / "final.pth", weights_only=True)["model"]
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert worst < 1e-5, worst       # 3 steps at lr 1e-3 move weights by ~3e-3
