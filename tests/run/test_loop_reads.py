"""The runners train with the device's fused AdamW and read the log window only on log steps."""
import torch

from multimae_att.run.metrics_log import MetricsLogger
from multimae_att.run.trainer import LogWindow

from helpers.pretrain import _fresh_accelerate_state, _importable_entry_point, data_root, run_cli, tiny_config


def test_pretraining_uses_fused_adamw_and_reads_on_log_steps(tmp_path, data_root, monkeypatch):
    reads = []
    real = LogWindow.means
    monkeypatch.setattr(LogWindow, "means", lambda self, *a, **k: reads.append(self.count) or real(self, *a, **k))
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path / "c.yaml", data_root, train={"max_steps": 7, "epochs": 2, "save_every": 100},
                      log={"every": 3}, masking={"strategy": "amt"})
    run_cli("--config", str(cfg), f"output_dir={out}")
    assert [r["step"] for r in MetricsLogger.read(out / "metrics.jsonl")] == [3, 6, 7]
    assert reads == [3, 3, 1]  # one read per log line, of the steps since the previous one
    state = torch.load(next((out / "checkpoints").glob("*.pth")), weights_only=False)
    assert all(g["fused"] for g in state["optimizer"]["param_groups"])  # the device's fused AdamW
