"""The runner's attention cache: full-image refresh windows, all hits after a refresh, exact resume."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from multimae_att.scoring.cache import MISSING, AttentionCache
from multimae_att.scoring.refresh import REFRESH_RECORD, refresh_point

from helpers.pretrain import ENV, comparable_metrics, data_root, kill_once_logged, pretrain_command, tiny_config

STEPS = 12  # 16 samples, 2 per micro-batch, 2 micro-batches per step: 4 steps per epoch


@pytest.mark.parametrize("every, age", [(40, None), (None, 15), (40, 15), (None, None), (3, 2)])
def test_refresh_point_is_the_start_of_the_window(every, age):
    # Brute force: walk the epochs, open a window whenever a limit would make a cell stale.
    start = 0
    for e in range(130):
        stale_by_period = every is not None and e // every != start // every
        stale_by_age = age is not None and e - start >= age
        if stale_by_period or stale_by_age:
            start = e
        assert refresh_point(e, every, age) == start, e


def _config(tmp_path: Path, data_root: Path, **masking) -> Path:
    return tiny_config(tmp_path / "c.yaml", data_root, model={"drop_path_rate": 0.1},
                       data={"batch_size": 2},
                       masking={"strategy": "noisy", "prob": 0.7,
                                "cache": {"enabled": True, "grid": 8, "refresh_every": 1, **masking}},
                       optim={"accum_steps": 2},
                       train={"max_steps": STEPS, "epochs": 10, "save_every": 3, "keep_last": 10})


def _same_weights(a: Path, b: Path) -> bool:
    wa = torch.load(a / "final.pth", weights_only=True)["model"]
    wb = torch.load(b / "final.pth", weights_only=True)["model"]
    return all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root) -> tuple[Path, Path]:
    """One uninterrupted 12-step run with a refresh every epoch (steps 0, 4, 8)."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = _config(tmp, data_root)
    subprocess.run(pretrain_command(cfg, tmp / "ref"), check=True, env=ENV, capture_output=True, timeout=300)
    return cfg, tmp / "ref"


def test_full_refresh_fills_every_sample_and_every_lookup_hits(reference, data_root):
    from multimae_att.pretrain.config import load_pretrain_config
    from multimae_att.pretrain.setup import build_pretrain_loader

    cfg_file, out = reference
    cache_dir = out / "attention_cache"
    stamps = np.load(cache_dir / "stamps.npy")                     # [R, G, G]
    ids = (cache_dir / "ids.txt").read_text().split()
    assert len(ids) == 16 and (stamps != MISSING).all()            # every cell of every sample
    assert (stamps == 2).all()                                     # last refresh: epoch 2 (step 8)
    assert json.loads((cache_dir / REFRESH_RECORD).read_text()) == {"point": 2, "step": 8, "epoch": 2}
    assert {p.name for p in (out / "checkpoints").iterdir()} >= {   # boundary states before refreshes
        "state_00000004.pth", "state_00000008.pth"}
    # Training crops of that epoch (random-resized, flipped) all read fresh cells.
    cfg = load_pretrain_config(str(cfg_file), [f"output_dir={out}"])
    loader = build_pretrain_loader(cfg, 0, 1)
    cache = AttentionCache(cache_dir, refresh_every=1)
    grids = dict.fromkeys(cfg.model.in_modalities, (2, 2))
    loader.set_epoch(2)
    for batch in loader:
        scores, valid = cache.lookup(batch, grids, epoch=2)
        assert valid.all()
        assert all(torch.isfinite(s).all() and (s > 0).all() for s in scores.values())
    assert cache.lookup(batch, grids, epoch=3)[1].sum() == 0       # the next window needs a refresh


def test_sigkill_then_restart_equals_uninterrupted_with_cache(tmp_path, reference):
    cfg, ref = reference
    cut = tmp_path / "cut"
    kill_once_logged(pretrain_command(cfg, cut), cut, step=5)
    subprocess.run(pretrain_command(cfg, cut), check=True, env=ENV, capture_output=True, timeout=300)
    assert comparable_metrics(cut) == comparable_metrics(ref)
    assert _same_weights(cut, ref)


def test_cache_newer_than_the_state_is_refreshed_again(tmp_path, reference):
    # The worst case of a kill: the cache holds a later window's refresh (step 8) than the state
    # resumed from (step 4). The restart must refresh from the step-4 weights, as the
    # uninterrupted run did at step 4, and then match it exactly.
    cfg, ref = reference
    cut = tmp_path / "cut"
    subprocess.run(pretrain_command(cfg, cut), check=True, env=ENV, capture_output=True, timeout=300)
    for p in (cut / "checkpoints").iterdir():
        if int(p.stem.split("_")[1]) > 4:
            p.unlink()
    (cut / "final.pth").unlink()
    assert json.loads((cut / "attention_cache" / REFRESH_RECORD).read_text())["step"] == 8
    subprocess.run(pretrain_command(cfg, cut), check=True, env=ENV, capture_output=True, timeout=300)
    assert comparable_metrics(cut) == comparable_metrics(ref)
    assert _same_weights(cut, ref)
