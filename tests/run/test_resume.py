"""Exact resume: a run killed with SIGKILL and restarted equals an uninterrupted run."""
from __future__ import annotations

import subprocess

import torch

from helpers.pretrain import ENV, comparable_metrics, data_root, kill_once_logged, pretrain_command, tiny_config

STEPS = 12


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

