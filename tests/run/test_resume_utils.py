"""Run-state utilities: atomic saves, keep-last-N, position seeds, metrics log."""
import os

import numpy as np
import pytest
import torch

from multimae_att.atomic import save_atomic
from multimae_att.run.metrics_log import MetricsLogger
from multimae_att.run.states import TrainStateStore, load_state
from multimae_att.seeds import step_seed


def test_store_keeps_last_n_and_finds_latest(tmp_path):
    store = TrainStateStore(tmp_path / "ckpt", keep_last=2)
    assert store.latest() is None and store.load_latest() is None
    for step in (3, 10, 7, 12):
        store.save({"step": step, "w": torch.full((2,), float(step))}, step)
    assert [s for s, _ in store.list()] == [10, 12]
    assert store.load_latest()["step"] == 12
    assert not [p for p in os.listdir(tmp_path / "ckpt") if p.startswith(".")]  # no temp files


class _Evil:
    pass


def test_load_state_refuses_pickled_objects(tmp_path):
    torch.save({"x": _Evil()}, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="weights_only"):
        load_state(tmp_path / "bad.pth")


def test_save_atomic_keeps_old_file_when_write_fails(tmp_path):
    p = tmp_path / "a.pth"
    save_atomic({"v": 1}, p)

    class Unsavable:
        def __reduce__(self):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"v": Unsavable()}, p)
    assert load_state(p) == {"v": 1} and os.listdir(tmp_path) == ["a.pth"]


def test_step_seed_stable_and_distinct():
    assert step_seed(0, 5, 1) == step_seed(0, 5, 1)
    assert len({step_seed(0, s, r) for s in range(50) for r in range(2)}) == 100
    assert 0 <= step_seed(123, "x") < 2 ** 63


def test_metrics_logger_resume_truncates(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLogger(path)
    for s in range(1, 6):
        log.log({"step": s, "loss": torch.tensor(float(s)), "v": np.float32(0.5), "n": float("nan")})
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')      # a line cut by SIGKILL
    MetricsLogger(path, resume_step=3)
    recs = MetricsLogger.read(path)
    assert [r["step"] for r in recs] == [1, 2, 3] and recs[0]["loss"] == 1.0 and recs[0]["n"] == "nan"
    MetricsLogger(path)                 # a fresh run starts a fresh log
    assert MetricsLogger.read(path) == []
    MetricsLogger(tmp_path / "off.jsonl", enabled=False).log({"step": 1})
    assert not (tmp_path / "off.jsonl").exists()
