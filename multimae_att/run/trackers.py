"""Where a run's numbers go: ``metrics.jsonl`` (the source of truth), trackers, the console.

Trackers go through Accelerate (``log.trackers``; ``tensorboard`` by default, installed with the
package; ``wandb``, ``mlflow``, ``aim`` as extras). They never reach the network unless the user
configured it: wandb runs offline unless ``WANDB_MODE`` is set, MLflow writes to
``output_dir/mlruns`` unless ``MLFLOW_TRACKING_URI`` is set, aim keeps its repository in
``output_dir``, TensorBoard writes ``output_dir/tb``.

Console: with ``log.progress`` a progress bar (its postfix updated at each logged step only, so
the step never waits for the device); without it one printed line per logged step. Only the
main process writes or prints.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from multimae_att.config import ConfigError
from multimae_att.run.folder import LOG_FILE
from multimae_att.run.metrics_log import MetricsLogger

__all__ = ["TRACKERS", "check_trackers", "RunLogger", "flat_scalars"]

TRACKERS = ("tensorboard", "wandb", "mlflow", "aim")
_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
            "aim": ("aim",)}
PROJECT = "tb"   # TensorBoard logs under output_dir/tb; the experiment name of the others


def check_trackers(names: Sequence[str]) -> list[str]:
    """``log.trackers`` checked: known names whose package is installed (else :class:`ConfigError`
    naming the extra to install). Returns them without duplicates, in order."""
    out: list[str] = []
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"log.trackers: unknown tracker {name!r}; known: {list(TRACKERS)}")
        if not any(importlib.util.find_spec(m) is not None for m in _MODULES[name]):
            raise ConfigError(f"log.trackers: {name!r} needs the {name} package: "
                              f"pip install 'multimae_att[{name}]' (or remove it from log.trackers)")
        if name not in out:
            out.append(name)
    return out


def _offline_defaults(names: Sequence[str], output_dir: Path) -> dict[str, dict]:
    """Environment defaults and ``init_kwargs`` that keep every tracker local unless configured."""
    kwargs: dict[str, dict] = {}
    if "wandb" in names:
        os.environ.setdefault("WANDB_MODE", "offline")
        kwargs["wandb"] = {"dir": str(output_dir)}
    if "mlflow" in names:
        os.environ.setdefault("MLFLOW_TRACKING_URI", (output_dir / "mlruns").resolve().as_uri())
    return kwargs


def flat_scalars(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numbers of a (nested) record as ``{'losses/rgb': 0.1, ...}`` for the trackers."""
    out: dict[str, float] = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flat_scalars(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out


def _hparams(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config flattened for trackers' hyperparameters (numbers, strings, booleans only)."""
    flat: dict[str, Any] = {}

    def walk(d: Mapping[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, Mapping):
                walk(v, f"{prefix}{k}/")
            else:
                flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    walk(config, "")
    return flat


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class RunLogger:
    """One run's log: ``metrics.jsonl`` + trackers + console (see the module docstring).

    ``resume_step``: the step a resumed run continues from (later lines of ``metrics.jsonl``
    are dropped, they will be logged again), None for a fresh start (a fresh log);
    ``redo_evaluation``: the evaluation of ``resume_step`` runs again, its ``val/*`` line too.
    """

    def __init__(self, accelerator: Any, output_dir: str | os.PathLike, *, name: str, total_steps: int,
                 start_step: int, resume_step: int | None, progress: bool, trackers: Sequence[str],
                 config: Mapping[str, Any], redo_evaluation: bool = False) -> None:
        self.acc, self.name, self.total = accelerator, name, total_steps
        self.main = accelerator.is_main_process
        self.out = Path(output_dir)
        self.jsonl = MetricsLogger(self.out / LOG_FILE, enabled=self.main, resume_step=resume_step,
                                   redo_evaluation=redo_evaluation)
        self.trackers = list(trackers)
        if self.trackers:
            kwargs = _offline_defaults(self.trackers, self.out)
            resumed_tensorboard = "tensorboard" in self.trackers and resume_step is not None
            if resumed_tensorboard:
                # The killed run may have logged steps after resume_step; they are logged again.
                # purge_step makes TensorBoard drop the old files' events from that step on (as
                # metrics.jsonl drops its lines), so no curve shows a step twice. An evaluation of
                # resume_step that runs again is logged again too: purge that step as well.
                purge = resume_step if redo_evaluation else resume_step + 1
                kwargs["tensorboard"] = {"purge_step": purge}
            accelerator.init_trackers(PROJECT, config=_hparams(config), init_kwargs=kwargs)
            if resumed_tensorboard and redo_evaluation:
                self._resend_to_tensorboard(resume_step)
        self.bar = None
        if progress and self.main and total_steps > 0:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc=name, dynamic_ncols=True)

    def _resend_to_tensorboard(self, step: int) -> None:
        """The kept (non-evaluation) lines of ``step``, purged from TensorBoard with the
        evaluation that runs again, sent to it once more from ``metrics.jsonl``."""
        if not (self.main and self.jsonl.path.exists()):
            return
        for record in MetricsLogger.read(self.jsonl.path):
            if record.get("step") == step:
                scalars = {k: v for k, v in flat_scalars(record).items() if k != "step"}
                for tracker in self.acc.trackers:
                    if tracker.name == "tensorboard":
                        tracker.log(scalars, step=step)

    def advance(self) -> None:
        """One optimizer step done (progress bar only; no device access)."""
        if self.bar is not None:
            self.bar.update(1)

    def log(self, record: Mapping[str, Any], line: str | None = None, always: bool = False) -> None:
        """Write ``record`` (has ``step``) to ``metrics.jsonl`` and the trackers; show ``line`` on
        the console: printed without a progress bar (or when ``always``), else the bar's postfix."""
        if not self.main:
            return
        self.jsonl.log(record)
        if self.trackers:
            scalars = {k: v for k, v in flat_scalars(record).items() if k != "step"}
            self.acc.log(scalars, step=int(record["step"]))
        if not line:
            return
        if self.bar is not None and not always:
            self.bar.set_postfix_str(line.split(": ", 1)[-1], refresh=True)
        else:
            self.print(line)

    def print(self, text: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def log_image(self, tag: str, image: Any, step: int) -> None:
        """Send one picture (``[H, W, 3]`` uint8 array, PIL image or image file) to the trackers."""
        if not (self.main and self.trackers):
            return
        if isinstance(image, (str, os.PathLike)):
            from PIL import Image
            with Image.open(image) as im:
                image = np.asarray(im.convert("RGB"))
        image = np.asarray(image)
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(tag, image, global_step=step, dataformats="HWC")
                tracker.writer.flush()
            elif tracker.name == "wandb":
                tracker.log_images({tag: [image]}, step=step)
            elif tracker.name == "aim":
                tracker.log_images({tag: image}, step=step)
            elif tracker.name == "mlflow":
                import mlflow
                mlflow.log_image(image, key=tag.replace("/", "_"), step=step)

    def close(self) -> None:
        """Close the bar and the trackers (the process group stays: see ``end_distributed``)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.main:
            for tracker in self.acc.trackers:
                tracker.finish()
