"""``python -m multimae_att.show RUN_DIR``: status, step, resume point, losses, final metrics."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import REPO
from helpers.pretrain import _fresh_accelerate_state, _importable_entry_point, data_root, run_cli, tiny_config


def _show(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "multimae_att.show", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_show_reports_each_lifecycle_state(tmp_path, data_root):
    out = tmp_path / "run"
    empty = _show(str(tmp_path))
    assert empty.returncode == 0 and "status:      empty" in empty.stdout

    cfg = tiny_config(tmp_path / "c.yaml", data_root, train={"max_steps": 3, "save_every": 2})
    run_cli("--config", str(cfg), f"output_dir={out}")
    done = _show(str(out))
    assert done.returncode == 0, done.stderr
    assert "status:      finished (step 3)" in done.stdout and f"results:     {out / 'metrics.json'}" in done.stdout
    assert "final metrics:" in done.stdout and "provenance:  config " in done.stdout
    summary = json.loads(_show(str(out), "--json").stdout)
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["last_logged"] == last and summary["metrics"]["loss"] == last["loss"]
    assert summary["states"] == [2, 3] and summary["resume_from"]["step"] == 3

    (out / "metrics.json").unlink()                        # as if killed after the last state
    (out / "checkpoints" / "state_00000003.pth").unlink()
    running = _show(str(out))
    assert "status:      in progress (step 2)" in running.stdout
    assert f"a restart resumes from: {out / 'checkpoints' / 'state_00000002.pth'} (step 2)" in running.stdout
    assert f"last logged: step 3: loss {last['loss']:.6g}" in running.stdout

    missing = _show(str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
