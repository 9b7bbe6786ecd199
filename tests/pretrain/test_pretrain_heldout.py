"""The loss predictor's held-out check (``lossp/spearman``, ``log.heldout_split``): logged at each
record only with predicted losses, computed on the held-out split, and without any effect on
training; a missing split fails fast naming the key."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from multimae_att.run.metrics_log import MetricsLogger

from helpers.pretrain import (
    _fresh_accelerate_state,
    _importable_entry_point,
    data_root,
    error_text,
    run_cli,
    tiny_config,
)

LOSSP = ["masking.strategy=hpm", "masking.score_source=predicted_loss", "data.image_size=48",
         "masking.num_encoded_tokens=9"]
# everything training produces (the held-out figure aside)
TRAINING_KEYS = ("step", "loss", "losses", "visible", "guided_fraction", "lossp/loss", "lossp/spearman_train")


def _run(tmp_path, root, name: str, *overrides: str) -> list[dict]:
    cfg = tiny_config(tmp_path / f"{name}.yaml", root, train={"max_steps": 3}, log={"every": 2})
    run_cli("--config", str(cfg), f"output_dir={tmp_path / name}", *overrides)
    return MetricsLogger.read(tmp_path / name / "metrics.jsonl")


def _training(recs: list[dict]) -> list[dict]:
    return [{k: r.get(k) for k in TRAINING_KEYS} for r in recs]


def test_heldout_spearman_at_records_without_changing_training(tmp_path, data_root):
    on = _run(tmp_path, data_root, "on", *LOSSP, "log.heldout_split=val")
    assert [r["step"] for r in on] == [2, 3]                        # each log.every-th step and the last
    assert all(-1 <= r["lossp/spearman"] <= 1 and "lossp/spearman_train" in r for r in on)
    assert all(r["time/heldout_s"] >= 0 for r in on)                # its own time, not in step_time
    off = _run(tmp_path, data_root, "off", *LOSSP)                  # log.heldout_split: null (default)
    assert all("lossp/spearman" not in r and "time/heldout_s" not in r for r in off)
    assert _training(on) == _training(off)                          # bit-identical training
    attention = _run(tmp_path, data_root, "att", "masking.strategy=hpm", "log.heldout_split=val")
    assert all("lossp/spearman" not in r and "lossp/loss" not in r for r in attention)


def test_heldout_spearman_reads_the_heldout_split(tmp_path, data_root):
    poked = tmp_path / "poked"
    shutil.copytree(data_root, poked)
    for png in sorted((poked / "val" / "rgb").rglob("*.png")):     # other held-out images, same training data
        rgb = np.asarray(Image.open(png).convert("RGB"))
        Image.fromarray(np.ascontiguousarray(255 - rgb[::-1])).save(png)
    a = _run(tmp_path, data_root, "a", *LOSSP, "log.heldout_split=val")
    b = _run(tmp_path, poked, "b", *LOSSP, "log.heldout_split=val")
    assert _training(a) == _training(b)
    assert [r["lossp/spearman"] for r in a] != [r["lossp/spearman"] for r in b]
    # the figure is the held-out images': the fixed masks give the same value in a rerun
    assert [r["lossp/spearman"] for r in a] == [r["lossp/spearman"] for r in _run(
        tmp_path, data_root, "a2", *LOSSP, "log.heldout_split=val")]


def test_missing_heldout_split_fails_fast_naming_the_key(tmp_path, data_root, capsys):
    cfg = tiny_config(tmp_path / "c.yaml", data_root)
    with pytest.raises(SystemExit) as e:
        run_cli("--config", str(cfg), f"output_dir={tmp_path / 'run'}", *LOSSP, "log.heldout_split=test")
    text = error_text(e, capsys)
    assert "log.heldout_split='test'" in text and str(data_root / "test") in text
    assert not (tmp_path / "run" / "checkpoints").exists()         # before any work


def test_check_restores_train_mode_and_draws_no_global_randomness():
    from multimae_att.model import create_pretrain_model
    from multimae_att.pretrain.heldout import HeldoutRanking
    from multimae_att.scoring.loss_prediction import LossPredictor
    from multimae_att.scoring.sources import PredictedLossScores

    torch.manual_seed(0)
    model = create_pretrain_model("tiny", image_size=32, semseg_num_classes=10, drop_path_rate=0.1)
    head = LossPredictor(["rgb", "depth", "semseg"], model.dim_tokens)
    g = torch.Generator().manual_seed(1)
    inputs = [{"rgb": torch.randn(2, 3, 32, 32, generator=g), "depth": torch.randn(2, 1, 32, 32, generator=g),
               "semseg": torch.randint(0, 10, (2, 8, 8), generator=g)} for _ in range(2)]
    check = HeldoutRanking(inputs, PredictedLossScores(head), 4, 1.0, False, {}, None, seed=0)
    model.train()
    rng = torch.get_rng_state()
    first = check(model)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(first, check(model))                        # the same masks every time
    assert check.samples == 4 and -1 <= first.item() <= 1



def test_only_the_main_process_builds_the_check_and_its_error_stops_every_process(monkeypatch):
    """run_on_main as the runner calls it for the held-out check, two processes simulated: the
    broadcast hands the main process's box to the other one."""
    import accelerate.utils

    from multimae_att.run.on_main import run_on_main

    class Acc:
        num_processes = 2

        def __init__(self, main):
            self.is_main_process = main

    sent = {}

    def broadcast(box, from_process=0):
        if "box" in sent:
            box[:] = sent.pop("box")            # the other process receives
        else:
            sent["box"] = list(box)             # the main process sends (it runs first here)
        return box

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", broadcast)
    calls = []

    def build():
        calls.append(1)
        return "check"

    assert run_on_main(Acc(True), build) == "check" and run_on_main(Acc(False), build) is None
    assert calls == [1]                                            # built once, on the main process
    assert run_on_main(Acc(True), build, share=True) == "check" == run_on_main(Acc(False), build, share=True)

    def missing():
        raise ValueError("log.heldout_split='test' has no images")

    for main in (True, False):                                     # the main's error, in both
        with pytest.raises(ValueError, match="log.heldout_split='test'"):
            run_on_main(Acc(main), missing)
    assert run_on_main(None, build) == "check"                     # one process: just the call
