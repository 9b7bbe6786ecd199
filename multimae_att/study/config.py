"""The study config schema: variants x seeds x evaluations over one base pretraining config.

A study file (``configs/study/*.yaml``) is loaded like every other config (schema defaults <- YAML
<- ``key=value``, strict, ``base:`` includes). Paths (config files, ``study_dir``, data roots in
overrides) are relative to the working directory, as in the runners' own configs. Every run
config the study will start is resolved and checked when the plan is built, before any work.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from multimae_att.config import ConfigError, load_config

__all__ = ["StudyConfig", "RunSpec", "WarmStart", "EvalSpec", "DiagnoseSpec", "PrepareStep",
           "SubmititConfig", "load_study_config", "STUDY_KEYS"]

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# Keys the study sets in every cell itself (a variant or eval may not set them).
STUDY_KEYS = ("output_dir", "init.checkpoint", "train.seed")


def _check_overrides(where: str, overrides: list[str]) -> None:
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "=" not in item or not key:
            raise ValueError(f"{where}: {item!r} is not of the form key=value")
        if key in STUDY_KEYS:
            raise ValueError(f"{where}: {key} is set by the study for every cell "
                             f"(cells/<...> folders, the warm start, the seeds); remove {item!r}")


@dataclass
class RunSpec:
    """A runner config file plus ``key=value`` overrides (applied in order, after the file)."""

    config: str = ""
    overrides: list[str] = field(default_factory=list)


@dataclass
class WarmStart:
    """The common starting point of every variant: a first pretraining stage (``overrides`` of the
    base pretraining config, e.g. random masking) or an existing ``checkpoint``
    (``init.checkpoint`` of every continuation run), not both."""

    overrides: list[str] = field(default_factory=list)
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.checkpoint is not None and self.overrides:
            raise ValueError("warm_start: give either overrides (a warm-start stage) or checkpoint "
                             "(an existing file), not both")
        _check_overrides("warm_start.overrides", self.overrides)


@dataclass
class EvalSpec:
    """One evaluation of every (variant, seed) continuation: a finetune config (+ overrides) and
    the ``metrics.json`` keys that go in the report (first = the one the figures sort by)."""

    config: str = ""
    overrides: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)


@dataclass
class DiagnoseSpec:
    """``python -m multimae_att.diagnose`` on every continuation's ``final.pth`` (needs semseg
    labels in the pretraining data and ``data.background_classes``)."""

    enabled: bool = True
    split: str = "val"
    max_images: int | None = None
    batch_size: int = 32


@dataclass
class PrepareStep:
    """A command run once before any cell, unless ``creates`` exists (e.g. generating data).
    A leading ``python`` runs with the current interpreter."""

    command: list[str] = field(default_factory=list)
    creates: str = ""

    def __post_init__(self) -> None:
        if not self.command or not self.creates:
            raise ValueError("prepare: each step needs a command (list of words) and creates (a path)")


@dataclass
class SubmititConfig:
    """``--launcher submitit``: one Slurm job per cell (an Accelerate launch), with dependencies."""

    cluster: str | None = None       # None = slurm when available; local/debug for testing
    partition: str | None = None
    account: str | None = None
    cpus_per_cell: int = 10
    mem_gb: int | None = None
    time_min: int = 4320                # per cell; a requeued (timed-out) cell resumes
    slurm_args: dict[str, Any] = field(default_factory=dict)   # further sbatch options
    folder: str | None = None        # submitit's logs; None = <study_dir>/submitit
    wait: bool | None = None         # wait for the jobs and write the report; None = not on Slurm


@dataclass
class StudyConfig:
    study_dir: str = "runs/study"
    pretrain: RunSpec = field(default_factory=RunSpec)
    warm_start: WarmStart | None = None
    variants: dict[str, list[str]] = field(default_factory=dict)
    baseline: str | None = None      # None = the first variant
    seeds: list[int] = field(default_factory=lambda: [0])
    evals: dict[str, EvalSpec] = field(default_factory=dict)
    diagnose: DiagnoseSpec = field(default_factory=DiagnoseSpec)
    prepare: list[PrepareStep] = field(default_factory=list)
    launcher: Literal["local", "submitit"] = "local"
    jobs: int = 1                       # local: cells at once
    # GPUs (processes) per cell: >= 2 makes each cell an Accelerate launch over that many GPUs
    # (locally and on Slurm); 0 / 1: one process (local: in a worker, on its own GPU if any)
    gpus_per_cell: int = 1
    threads_per_cell: int | None = None   # local: torch threads per cell; None = cores // jobs
    submitit: SubmititConfig = field(default_factory=SubmititConfig)

    def check(self) -> None:
        """Whole-study checks (the schema's defaults are an empty study, so not in __post_init__)."""
        if not self.pretrain.config:
            raise ValueError("pretrain.config: the base pretraining config file is required")
        _check_overrides("pretrain.overrides", self.pretrain.overrides)
        if not self.variants:
            raise ValueError("variants: name at least one variant (name: [key=value, ...])")
        for name, overrides in self.variants.items():
            if not NAME.match(name):
                raise ValueError(f"variants: {name!r} is not a usable folder name")
            _check_overrides(f"variants.{name}", overrides)
        if self.baseline is not None and self.baseline not in self.variants:
            raise ValueError(f"baseline {self.baseline!r} is not a variant; variants: {list(self.variants)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: need distinct seeds, got {self.seeds}")
        for name, ev in self.evals.items():
            if not NAME.match(name):
                raise ValueError(f"evals: {name!r} is not a usable folder name")
            if not ev.config:
                raise ValueError(f"evals.{name}.config: the finetune config file is required")
            if not ev.metrics:
                raise ValueError(f"evals.{name}.metrics: list the metrics.json keys for the report")
            from multimae_att.study.collect import BOOKKEEPING_KEYS  # (collect imports this module)

            kept = sorted(set(ev.metrics) & BOOKKEEPING_KEYS)
            if kept:
                raise ValueError(f"evals.{name}.metrics: {kept} describe the run, not the model (results.csv "
                                 "keeps them in their own columns); list metrics such as top1, miou, rmse")
            _check_overrides(f"evals.{name}.overrides", ev.overrides)
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")
        if self.gpus_per_cell < 0:
            raise ValueError(f"gpus_per_cell must be >= 0, got {self.gpus_per_cell}")
        if self.threads_per_cell is not None and self.threads_per_cell < 1:
            raise ValueError(f"threads_per_cell must be >= 1, got {self.threads_per_cell}")

    def baseline_name(self) -> str:
        return self.baseline or next(iter(self.variants))


def load_study_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    """Schema defaults <- YAML ``path`` <- ``overrides``; raises :class:`ConfigError`."""
    study = load_config(StudyConfig, path, overrides)
    try:
        study.check()
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    return study


__all__ += ["ConfigError"]
