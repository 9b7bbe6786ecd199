"""Two CPU processes (gloo DDP through Accelerate) agree with one process on the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from multimae_att.runstate import MetricsLogger
from test_pretrain import REPO, make_synthetic, tiny_config

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    data = make_synthetic(tmp_path / "data")
    # Adam's eps well above the float noise of gradient all-reduce keeps the comparison tight.
    cfg = tiny_config(tmp_path / "c.yaml", data, data={"batch_size": 2},
                      masking={"strategy": "noisy"}, optim={"eps": 1e-4, "clip_grad": 1.0},
                      train={"max_steps": 3})
    launch = [sys.executable, "-m", "multimae_att.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "29517"]
    two, one = tmp_path / "two", tmp_path / "one"
    subprocess.run([*launch, str(REPO / "run_pretrain.py"), "--config", str(cfg), f"output_dir={two}"],
                   check=True, env=ENV, capture_output=True, timeout=300)
    subprocess.run([sys.executable, str(REPO / "run_pretrain.py"), "--config", str(cfg),
                    f"output_dir={one}", "data.batch_size=4"],
                   check=True, env=ENV, capture_output=True, timeout=300)
    r1, r2 = MetricsLogger.read(one / "metrics.jsonl"), MetricsLogger.read(two / "metrics.jsonl")
    assert [r["step"] for r in r2] == [1, 2, 3]
    for a, b in zip(r1, r2):
        assert a["lr"] == b["lr"] and a["visible"] == b["visible"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        for m in a["losses"]:
            assert b["losses"][m] == pytest.approx(a["losses"][m], rel=1e-5, abs=1e-6)
    w1 = torch.load(one / "final.pth", weights_only=True)["model"]
    w2 = torch.load(two / "final.pth", weights_only=True)["model"]
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert worst < 1e-5, worst       # 3 steps at lr 1e-3 move weights by ~3e-3
