"""The one run skeleton under both runners: accelerator, run folder, states, loop, log, outputs.

A runner builds its data, model and optimizer, wraps its step and evaluation in a :class:`Job`
and hands it to :class:`Run`, which owns everything the two runners have in common:

- the accelerator (:func:`make_accelerator`: CPU, one GPU or ``accelerate launch``; mixed
  precision; DDP) and the trackers (``log.trackers``);
- the run folder's lifecycle (:class:`multimae_att.run.lifecycle.RunFolder`: fresh, resume,
  finished, ``--overwrite``) and the training states (save every ``train.save_every`` steps, or
  at each epoch end when it is 0, and at the last step; restore the newest readable one);
- the loop (:meth:`Run.fit`): the learning rate of the step (a pure function of the step, set
  on every parameter group times its ``lr_scale``), the global torch RNG re-seeded by
  (seed, step, rank) so dropout and drop-path are functions of the step, gradient accumulation
  (``no_sync`` on all but the last micro-batch), clipping, the optimizer step;
- logging: each step's scalars stay on the device and are summed into a window; every
  ``log.every`` steps one collective and one transfer turn the window into means, which go to
  ``metrics.jsonl``, the trackers and the console (the window is part of the training state, so
  a resumed run logs exactly what an uninterrupted one does);
- the final outputs: ``metrics.json`` (results, ``step``, ``outputs``, ``provenance``).

At a step with both a training state and an evaluation, the state is written first (marked
``evaluation_due``), so an evaluation that fails costs no training: a run resuming from such a
state evaluates its step before training on, after dropping any ``val/*`` line of that step a
killed invocation had logged, so ``metrics.jsonl`` holds each evaluation once and the job's best
and last records (its state) include it.

Exact resume without replay: the data order and augmentation are functions of (seed, epoch,
sample) (:mod:`multimae_att.data`), the data position is ``step * accum_steps`` micro-batches
(:class:`DataStream`), the global RNG is re-seeded per step, and a job seeds its own draws by
(seed, step, ...) (:func:`multimae_att.seeds.step_seed`). A state therefore holds the model,
optimizer, scaler, step, log window and the job's own state (``Job.extra_state``).
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from multimae_att.atomic import write_text_atomic
from multimae_att.config import ConfigError, config_to_dict
from multimae_att.optim import load_optimizer_state
from multimae_att.run.cpu_malloc import apply_cpu_malloc
from multimae_att.run.folder import RESULTS_FILE, read_results
from multimae_att.run.lifecycle import RunFolder
from multimae_att.run.provenance import provenance
from multimae_att.run.trackers import RunLogger, check_trackers
from multimae_att.seeds import step_seed

__all__ = ["Run", "Job", "DataStream", "LogWindow", "make_accelerator", "run_length", "end_distributed",
           "log_trackers", "EVALUATION_DUE"]

# Training-state key: the state was written before the evaluation of its step (see Run.save).
EVALUATION_DUE = "evaluation_due"


# ------------------------------------------------------------------------------ set-up

def log_trackers(cfg: Any) -> list[str]:
    """``log.trackers`` of a config, with the deprecated ``log.tensorboard=false`` removing
    TensorBoard (a note says so)."""
    names = list(getattr(cfg.log, "trackers", []))
    if getattr(cfg.log, "tensorboard", True) is False and "tensorboard" in names:
        print("note: log.tensorboard is deprecated; log.tensorboard=false is read as "
              "log.trackers without tensorboard")
        names.remove("tensorboard")
    return check_trackers(names)


def make_accelerator(cfg: Any, find_unused_parameters: bool = False, trackers: list[str] | None = None):
    """Accelerator for CPU, one GPU or ``accelerate launch`` (multi-GPU / multi-node), from
    ``train.cpu`` and ``train.mixed_precision``; trackers log under ``output_dir``."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    mp = cfg.train.mixed_precision
    on_cpu = cfg.train.cpu or not torch.cuda.is_available()
    if mp == "fp16" and on_cpu:
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA device; use bf16 or no on CPU")
    if mp == "bf16" and not on_cpu and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.mixed_precision=bf16: this GPU has no bf16; use fp16 or no")
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    return Accelerator(cpu=cfg.train.cpu, mixed_precision=mp, kwargs_handlers=[ddp],
                       log_with=trackers or None, project_dir=cfg.output_dir)


def run_length(batches_per_epoch: int, accum_steps: int, epochs: float, max_steps: int | None
               ) -> tuple[float, int]:
    """(optimizer steps per epoch, total steps): ``ceil(epochs * steps per epoch)``, at most
    ``max_steps``. Micro-batches run on across epoch ends, so steps per epoch may be fractional."""
    spe = batches_per_epoch / accum_steps
    total = max(1, math.ceil(epochs * spe)) if epochs > 0 else 0
    if max_steps is not None:
        total = min(total, max_steps)
    return spe, total


def end_distributed() -> None:
    """Destroy the process group (if any) before the interpreter exits.

    Call once per process, after the last run (the entry points do): gloo's worker threads still
    alive at exit abort the process ("terminate called without an active exception"). Not done
    inside a run, because Accelerate's process state is a per-process singleton that a later run
    in the same process (a study) reuses.
    """
    from accelerate.state import PartialState

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        PartialState().destroy_process_group()


class DataStream:
    """Endless micro-batches over epochs, positioned by the number already consumed.

    ``loader``: split by rank already, with ``set_epoch(epoch, start_batch)`` (the data
    package's loaders): a stream opened at ``consumed`` yields what an uninterrupted one yields
    from there on.
    """

    def __init__(self, loader: Any, batches_per_epoch: int, consumed: int = 0) -> None:
        self.loader, self.per_epoch = loader, batches_per_epoch
        self.epoch, start = divmod(consumed, batches_per_epoch)
        self._it = self._open(start)

    def _open(self, start: int) -> Iterator:
        self.loader.set_epoch(self.epoch, start_batch=start)
        return iter(self.loader)

    def next(self) -> dict:
        try:
            return next(self._it)
        except StopIteration:
            self.epoch += 1
            self._it = self._open(0)
            return next(self._it)


class LogWindow:
    """Per-step scalars summed on the device since the last log line (no host sync per step)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.started = time.perf_counter()

    def add(self, values: Mapping[str, torch.Tensor]) -> None:
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1

    def means(self, accelerator: Any, extra: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Means over the window's steps, with ``extra`` values taken as they are, averaged over
        processes (one collective, one transfer)."""
        keys, extra = sorted(self.sums), dict(extra or {})
        names = keys + sorted(extra)
        if not names:
            return {}
        vals = [self.sums[k].to(accelerator.device).reshape(()) / self.count for k in keys]
        vals += [extra[k].detach().float().to(accelerator.device).reshape(()) for k in sorted(extra)]
        vec = torch.stack(vals)
        if accelerator.num_processes > 1:
            vec = accelerator.reduce(vec, reduction="mean")
        return dict(zip(names, vec.tolist()))

    def seconds_per_step(self) -> float:
        return (time.perf_counter() - self.started) / max(self.count, 1)

    def reset(self) -> None:
        self.sums, self.count, self.started = {}, 0, time.perf_counter()

    def state_dict(self, accelerator: Any) -> dict[str, Any]:
        """The open window, averaged over processes (every process resumes with the same sums)."""
        keys = sorted(self.sums)
        if not keys:
            return {"count": 0, "sums": {}}
        vec = torch.stack([self.sums[k].to(accelerator.device).reshape(()) for k in keys])
        if accelerator.num_processes > 1:
            vec = accelerator.reduce(vec, reduction="mean")
        return {"count": self.count, "sums": dict(zip(keys, vec.cpu()))}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        self.reset()
        self.count = int(state.get("count", 0))
        self.sums = {k: v.to(device) for k, v in state.get("sums", {}).items()}


# ------------------------------------------------------------------------------ the job

class Job:
    """What a runner plugs into :meth:`Run.fit`. Subclasses set the attributes and override
    :meth:`micro_step`; every other hook has a default that does nothing.

    Attributes: ``module`` (the prepared, possibly DDP-wrapped module :meth:`micro_step` runs),
    ``optimizer`` (prepared), ``weights`` (the plain model whose ``state_dict`` is saved),
    ``loader`` (split by rank, with ``set_epoch``), ``batches_per_epoch``, ``total_steps``,
    ``steps_per_epoch``.
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer
    weights: nn.Module
    loader: Any
    batches_per_epoch: int
    total_steps: int
    steps_per_epoch: float

    def lr(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based); a pure function of the step."""
        raise NotImplementedError

    def train_mode(self) -> None:
        """Put the module in training mode (called before the loop and after evaluations)."""
        self.module.train()

    def before_step(self, step: int, save: Callable[[], None]) -> None:
        """Before step ``step`` (``save()`` writes the training state of ``step`` now)."""

    def saved(self, step: int) -> None:
        """A training state of ``step`` was just written."""

    def micro_step(self, batch: dict, step: int, micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward one micro-batch: (loss for backward, scalars to log), device tensors. The
        loop divides the loss by ``accum_steps``; scalars are averaged over micro-batches."""
        raise NotImplementedError

    def after_step(self, step: int, values: Mapping[str, torch.Tensor]) -> None:
        """After optimizer step ``step`` (1-based now); ``values``: this process's step means."""

    def log_values(self, step: int) -> dict[str, torch.Tensor]:
        """Device scalars measured only at logging steps (diagnostics of the last micro-batch),
        logged as they are rather than averaged over the window; every process the same keys."""
        return {}

    def log_checks(self, step: int) -> dict[str, Any]:
        """Fields of a logging step's record measured once, on the main process only, after the
        window's ``step_time`` is taken (so their time is not in it; report it under a
        ``time/<name>_s`` key). No collective may run here: the other processes do not call it."""
        return {}

    def record(self, step: int, means: Mapping[str, float]) -> dict[str, Any]:
        """Fields of the ``metrics.jsonl`` line beyond step, epoch, lr, loss (from ``means``)."""
        return {}

    def evaluate_now(self, step: int) -> bool:
        return False

    def evaluate(self, step: int) -> dict[str, Any]:
        """Metrics of the current weights (logged as ``val/<name>``)."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """The job's own part of the training state (plain data)."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        pass


# ------------------------------------------------------------------------------ the run

class Run:
    """One invocation of a runner on ``cfg.output_dir`` (see the module docstring).

    Usage (both runners)::

        run = Run(cfg, resume_config_changes, name="pretrain")   # checks the folder, no work
        if run.done:                                             # finished, same length
            return run.results()
        ... build loader, total steps, model, optimizer ...
        if not run.begin(total_steps):                           # finished: nothing touched
            return run.results()
        job = MyJob(...); step = run.restore(job)
        run.fit(job)
        run.finish(metrics, outputs=[...])
    """

    def __init__(self, cfg: Any, changes: Callable, *, name: str, trains: bool = True,
                 find_unused_parameters: bool = False) -> None:
        self.cfg, self.name = cfg, name
        self.out = Path(cfg.output_dir)
        self.trackers = log_trackers(cfg)
        self.acc = make_accelerator(cfg, find_unused_parameters, self.trackers)
        if self.acc.device.type == "cpu" or cfg.train.cpu_malloc == "default":   # before the first step
            apply_cpu_malloc(cfg.train.cpu_malloc, "train.cpu_malloc=default: an earlier run in this process fixed "
                             "glibc's malloc thresholds (train.cpu_malloc=keep); they stay fixed for the rest of "
                             "the process")
        self.folder = RunFolder(cfg, changes, self.acc, trains=trains)
        self.folder.check()   # refusals and result-changing config changes stop here, before any work
        self.step = 0
        self.total_steps = 0
        self.window = LogWindow()
        self.logger: RunLogger | None = None
        self.last_record: dict[str, Any] | None = None
        self.timing: tuple[float, int] | None = None   # (seconds per step, steps) of this invocation
        self.evaluation_due = False   # the restored state precedes its step's evaluation

    # lifecycle -----------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """A finished run re-invoked with the same length: nothing to build or run."""
        return self.folder.done

    def results(self) -> dict[str, Any]:
        """A finished run's ``metrics.json`` (after printing where it is)."""
        self.folder.report_finished()
        return read_results(self.out) or {}

    @property
    def fresh(self) -> bool:
        return self.folder.fresh

    def begin(self, total_steps: int) -> bool:
        """Decide for ``total_steps`` (see :meth:`RunFolder.begin`); open the log. False: finished."""
        if not self.folder.begin(total_steps):
            return False
        self.total_steps = total_steps
        loaded = self.folder.state
        self.step = loaded.step if loaded is not None else 0
        # read once, here: the log needs it now (what to purge) and the loop at the first step
        self.evaluation_due = loaded is not None and bool(loaded.state.get(EVALUATION_DUE, False))
        self.logger = RunLogger(self.acc, self.out, name=self.name, total_steps=total_steps,
                                start_step=self.step, resume_step=self.step if loaded is not None else None,
                                redo_evaluation=self.evaluation_due,
                                progress=self.cfg.log.progress, trackers=self.trackers,
                                config=config_to_dict(self.cfg))
        return True

    @property
    def resumed(self) -> bool:
        return self.folder.state is not None

    # training states -------------------------------------------------------------------
    def restore(self, job: Job) -> int:
        """Load the state this run resumes from (if any) into ``job``; returns the step."""
        loaded = self.folder.state
        if loaded is None:
            return 0
        state = loaded.state
        job.weights.load_state_dict(state["model"], strict=True)
        load_optimizer_state(job.optimizer, state["optimizer"])   # keeps the job's AdamW kernel
        if state.get("scaler") is not None and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(state["scaler"])
        job.load_extra_state(state)
        self.window.load_state_dict(state.get("log_window", {}), self.acc.device)
        self.step = int(state["step"])
        return self.step

    def save(self, step: int, job: Job, evaluation_due: bool = False) -> None:
        """Write the training state of ``step`` (main process; all processes meet afterwards).

        ``evaluation_due``: the state is written before this step's evaluation (so an error in
        the evaluation loses no training); the job's state then holds no result of it, and a run
        resuming from the state evaluates first (:attr:`evaluation_due`)."""
        window = self.window.state_dict(self.acc)      # a collective: every process takes part
        if self.acc.is_main_process:
            state = {
                "model": job.weights.state_dict(),
                "optimizer": job.optimizer.state_dict(),
                "scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None,
                "step": step,
                "epoch": step / job.steps_per_epoch,
                "data_position": {"consumed_batches": step * self.cfg.optim.accum_steps,
                                  "batches_per_epoch": job.batches_per_epoch},
                "log_window": window,
                "world_size": self.acc.num_processes,
                "config": config_to_dict(self.cfg),
                "init_checkpoint": self.folder.init,
                EVALUATION_DUE: evaluation_due,
                **job.extra_state(),
            }
            self.folder.store.save(state, step)
        self.acc.wait_for_everyone()
        job.saved(step)

    # the loop --------------------------------------------------------------------------
    def fit(self, job: Job) -> None:
        """Train ``job`` from :attr:`step` to ``job.total_steps``."""
        acc, cfg = self.acc, self.cfg
        accum, seed, rank = cfg.optim.accum_steps, cfg.train.seed, acc.process_index
        clip = cfg.optim.clip_grad
        stream = DataStream(job.loader, job.batches_per_epoch, self.step * accum)
        job.train_mode()
        step = self.step
        if self.evaluation_due:   # the state was saved before its step's evaluation: do it now
            self._evaluate(job, step)
        started, first = time.perf_counter(), step
        while step < job.total_steps:
            job.before_step(step, lambda step=step: self.save(step, job))
            lr = job.lr(step)
            for group in job.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            torch.manual_seed(step_seed(seed, step, rank, "torch"))   # dropout, drop-path
            values: dict[str, torch.Tensor] = {}
            for j in range(accum):
                batch = stream.next()
                with nullcontext() if j == accum - 1 else acc.no_sync(job.module):
                    loss, scalars = job.micro_step(batch, step, j)
                    acc.backward(loss / accum)
                for k, v in {"loss": loss.detach(), **scalars}.items():
                    v = v.detach().float() / accum
                    values[k] = values[k] + v if k in values else v
            if clip:
                acc.clip_grad_norm_(job.module.parameters(), clip)
            job.optimizer.step()
            job.optimizer.zero_grad(set_to_none=True)
            step = self.step = step + 1
            job.after_step(step, values)
            self.window.add(values)
            self.logger.advance()
            if step % cfg.log.every == 0 or step == job.total_steps:
                self._log_window(job, step, lr, job.loader)
            evaluate = job.evaluate_now(step)
            if self._save_now(step, job):   # first: a failing evaluation costs no training
                self.save(step, job, evaluation_due=evaluate)
            if evaluate:
                self._evaluate(job, step)
        if step > first:
            self.timing = ((time.perf_counter() - started) / (step - first), step - first)

    def _evaluate(self, job: Job, step: int) -> None:
        self.log_evaluation(job, step, job.evaluate(step))
        self.evaluation_due = False
        job.train_mode()

    def _save_now(self, step: int, job: Job) -> bool:
        every = self.cfg.train.save_every
        if step == job.total_steps:
            return True
        if every:
            return step % every == 0
        accum = self.cfg.optim.accum_steps     # 0: at each epoch end
        return step * accum // job.batches_per_epoch > (step - 1) * accum // job.batches_per_epoch

    def _log_window(self, job: Job, step: int, lr: float, loader: Any) -> None:
        extra = dict(job.log_values(step))
        skipped = getattr(loader, "skipped", None)
        if skipped is not None:   # each process counts the samples of its own share of the data
            extra["skipped_samples"] = torch.tensor(float(skipped.value))
        means = self.window.means(self.acc, extra)
        skipped_total = means.pop("skipped_samples", None)
        first = step - self.window.count + 1
        if not math.isfinite(means["loss"]):
            raise FloatingPointError(f"non-finite training loss {means['loss']} in steps {first}..{step}")
        record: dict[str, Any] = {"step": step, "epoch": round(step / job.steps_per_epoch, 6), "lr": lr,
                                  "loss": means["loss"], **job.record(step, means)}
        if skipped_total is not None:   # the run's count: the mean over processes times their number
            record["skipped_samples"] = round(skipped_total * self.acc.num_processes)
        record["step_time"] = round(self.window.seconds_per_step(), 4)
        if self.acc.device.type == "cuda":
            record["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(self.acc.device) / 2**20, 1)
        if self.acc.is_main_process:   # once, outside step_time; the next window starts after it
            record.update(job.log_checks(step))
        self.window.reset()
        self.last_record = record
        self.logger.log(record, f"{self.name} step {step}/{job.total_steps}: loss {means['loss']:.4f}, "
                                f"lr {lr:.3g}, {record['step_time']:.3f} s/step")

    def log_evaluation(self, job: Job, step: int, metrics: Mapping[str, Any]) -> None:
        """Log an evaluation's scalar metrics as ``val/<name>`` at ``step``."""
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        record = {"step": step, "epoch": round(step / job.steps_per_epoch, 6),
                  **{f"val/{k}": v for k, v in scalars.items()}}
        self.logger.log(record, f"{self.name} step {step}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in scalars.items()), always=True)

    def log_image(self, tag: str, image: Any, step: int) -> None:
        """Send a picture to the trackers (``metrics.jsonl`` holds numbers only)."""
        if self.logger is not None:
            self.logger.log_image(tag, image, step)

    def print(self, text: str) -> None:
        (self.logger.print if self.logger is not None else self.acc.print)(text)

    # final outputs ---------------------------------------------------------------------
    def last_logged(self) -> dict[str, Any] | None:
        """The newest training record (this invocation's, else the newest in ``metrics.jsonl``)."""
        if self.last_record is not None:
            return self.last_record
        from multimae_att.run.folder import LOG_FILE
        from multimae_att.run.metrics_log import MetricsLogger

        log = self.out / LOG_FILE
        records = [r for r in MetricsLogger.read(log) if "loss" in r] if log.is_file() else []
        return records[-1] if records else None

    def cost(self) -> dict[str, Any]:
        """Seconds per optimizer step (this invocation, loop only) and peak device memory."""
        seconds, steps = self.timing if self.timing is not None else (None, 0)
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None
        return {"seconds_per_step": None if seconds is None else round(seconds, 4), "timed_steps": steps,
                "peak_memory_mb": None if peak is None else round(peak, 1)}

    def provenance(self, step: int) -> dict[str, Any]:
        return provenance(config_to_dict(self.cfg), step, self.folder.init)

    def finish(self, step: int, metrics: Mapping[str, Any], outputs: list[str]) -> dict[str, Any]:
        """Write ``metrics.json`` (``metrics`` + ``step``, ``outputs``, ``provenance``), print the
        final metrics, close the log and trackers; returns what was written."""
        result = {**metrics, "step": step, "outputs": list(outputs), "cost": self.cost(),
                  "provenance": self.provenance(step)}
        if self.acc.is_main_process:
            write_text_atomic(self.out / RESULTS_FILE, json.dumps(result, indent=2, default=_json_default) + "\n")
            shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and k != "task"}
            self.print(f"{self.name} finished at step {step}: " + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
                + f"; results in {self.out / RESULTS_FILE}")
        if self.logger is not None:
            self.logger.close()
        self.acc.wait_for_everyone()
        return result


def _json_default(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return str(v)
