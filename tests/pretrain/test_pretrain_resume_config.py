"""Resume checks the config: result-changing keys must match the saved state (or be allowed)."""
from __future__ import annotations

import pytest

from multimae_att.config import config_to_dict
from multimae_att.pretrain.config import PretrainConfig, resume_config_changes
from multimae_att.run.metrics_log import MetricsLogger
from multimae_att.run.states import TrainStateStore

from helpers.pretrain import _fresh_accelerate_state, _importable_entry_point, data_root, run_cli, tiny_config


def _changed(**sections) -> PretrainConfig:
    cfg = PretrainConfig()
    for section, values in sections.items():
        for k, v in values.items():
            setattr(getattr(cfg, section), k, v)
    return cfg


def test_which_keys_block_a_resume():
    saved = config_to_dict(PretrainConfig())
    blocking, notes = resume_config_changes(saved, _changed(
        optim={"lr": 2e-3}, masking={"params": {"noise": 0.5}}, train={"seed": 1, "max_steps": 5},
        data={"num_workers": 1, "root": "/elsewhere", "crop_scale": (0.5, 1.0)},
        log={"every": 3}, init={"allow_config_change": True}))
    assert blocking == ["data.crop_scale: [0.2, 1.0] -> [0.5, 1.0]", "masking.params: {} -> {'noise': 0.5}",
                        "optim.lr: None -> 0.002", "train.seed: 0 -> 1"]
    assert notes == ["data.num_workers: 8 -> 1", "data.root: 'data/imagenet_multimae' -> '/elsewhere'",
                     "init.allow_config_change: False -> True", "log.every: 10 -> 3",
                     "train.max_steps: None -> 5"]
    # With AttG the run length sets tau's schedule: then it changes the results.
    attg = _changed(train={"max_steps": 5})
    attg.loss.attg.enabled = True
    saved["loss"]["attg"]["enabled"] = True
    assert resume_config_changes(saved, attg)[0] == ["train.max_steps: None -> 5"]
    # A key the saved state does not know (older schema) is a note, not an error.
    del saved["masking"]["cache"]["refresh"]
    assert "masking.cache.refresh: not in the saved state" in resume_config_changes(saved, attg)[1]


def test_resume_with_a_changed_key_stops_before_any_work(tmp_path, data_root, capsys):
    cfg = tiny_config(tmp_path / "c.yaml", data_root, train={"max_steps": 2, "save_every": 1})
    out = tmp_path / "run"
    run_cli("--config", str(cfg), f"output_dir={out}")
    states = TrainStateStore(out / "checkpoints").list()
    with pytest.raises(SystemExit) as err:
        run_cli("--config", str(cfg), f"output_dir={out}", "train.max_steps=3", "optim.lr=0.002",
                "masking.num_encoded_tokens=5")
    msg = str(err.value.code)
    assert "optim.lr: 0.001 -> 0.002" in msg and "masking.num_encoded_tokens: 6 -> 5" in msg
    assert "init.allow_config_change=true" in msg and "--overwrite" in msg
    assert "init.resume=false" not in msg                     # that advice destroyed runs: never again
    assert "train.max_steps" not in msg                       # harmless: not listed as blocking
    assert TrainStateStore(out / "checkpoints").list() == states   # nothing ran
    # Harmless changes resume (with a note); the run goes on from step 2.
    run_cli("--config", str(cfg), f"output_dir={out}", "train.max_steps=3", "log.every=1",
            "data.num_workers=0")
    assert "note: resuming from" in capsys.readouterr().out
    assert [r["step"] for r in MetricsLogger.read(out / "metrics.jsonl")] == [1, 2, 3]
    # An explicit allow switch resumes with the new values.
    run_cli("--config", str(cfg), f"output_dir={out}", "train.max_steps=4", "optim.lr=0.002",
            "init.allow_config_change=true")
    assert [r["step"] for r in MetricsLogger.read(out / "metrics.jsonl")] == [1, 2, 3, 4]
    from multimae_att.schedules import LRSchedule
    lrs = [r["lr"] for r in MetricsLogger.read(out / "metrics.jsonl")]
    # 16 samples / 4 per step = 4 steps per epoch; warm-up 1 epoch of a 10-epoch cosine.
    assert lrs[2] == pytest.approx(LRSchedule(1e-3, 0.0, 1, 10, 0, 4)(2))
    assert lrs[3] == pytest.approx(LRSchedule(2e-3, 0.0, 1, 10, 0, 4)(3))   # the new optim.lr
