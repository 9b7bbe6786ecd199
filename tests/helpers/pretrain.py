"""The pretraining runner on tiny synthetic data: config, data, the CLI in process or as a
process killed mid-run, and the fixtures that keep in-process runs independent."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from multimae_att.run.metrics_log import MetricsLogger

from helpers import REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def make_synthetic(root: Path) -> Path:
    subprocess.run([sys.executable, str(REPO / "data_prep" / "make_synthetic.py"), "--out", str(root),
                    "--num-train", "16", "--num-val", "2", "--size", "48", "--format", "folder"],
                   check=True, capture_output=True)
    return root


def tiny_config(path: Path, data_root: Path, **sections) -> Path:
    """A 32-px, 3-block run: 4 tokens per modality, 6 visible of 12."""
    cfg = {
        "model": {"size": "tiny", "semseg_num_classes": 10},
        "data": {"root": str(data_root), "image_size": 32, "batch_size": 4, "num_workers": 0},
        "masking": {"num_encoded_tokens": 6},
        "optim": {"lr": 1e-3},
        "schedule": {"warmup_epochs": 1, "total_epochs": 10, "start_epoch": 0},
        "train": {"epochs": 1, "max_steps": 2, "cpu": True, "mixed_precision": "no", "save_every": 100},
        "log": {"every": 1, "pictures_every": 0, "progress": False},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synthetic") / "data")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)


def run_cli(*argv: str) -> None:
    from run_pretrain import main
    main(list(argv))


@pytest.fixture(scope="module", autouse=True)
def _importable_entry_point():
    sys.path.insert(0, str(REPO))
    yield
    sys.path.remove(str(REPO))


def error_text(excinfo, capsys) -> str:
    """The message of a ``SystemExit`` caught by ``pytest.raises`` and what went to stderr."""
    code = excinfo.value.code
    return (code if isinstance(code, str) else "") + capsys.readouterr().err


def pretrain_command(cfg: Path, out: Path) -> list[str]:
    return [sys.executable, str(REPO / "run_pretrain.py"), "--config", str(cfg), f"output_dir={out}"]


def comparable_metrics(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "step_time"} for r in MetricsLogger.read(out / "metrics.jsonl")]


def kill_once_logged(command: list[str], out: Path, step: int = 5) -> None:
    """Start ``command`` and SIGKILL it as soon as ``out/metrics.jsonl`` logs ``step``."""
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        log = out / "metrics.jsonl"
        if log.exists() and any(r["step"] >= step for r in _safe_read(log)):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"


def _safe_read(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return out
