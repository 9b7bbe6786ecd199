"""A study as a list of cells: every cell is one ordinary run of an entry point.

Cells and their folders under ``<study_dir>/cells/``:

- ``warm_start``: the base pretraining config + ``warm_start.overrides`` (optional);
- ``pretrain/<variant>/seed<s>``: the base pretraining config + the variant's overrides,
  ``train.seed=s``, ``init.checkpoint`` = the warm start's ``final.pth`` (or ``warm_start.checkpoint``);
- ``diagnose/<variant>/seed<s>``: ``python -m multimae_att.diagnose`` on that ``final.pth``;
- ``eval/<eval>/<variant>/seed<s>``: the eval's finetune config + overrides, ``train.seed=s``,
  ``init.checkpoint`` = that ``final.pth``.

The plan lists cells in the order they are started when nothing else decides: the warm start,
then per seed and variant the continuation followed by its diagnostics and evaluations, so
complete (variant, seed) columns accumulate early. Every run config is resolved here, before any
work, so a typo in any variant stops the study at once, naming the cell.
"""
from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multimae_att.config import ConfigError, load_config
from multimae_att.study.config import StudyConfig

__all__ = ["Cell", "build_plan", "PRETRAIN", "FINETUNE", "DIAGNOSE", "entry_command", "entry_path",
           "launch_args", "cell_job_command"]

PRETRAIN, FINETUNE, DIAGNOSE = "run_pretrain.py", "run_finetune.py", "multimae_att.diagnose"
OUTPUT = {PRETRAIN: "final.pth", FINETUNE: "metrics.json", DIAGNOSE: "diagnose.json"}


@dataclass(frozen=True)
class Cell:
    """One run: ``entry`` (a runner script at the repository root, or a module) with ``argv``."""

    id: str                          # e.g. 'pretrain/high/seed0'
    kind: str                        # 'warm_start' | 'pretrain' | 'diagnose' | 'eval'
    entry: str                       # PRETRAIN | FINETUNE | DIAGNOSE
    argv: tuple[str, ...]
    out_dir: str
    deps: tuple[str, ...] = ()
    variant: str | None = None
    seed: int | None = None
    eval: str | None = None
    init: str | None = None          # the checkpoint this cell starts from (a dependency's output)
    config: Any = field(default=None, compare=False, repr=False)   # resolved run config

    @property
    def output(self) -> Path:
        """The file a finished run has written last."""
        return Path(self.out_dir) / OUTPUT[self.entry]

    def command(self, python: str = "python") -> list[str]:
        """The equivalent shell command (what ``--dry-run`` prints and Slurm jobs run)."""
        return entry_command(self.entry, python) + list(self.argv)


def entry_path(entry: str) -> Path:
    """The runner script ``run_pretrain.py`` / ``run_finetune.py`` next to the package."""
    path = Path(__file__).resolve().parents[2] / entry
    if not path.is_file():
        raise FileNotFoundError(f"{entry} not found at {path}: studies run from a source checkout "
                                "of multimae_att (the runners live at the repository root)")
    return path


def entry_command(entry: str, python: str = "python") -> list[str]:
    if entry == DIAGNOSE:
        return [python, "-m", entry]
    return [python, entry]


def launch_args(gpus: int, port: int | None = None) -> list[str]:
    """``accelerate launch`` options for one cell on one node with ``gpus`` processes
    (``port``: the rendezvous port, distinct for cells sharing a machine)."""
    common = ["--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no"]
    if gpus >= 2:
        return ["--multi_gpu", "--num_processes", str(gpus), *common] + (
            ["--main_process_port", str(port)] if port else [])
    if gpus == 1:
        return ["--num_processes", "1", *common]
    return ["--cpu", "--num_processes", "1", *common]


def cell_job_command(cell: Cell, gpus: int, python: str | None = None, port: int | None = None,
                     display: bool = False) -> list[str]:
    """What a job runs: ``python -m multimae_att.launch [options] run_*.py ARGS`` (the
    diagnostics, a single process, run as a plain module). ``--mixed_precision no`` only silences
    the launcher's defaults warning: the runner's own ``train.mixed_precision`` is what applies.
    ``display``: the script's bare name (as typed at the repository root) instead of its path."""
    python = python or sys.executable or "python"
    if cell.entry == DIAGNOSE:
        return [python, "-m", DIAGNOSE, *cell.argv]
    script = cell.entry if display else str(entry_path(cell.entry))
    return [python, "-m", "multimae_att.launch", *launch_args(gpus, port), script, *cell.argv]


def shell(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def _resolve(schema, spec_config: str, overrides: list[str], cell_id: str):
    if not Path(spec_config).is_file():
        raise ConfigError(f"cell {cell_id}: config file {spec_config} not found (paths in a study are "
                          "relative to the working directory)")
    try:
        return load_config(schema, spec_config, overrides)
    except ConfigError as e:
        raise ConfigError(f"cell {cell_id}: {e}") from None


def build_plan(study: StudyConfig) -> list[Cell]:
    """Every cell of ``study`` in start order, each run config resolved and checked."""
    from multimae_att.finetune.config import FinetuneConfig
    from multimae_att.pretrain.config import PretrainConfig

    cells_dir = Path(study.study_dir) / "cells"
    base = study.pretrain
    cells: list[Cell] = []

    def pretrain_cell(cid: str, kind: str, overrides: list[str], deps=(), init=None, **tags) -> Cell:
        out = str(cells_dir / cid)
        argv = ["--config", base.config, *base.overrides, *overrides]
        if "seed" in tags:
            argv.append(f"train.seed={tags['seed']}")
        if init:
            argv.append(f"init.checkpoint={init}")
        argv.append(f"output_dir={out}")
        cfg = _resolve(PretrainConfig, base.config, argv[2:], cid)
        if not cfg.train.final_export:
            raise ConfigError(f"cell {cid}: train.final_export=false, but every study cell needs final.pth")
        return Cell(cid, kind, PRETRAIN, tuple(argv), out, tuple(deps), init=init, config=cfg, **tags)

    init, deps = None, ()
    if study.warm_start is not None and study.warm_start.checkpoint is None:
        warm = pretrain_cell("warm_start", "warm_start", list(study.warm_start.overrides))
        cells.append(warm)
        if study.diagnose.enabled:   # the reference: where the attention points before any variant
            cells.append(_diagnose_cell(study, warm, cells_dir, dict(init=str(warm.output))))
        init, deps = str(warm.output), (warm.id,)
    elif study.warm_start is not None:
        init = study.warm_start.checkpoint

    for seed in study.seeds:
        for variant, overrides in study.variants.items():
            run = pretrain_cell(f"pretrain/{variant}/seed{seed}", "pretrain", list(overrides), deps, init,
                                variant=variant, seed=seed)
            cells.append(run)
            tags = dict(variant=variant, seed=seed, init=str(run.output))
            if study.diagnose.enabled:
                cells.append(_diagnose_cell(study, run, cells_dir, tags))
            for name, ev in study.evals.items():
                cid = f"eval/{name}/{variant}/seed{seed}"
                out = str(cells_dir / cid)
                argv = ["--config", ev.config, *ev.overrides, f"train.seed={seed}",
                        f"init.checkpoint={run.output}", f"output_dir={out}"]
                cfg = _resolve(FinetuneConfig, ev.config, argv[2:], cid)
                cells.append(Cell(cid, "eval", FINETUNE, tuple(argv), out, (run.id,), eval=name,
                                  config=cfg, **tags))
    ids = [c.id for c in cells]
    assert len(set(ids)) == len(ids), "cell ids must be unique"
    return cells


def _diagnose_cell(study: StudyConfig, run: Cell, cells_dir: Path, tags: dict) -> Cell:
    cfg = run.config
    if not cfg.data.background_classes:
        raise ConfigError(f"cell {run.id}: diagnostics need data.background_classes in the pretraining "
                          "config (the semseg labels that are background), or set diagnose.enabled=false")
    d = study.diagnose
    cid = "diagnose/warm_start" if run.kind == "warm_start" else f"diagnose/{run.variant}/seed{run.seed}"
    out = cells_dir / cid
    argv = ["--checkpoint", str(run.output), "--data", cfg.data.root, "--split", d.split,
            "--batch-size", str(d.batch_size), "--out", str(out / "diagnose.json")]
    if d.max_images is not None:
        argv += ["--max-images", str(d.max_images)]
    return Cell(cid, "diagnose", DIAGNOSE, tuple(argv), str(out), (run.id,), config=cfg, **tags)
