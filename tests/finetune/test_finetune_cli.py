"""End to end: every synthetic finetuning config from the CLI on a tiny synthetic set; resume."""
import json
import subprocess
import sys

import pytest
import torch

from multimae_att.run.metrics_log import MetricsLogger

from helpers import REPO
from helpers.finetune import run_task, synthetic_root

EXPECTED_KEYS = {
    "cls": {"top1", "top5"},
    "semseg": {"miou", "pixel_acc", "macc", "per_class_iou"},
    "depth": {"delta1", "delta2", "delta3", "abs_rel", "rmse", "log10"},
    "knn": {"knn_top1", "knn_top5", "knn_1shot_top1", "knn_5shot_top1", "knn_20shot_top1"},
    "linear_probe": {"top1", "top5"},
}
@pytest.mark.parametrize("protocol", ["ours", "multimae"])
@pytest.mark.parametrize("task", sorted(EXPECTED_KEYS))
def test_synthetic_config_runs_end_to_end(task, protocol, synthetic_root, tmp_path, capsys):
    extra = [f"data.protocol={protocol}"]
    if task == "semseg" and protocol == "multimae":   # also MultiMAE's depth-input handling
        extra.append("model.in_modalities=[rgb,depth]")
    result = run_task(task, synthetic_root, tmp_path, *extra)
    assert f"protocol {protocol}:" in capsys.readouterr().out
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["task"] == task and EXPECTED_KEYS[task] <= set(written)
    if task != "knn":
        assert written["report"] == ("best" if protocol == "multimae" else "last")
    assert written.keys() == result.keys()
    if task != "knn":
        assert (tmp_path / "checkpoint-best.pth").is_file() and (tmp_path / "checkpoint-last.pth").is_file()
        log = MetricsLogger.read(tmp_path / "metrics.jsonl")
        assert [r["step"] for r in log if "loss" in r] == [1, 2]
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log if "loss" in r)
        key = {"cls": "val/top1", "linear_probe": "val/top1", "semseg": "val/miou",
               "depth": "val/rmse"}[task]
        assert any(key in r for r in log)
    for k in ("top1", "miou", "pixel_acc", "delta1", "knn_top1"):
        if k in written:
            assert 0.0 <= written[k] <= 100.0


def test_init_from_pretraining_checkpoint(synthetic_root, tmp_path, capsys):
    """``init.checkpoint``: a tiny pretraining export (64 px) initialises a 32 px k-NN encoder."""
    from multimae_att.checkpoint import export_weights
    from multimae_att.model import create_pretrain_model
    torch.manual_seed(1)
    pretrained = create_pretrain_model("tiny", image_size=64, patch_size=16, semseg_num_classes=10)
    export_weights(pretrained, tmp_path / "final.pth")
    init = run_task("knn", synthetic_root, tmp_path / "init", f"init.checkpoint={tmp_path / 'final.pth'}")
    report = capsys.readouterr().out
    assert "init from" in report and "0 keys start fresh" in report       # the whole encoder loaded
    assert "input_adapters.semseg" in report and "output_adapters.rgb" in report   # dropped parts
    assert "knn_top1" in init


def test_resume_equals_uninterrupted_run(synthetic_root, tmp_path):
    """Stop after 2 of 4 steps (mid-epoch: 3 batches per epoch), start again: same weights."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_task("semseg", synthetic_root, straight, "train.max_steps=4")
    run_task("semseg", synthetic_root, split, "train.max_steps=2")
    run_task("semseg", synthetic_root, split, "train.max_steps=4")
    a = torch.load(straight / "checkpoint-last.pth", weights_only=True)
    b = torch.load(split / "checkpoint-last.pth", weights_only=True)
    assert a["step"] == b["step"] == 4 and a["epoch"] == b["epoch"] == 1
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0, msg=k)
    losses = [r["loss"] for r in MetricsLogger.read(split / "metrics.jsonl") if "loss" in r]
    ref = [r["loss"] for r in MetricsLogger.read(straight / "metrics.jsonl") if "loss" in r]
    assert losses == ref


def test_cli_subprocess_and_config_typo(synthetic_root, tmp_path):
    cmd = [sys.executable, str(REPO / "run_finetune.py"), "--config",
           str(REPO / "configs/finetune/synthetic_knn.yaml"), f"data.root={synthetic_root}",
           f"output_dir={tmp_path}", "data.image_size=32", "log.progress=false"]
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "knn_top1" in json.loads((tmp_path / "metrics.json").read_text())
    bad = subprocess.run(cmd + ["task.knn_kk=3"], capture_output=True, text=True, env=env, cwd=REPO)
    assert bad.returncode == 2 and "task.knn_k" in bad.stderr
