"""Full-image cache refreshes are skipped in windows where nothing reads the cache."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from multimae_att.masking import MaskingPolicy
from multimae_att.scoring.refresh import REFRESH_RECORD, refresh_point, window_end, window_reads_cache

from helpers.pretrain import _fresh_accelerate_state, _importable_entry_point, data_root, run_cli, tiny_config


@pytest.mark.parametrize("every, age", [(40, None), (None, 15), (40, 15), (None, None), (3, 2)])
def test_window_end_is_the_next_refresh_point(every, age):
    for point in sorted({refresh_point(e, every, age) for e in range(100)}):
        nxt = next((e for e in range(point, 200) if refresh_point(e, every, age) != point), math.inf)
        assert window_end(point, every, age) == nxt, point


def test_which_windows_read_the_cache():
    def reads(strategy="noisy", start=0, end=4, attg=False, **kw):
        return window_reads_cache(MaskingPolicy(strategy, **kw), start, end, attg)

    assert reads() and reads(warmup_epochs=3.5) and reads(prob=0.2)
    assert not reads("random") and not reads(prob=0.0)
    assert not reads(warmup_epochs=4) and not reads(warmup_epochs=10) and reads(start=4, end=8, warmup_epochs=4)
    assert not reads("heads")                                  # per-head scores never come from the cache
    assert reads("random", attg=True) and reads(warmup_epochs=10, attg=True)    # AttG reads scores


def test_warmup_window_gets_no_refresh_the_next_one_does(tmp_path, data_root, monkeypatch, capsys):
    """16 samples / 4 per step = 4 steps per epoch; random masking during epoch 0, one window per epoch."""
    import multimae_att.scoring.cache as ac

    epochs: list[int] = []
    real = ac.refresh_cache

    def counting(cache, model, loader, epoch, **kw):
        epochs.append(epoch)
        return real(cache, model, loader, epoch, **kw)

    monkeypatch.setattr(ac, "refresh_cache", counting)
    cfg = tiny_config(tmp_path / "c.yaml", data_root,
                      masking={"strategy": "noisy", "warmup_epochs": 1.0,
                               "cache": {"enabled": True, "grid": 8, "refresh_every": 1}},
                      train={"max_steps": 8, "epochs": 2})
    run_cli("--config", str(cfg), f"output_dir={tmp_path / 'run'}")
    assert epochs == [1]
    assert "no refresh at step 0 (epoch 0)" in capsys.readouterr().out
    cache_dir = tmp_path / "run" / "attention_cache"
    assert json.loads((cache_dir / REFRESH_RECORD).read_text()) == {"point": 1, "step": 4, "epoch": 1}
    assert (np.load(cache_dir / "stamps.npy") == 1).all()     # nothing was written during epoch 0
    # Stopped inside the skipped window and resumed: the same refreshes, the same weights.
    epochs.clear()
    run_cli("--config", str(cfg), f"output_dir={tmp_path / 'split'}", "train.max_steps=2")
    run_cli("--config", str(cfg), f"output_dir={tmp_path / 'split'}")
    assert epochs == [1]
    a = torch.load(tmp_path / "run" / "final.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "final.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
