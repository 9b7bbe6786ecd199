"""The pretraining loop reads values to the host only every log.every steps, and trains with the fused AdamW."""
import torch

import multimae_att.pretrain.loop as loop
from multimae_att.runstate import MetricsLogger
from test_pretrain import _fresh_accelerate_state, _importable_entry_point, data_root, run_cli, tiny_config  # noqa: F401


def test_losses_are_read_on_log_steps_only(tmp_path, data_root, monkeypatch):  # noqa: F811
    calls = []
    real = loop._reduce
    monkeypatch.setattr(loop, "_reduce", lambda totals, acc: calls.append(sorted(totals)) or real(totals, acc))
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path / "c.yaml", data_root, train={"max_steps": 7, "epochs": 2, "save_every": 100},
                      log={"every": 3}, masking={"strategy": "amt"})
    run_cli("--config", str(cfg), f"output_dir={out}")
    recs = MetricsLogger.read(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [3, 6, 7]
    assert len(calls) == 3  # one read per logged step, none in between
    assert all(r["step_time"] > 0 and torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    state = torch.load(next((out / "checkpoints").glob("*.pth")), weights_only=False)
    assert all(g["fused"] for g in state["optimizer"]["param_groups"])  # the device's fused AdamW


def test_adaptive_alphas_still_see_every_steps_losses(tmp_path, data_root, monkeypatch):  # noqa: F811
    seen = []
    real = loop._reduce
    monkeypatch.setattr(loop, "_reduce", lambda totals, acc: seen.append(sorted(totals)) or real(totals, acc))
    cfg = tiny_config(tmp_path / "c.yaml", data_root, train={"max_steps": 4}, log={"every": 4},
                      masking={"adaptive": {"enabled": True}})
    run_cli("--config", str(cfg), f"output_dir={tmp_path / 'run'}")
    assert len(seen) == 4 and seen[0] == ["depth", "rgb", "semseg"]  # modality losses only, then the full log read
