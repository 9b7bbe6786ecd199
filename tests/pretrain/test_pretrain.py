"""Pretraining runner end to end on tiny synthetic data: every strategy from the CLI, outputs,
init from a checkpoint, fail-fast errors."""
from __future__ import annotations

import json

import pytest
import torch

from multimae_att.config import load_config
from multimae_att.run.metrics_log import MetricsLogger
from multimae_att.run.states import TrainStateStore

from helpers import REPO
from helpers.pretrain import (
    _fresh_accelerate_state,
    _importable_entry_point,
    data_root,
    error_text,
    run_cli,
    tiny_config,
)

STRATEGY_PARAMS = {"heads": ["masking.params.k=2"]}  # the tiny model has 3 heads


@pytest.mark.parametrize("attg", [False, True])
@pytest.mark.parametrize("strategy", ["random", "high", "low", "noisy", "heads", "hint", "amt"])
def test_every_strategy_runs_from_cli(tmp_path, data_root, strategy, attg):
    cfg = tiny_config(tmp_path / "c.yaml", data_root)
    out = tmp_path / "run"
    run_cli("--config", str(cfg), f"output_dir={out}", f"masking.strategy={strategy}", "data.batch_size=2",
            f"loss.attg.enabled={str(attg).lower()}", *STRATEGY_PARAMS.get(strategy, []))
    recs = MetricsLogger.read(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        assert torch.isfinite(torch.tensor(r["loss"])) and r["loss"] > 0
        assert set(r["losses"]) == {"rgb", "norm_rgb", "depth", "semseg"}
        assert sum(r["visible"].values()) == pytest.approx(6.0)   # exactly K visible per sample
    assert (out / "final.pth").is_file()


def test_outputs_resolved_config_pictures_and_strict_final(tmp_path, data_root):
    from multimae_att.model import create_pretrain_model
    from multimae_att.pretrain.config import PretrainConfig

    out = tmp_path / "run"
    cfg = tiny_config(tmp_path / "c.yaml", data_root,
                      train={"max_steps": 3, "save_every": 1, "keep_last": 2},
                      log={"pictures_every": 2}, masking={"adaptive": {"enabled": True}})
    run_cli("--config", str(cfg), f"output_dir={out}")
    resolved = load_config(PretrainConfig, out / "config.yaml")
    assert resolved.output_dir == str(out) and resolved.masking.adaptive.enabled
    assert [s for s, _ in TrainStateStore(out / "checkpoints").list()] == [2, 3]
    state = TrainStateStore(out / "checkpoints").load_latest()
    assert state["step"] == 3 and state["config"]["model"]["size"] == "tiny"
    assert state["masking"]["adaptive"]["steps"] == 3          # adaptive-budget state is saved
    assert "alphas" in MetricsLogger.read(out / "metrics.jsonl")[-1]
    pics = sorted(p.name for p in (out / "pictures").iterdir())
    assert pics == [f"step_{s:08d}_{m}.png" for s in (2, 3) for m in ("depth", "rgb", "semseg")]
    final = torch.load(out / "final.pth", weights_only=True)
    model = create_pretrain_model("tiny", image_size=32, semseg_num_classes=10)
    model.load_state_dict(final["model"], strict=True)          # MultiMAE layout, all keys
    assert torch.equal(final["model"]["global_tokens"], state["model"]["global_tokens"])


def test_init_checkpoint_is_loaded(tmp_path, data_root):
    cfg = tiny_config(tmp_path / "c.yaml", data_root)
    run_cli("--config", str(cfg), f"output_dir={tmp_path / 'a'}", "train.seed=1")
    # max_steps=0: nothing trains, so the export must equal the init checkpoint bit for bit.
    run_cli("--config", str(cfg), f"output_dir={tmp_path / 'b'}", "train.max_steps=0",
            f"init.checkpoint={tmp_path / 'a' / 'final.pth'}")
    a = torch.load(tmp_path / "a" / "final.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "final.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("override, needle", [
    ("masking.stratgy=high", "unknown config key 'masking.stratgy' (did you mean 'masking.strategy'?)"),
    ("masking.strategy=higher", "unknown masking strategy 'higher' (did you mean 'high'?)"),
    ("train.max_steps=two", "'train.max_steps' expects an integer"),
    ("data.root=/nonexistent/multimae_data", "data.root='/nonexistent/multimae_data' does not exist"),
    ("init.checkpoint=/nonexistent/x.pth", "init.checkpoint='/nonexistent/x.pth': /nonexistent/x.pth does not exist"),
    ("masking.strategy=heads masking.params.k=4",                     # the tiny model has 3 heads
     "masking.params.k=4: model.size='tiny' has 3 attention heads; choose masking.params.k in [1, 3]"),
    ("masking.score_layer=3", "masking.score_layer=3 is not a block of the 3-block encoder"),
])
def test_fail_fast_messages(tmp_path, data_root, capsys, override, needle):
    cfg = tiny_config(tmp_path / "c.yaml", data_root)
    with pytest.raises(SystemExit) as e:
        run_cli("--config", str(cfg), f"output_dir={tmp_path / 'run'}", *override.split())
    assert needle in error_text(e, capsys)
    assert not (tmp_path / "run" / "checkpoints").exists()     # failed before any work


def test_checkpoint_from_another_architecture_fails_fast(tmp_path, data_root, capsys):
    from multimae_att.model import create_pretrain_model

    other = create_pretrain_model("tiny", in_domains=("rgb",), out_domains=("rgb",), image_size=32)
    torch.save({"model": other.state_dict()}, tmp_path / "other.pth")
    cfg = tiny_config(tmp_path / "c.yaml", data_root)
    with pytest.raises(SystemExit) as e:
        run_cli("--config", str(cfg), f"output_dir={tmp_path / 'run'}",
                f"init.checkpoint={tmp_path / 'other.pth'}")
    text = error_text(e, capsys)
    assert "init.checkpoint=" in text and "missing keys" in text and "input_adapters.depth" in text


def test_shipped_configs_resolve():
    from multimae_att.pretrain.config import PretrainConfig

    files = sorted((REPO / "configs" / "pretrain").rglob("*.yaml"))
    assert len(files) >= 13
    base = load_config(PretrainConfig, REPO / "configs/pretrain/multimae-b_continue_100e.yaml")
    assert (base.model.size, base.masking.num_encoded_tokens, base.optim.blr) == ("base", 98, 1e-4)
    assert (base.schedule.start_epoch, base.schedule.total_epochs, base.schedule.warmup_epochs) == (1600, 1700, 40)
    for f in files:
        cfg = load_config(PretrainConfig, f)
        if f.parent.name == "ablations":
            # an ablation differs from the recipe only in what it is about (and its output folder)
            diff = _diff(json.loads(json.dumps(_asdict(base))), json.loads(json.dumps(_asdict(cfg))))
            topics = {k.split(".")[0] for k in diff if k != "output_dir"}
            assert len(topics) <= 1, (f.name, diff)   # strategy_high.yaml == the recipe


def _asdict(cfg):
    from multimae_att.config import config_to_dict
    return config_to_dict(cfg)


def _diff(a, b, prefix=""):
    keys = set(a) | set(b)
    out = []
    for k in keys:
        full = f"{prefix}{k}"
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _diff(a[k], b[k], full + ".")
        elif a.get(k) != b.get(k):
            out.append(full)
    return out


def test_attention_cache_feeds_the_step(tmp_path, data_root):
    cfg = tiny_config(tmp_path / "c.yaml", data_root, data={"batch_size": 2},
                      train={"max_steps": 3})
    out = tmp_path / "run"
    run_cli("--config", str(cfg), f"output_dir={out}", "masking.cache.enabled=true",
            "masking.cache.grid=8", "masking.cache.refresh_every=null")
    import numpy as np
    stamps = np.load(out / "attention_cache" / "stamps.npy")    # [R, G, G], -32768 = never written
    assert (stamps != -32768).any(axis=(1, 2)).sum() >= 6   # 3 steps x 2 samples written
    assert len(MetricsLogger.read(out / "metrics.jsonl")) == 3


def test_attg_from_precomputed_maps(tmp_path, data_root):
    import shutil

    from PIL import Image

    root = tmp_path / "with_maps"
    shutil.copytree(data_root, root)
    for png in (root / "train" / "rgb").rglob("*.png"):
        dst = root / "train" / "att_map" / png.parent.name / png.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.open(png).convert("L").save(dst)             # any greyscale map will do
    cfg = tiny_config(tmp_path / "c.yaml", root, data={"batch_size": 2})
    out = tmp_path / "run"
    run_cli("--config", str(cfg), f"output_dir={out}", "masking.strategy=random",
            "loss.attg.enabled=true", "loss.attg.source=data")
    assert [r["step"] for r in MetricsLogger.read(out / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize("strategy", ["noisy", "amt", "heads"])
def test_masks_do_not_depend_on_world_size(data_root, strategy):
    # The rows a process keeps from the global draw equal the 1-process masks of its samples.
    from multimae_att.data import build_loader
    from multimae_att.masking import MaskingPolicy
    from multimae_att.masking.planner import MaskPlanner
    from multimae_att.model import create_pretrain_model

    model = create_pretrain_model("tiny", image_size=32, semseg_num_classes=10)
    mods = ["rgb", "depth", "semseg"]
    params = {"k": 2} if strategy == "heads" else {}

    def plan(rank, world, batch_size):
        loader = build_loader(data_root, mods, batch_size=batch_size, image_size=32, rank=rank,
                              world_size=world)
        loader.set_epoch(0)
        batch = next(iter(loader))
        tokens = model.embed({m: batch[m] for m in mods})
        planner = MaskPlanner(MaskingPolicy(strategy, params, prob=0.5), 6, rank=rank, world_size=world)
        return planner(model, tokens, batch, 0.0, torch.Generator().manual_seed(7))

    full = plan(0, 1, 4)
    for r in range(2):
        part = plan(r, 2, 2)
        for m in mods:
            assert torch.equal(part.hidden[m], full.hidden[m][r::2])
            if full.thrown is not None:
                assert torch.equal(part.thrown[m], full.thrown[m][r::2])
        assert {m: float(v) for m, v in part.denominators.items()} == \
            {m: float(v) / 2 for m, v in full.denominators.items()}


def test_logged_lr_follows_the_schedule(tmp_path, data_root):
    from multimae_att.schedules import cosine_lr

    out = tmp_path / "run"
    cfg = tiny_config(tmp_path / "c.yaml", data_root, train={"max_steps": 3})
    run_cli("--config", str(cfg), f"output_dir={out}", "optim.lr_scale=10",
            "schedule.start_epoch=5", "schedule.warmup_epochs=2")
    spe = 16 // 4   # 16 samples, batch 4, no accumulation
    for r in MetricsLogger.read(out / "metrics.jsonl"):
        want = cosine_lr(5 + (r["step"] - 1) / spe, 1e-3 * 10, 0.0, 2, 10)
        assert r["lr"] == pytest.approx(want)


def test_init_from_training_state_takes_its_optimizer(tmp_path, data_root):
    cfg = tiny_config(tmp_path / "c.yaml", data_root, data={"batch_size": 2})
    run_cli("--config", str(cfg), f"output_dir={tmp_path / 'a'}")
    state_a = TrainStateStore(tmp_path / "a" / "checkpoints").latest()
    run_cli("--config", str(cfg), f"output_dir={tmp_path / 'b'}", "train.max_steps=1",
            f"init.checkpoint={state_a}")
    opt = TrainStateStore(tmp_path / "b" / "checkpoints").load_latest()["optimizer"]
    # Adam's step counters continue from the 2 steps stored in the init file.
    assert {float(s["step"]) for s in opt["state"].values()} == {3.0}
    run_cli("--config", str(cfg), f"output_dir={tmp_path / 'c'}", "train.max_steps=1",
            f"init.checkpoint={state_a}", "init.load_optimizer=false")
    opt = TrainStateStore(tmp_path / "c" / "checkpoints").load_latest()["optimizer"]
    assert {float(s["step"]) for s in opt["state"].values()} == {1.0}
