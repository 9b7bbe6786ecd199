"""The loss predictor in the runner: hpm on predicted losses from the CLI (metrics, training state,
final.pth loading strictly into MultiMAE with and without the predictor), exact resume of the
predictor, and the cache holding predicted losses."""
from __future__ import annotations

import json

import torch

from multimae_att.run.metrics_log import MetricsLogger
from multimae_att.run.states import TrainStateStore

from helpers.pretrain import _fresh_accelerate_state, _importable_entry_point, data_root, run_cli, tiny_config

LOSSP = ["masking.score_source=predicted_loss", "data.image_size=48", "masking.num_encoded_tokens=9"]


def _tiny_model():
    from multimae_att.model import create_pretrain_model
    return create_pretrain_model("tiny", image_size=48, semseg_num_classes=10)


def test_hpm_on_predicted_losses_logs_saves_and_exports(tmp_path, data_root):
    cfg = tiny_config(tmp_path / "c.yaml", data_root, train={"max_steps": 3, "save_every": 3})
    out, kept = tmp_path / "run", tmp_path / "kept"
    run_cli("--config", str(cfg), f"output_dir={out}", "masking.strategy=hpm", *LOSSP,
            "data.background_classes=[0,1]")
    recs = MetricsLogger.read(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert r["lossp/loss"] > 0 and -1 <= r["lossp/spearman_train"] <= 1
        # the diagnostics of the predicted losses are named for the scores, not for attention
        assert {k for k in r if "fg_auroc" in k} == {f"scores/fg_auroc.{m}" for m in ("rgb", "depth", "semseg")}
    state = TrainStateStore(out / "checkpoints").load_latest()
    assert set(state["loss_predictor"]) == {f"heads.{m}.{k}" for m in ("rgb", "depth", "semseg")
                                            for k in ("1.weight", "1.bias", "3.weight")}
    final = torch.load(out / "final.pth", weights_only=True)
    assert "loss_predictor" not in final
    _tiny_model().load_state_dict(final["model"], strict=True)       # MultiMAE layout, all keys
    # the option keeps the predictor, beside (not inside) the MultiMAE weights
    run_cli("--config", str(cfg), f"output_dir={kept}", "masking.strategy=hpm", *LOSSP,
            "train.export_loss_predictor=true")
    final = torch.load(kept / "final.pth", weights_only=True)
    _tiny_model().load_state_dict(final["model"], strict=True)
    saved = TrainStateStore(kept / "checkpoints").load_latest()["loss_predictor"]
    assert final["loss_predictor"].keys() == saved.keys()
    assert all(torch.equal(final["loss_predictor"][k], saved[k]) for k in saved)


def test_resume_continues_the_predictor_exactly(tmp_path, data_root):
    cfg = tiny_config(tmp_path / "c.yaml", data_root, train={"max_steps": 3, "save_every": 1})
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ("--config", str(cfg), "masking.strategy=high", *LOSSP, "log.heldout_split=val")
    run_cli(*args, f"output_dir={full}")
    run_cli(*args, f"output_dir={cut}", "train.max_steps=2")
    run_cli(*args, f"output_dir={cut}")                                # resumes at step 2
    a, b = MetricsLogger.read(full / "metrics.jsonl"), MetricsLogger.read(cut / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3]
    keys = ("loss", "lossp/loss", "lossp/spearman_train", "lossp/spearman")
    assert [a[-1][k] for k in keys] == [b[-1][k] for k in keys]
    sa = TrainStateStore(full / "checkpoints").load_latest()
    sb = TrainStateStore(cut / "checkpoints").load_latest()
    assert all(torch.equal(sa["loss_predictor"][k], sb["loss_predictor"][k]) for k in sa["loss_predictor"])


def test_cache_holds_predicted_losses(tmp_path, data_root):
    cfg = tiny_config(tmp_path / "c.yaml", data_root, data={"batch_size": 4}, train={"max_steps": 3})
    out = tmp_path / "run"
    run_cli("--config", str(cfg), f"output_dir={out}", "masking.strategy=noisy", *LOSSP,
            "masking.cache.enabled=true", "masking.cache.grid=8",
            "masking.loss_predictor.cached_train_share=0.5")
    meta = json.loads((out / "attention_cache" / "meta.json").read_text())
    assert meta["source"] == "predicted_loss"
    import numpy as np
    assert (np.load(out / "attention_cache" / "stamps.npy") == 0).all()   # the full-image refresh
    recs = MetricsLogger.read(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3] and all("lossp/loss" in r for r in recs)
