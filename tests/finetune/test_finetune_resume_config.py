"""Finetune resume checks the config: result-changing keys must match the saved state (or be allowed)."""
from __future__ import annotations

import pytest

from multimae_att.config import config_to_dict
from multimae_att.finetune.config import FinetuneConfig, resume_config_changes
from multimae_att.run.metrics_log import MetricsLogger
from multimae_att.run.states import TrainStateStore

from helpers.finetune import run_task, synthetic_root


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)


def test_which_keys_block_a_finetune_resume():
    saved = config_to_dict(FinetuneConfig())
    cfg = FinetuneConfig()
    cfg.optim.layer_decay, cfg.task.mixup, cfg.head.depth, cfg.train.epochs = 0.75, 0.0, 2, 50.0
    cfg.data.hflip, cfg.data.root, cfg.data.num_workers, cfg.data.eval_batch_size = 0.0, "/x", 1, 4
    cfg.train.max_steps, cfg.log.every, cfg.init.checkpoint = 7, 3, "ckpt.pth"
    cfg.init.allow_config_change = True
    blocking, notes = resume_config_changes(saved, cfg)
    assert blocking == ["data.hflip: 0.5 -> 0.0", "head.depth: 4 -> 2", "optim.layer_decay: 0.65 -> 0.75",
                        "task.mixup: 0.8 -> 0.0", "train.epochs: 100.0 -> 50.0"]
    assert notes == ["data.eval_batch_size: None -> 4", "data.num_workers: 8 -> 1",
                     "data.root: 'data/imagenet' -> '/x'",
                     "init.allow_config_change: False -> True", "init.checkpoint: None -> 'ckpt.pth'",
                     "log.every: 10 -> 3", "train.max_steps: None -> 7"]
    # States saved before init.allow_config_change existed: silently fine; other new keys: a note.
    del saved["init"]["allow_config_change"], saved["task"]["knn_k"]
    assert resume_config_changes(saved, FinetuneConfig()) == ([], ["task.knn_k: not in the saved state"])


def test_finetune_resume_with_a_changed_key_stops_before_any_work(synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    run_task("cls", synthetic_root, out)                          # 2 steps, one training state
    states = TrainStateStore(out / "checkpoints").list()
    config_yaml, log = (out / "config.yaml").read_text(), (out / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as err:
        run_task("cls", synthetic_root, out, "train.max_steps=3", "optim.lr=0.002", "task.mixup=0.5")
    msg = str(err.value.code)
    assert "optim.lr: 0.001 -> 0.002" in msg and "task.mixup: 0.8 -> 0.5" in msg
    assert "init.allow_config_change=true" in msg and "train.max_steps" not in msg
    assert TrainStateStore(out / "checkpoints").list() == states      # nothing ran or was rewritten
    assert (out / "config.yaml").read_text() == config_yaml and (out / "metrics.jsonl").read_text() == log
    # Harmless changes resume with a note; the run goes on from step 2.
    capsys.readouterr()
    run_task("cls", synthetic_root, out, "train.max_steps=3", "data.eval_batch_size=4", "log.every=2")
    printed = capsys.readouterr().out
    assert "note: resuming from" in printed and "data.eval_batch_size: None -> 4" in printed
    assert [r["step"] for r in MetricsLogger.read(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3]
    # The allow switch resumes with the new values (a warning lists them).
    run_task("cls", synthetic_root, out, "train.max_steps=4", "optim.lr=0.002", "init.allow_config_change=true")
    assert "warning: init.allow_config_change=true" in capsys.readouterr().out
    log = MetricsLogger.read(out / "metrics.jsonl")
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    # 24 samples / 8 per step = 3 steps per epoch; warm-up 1 epoch of a 6-epoch cosine; lr_at(step - 1).
    from multimae_att.finetune.engine import cosine_lr
    lrs = [r["lr"] for r in log if "loss" in r]
    assert lrs[2] == pytest.approx(cosine_lr(2 / 3, 1e-3, 1e-5, 1, 6))
    assert lrs[3] == pytest.approx(cosine_lr(3 / 3, 2e-3, 1e-5, 1, 6))     # the new optim.lr
