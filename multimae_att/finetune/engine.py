"""The one finetuning engine shared by every task (cls, semseg, depth, linear_probe, knn).

``run(cfg)``: build the task's model, load ``init.checkpoint``, resume from the run folder's
latest training state, train (AdamW, layer-wise LR decay through timm's param groups, warm-up +
cosine LR as a pure function of the step, Accelerate for devices / mixed precision / DDP),
evaluate over the whole validation set, keep ``checkpoint-best.pth`` / ``checkpoint-last.pth``
(MultiMAE layout: ``{'model': state_dict, ...}``) and write ``metrics.jsonl`` (training) and
``metrics.json`` (final evaluation). Frozen-feature tasks (``trains = False``) only extract
features and evaluate.

Distributed evaluation: the validation loader is prepared by Accelerate and per-sample metric
statistics go through ``gather_for_metrics`` (which drops the samples repeated to even out the
last batch), so every process sums exactly the statistics of the whole set once.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch.utils.data import IterableDataset
from tqdm import tqdm

from multimae_att.config import ConfigError, config_to_dict
from multimae_att.data import EpochSampler, MultiModalLoader, build_dataset, build_loader, collate
from multimae_att.data.subset import stratified_subset, training_subset
from multimae_att.finetune.augment import with_sample_transform
from multimae_att.finetune.config import FinetuneConfig, resume_config_changes
from multimae_att.finetune.knn import knn_evaluate
from multimae_att.finetune.native import make_native_collate
from multimae_att.finetune.protocols import make_recipe, select_eval_samples
from multimae_att.finetune.report import global_batch_line, protocol_line, reported_metrics
from multimae_att.finetune.skips import EvalSkips
from multimae_att.finetune.tasks import LOWER_IS_BETTER, TaskSpec, make_task
from multimae_att.preflight import check_finetune
from multimae_att.run.folder import LOG_FILE, RESULTS_FILE, read_results
from multimae_att.run.lifecycle import RunFolder
from multimae_att.run.provenance import provenance
from multimae_att.runstate import (LoadedState, MetricsLogger, capture_rng, restore_rng, save_atomic,
                                   write_text_atomic)
from multimae_att.schedules import cosine_lr, scaled_lr

__all__ = ["run", "evaluate", "extract_features", "build_optimizer", "make_accelerator"]


def make_accelerator(cfg: FinetuneConfig, task: TaskSpec):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    unused = cfg.train.find_unused_parameters
    if unused is None:   # DPT never uses refinenet4.resConfUnit1
        unused = cfg.head_kind() == "dpt"
    return Accelerator(cpu=cfg.train.cpu, mixed_precision=cfg.train.mixed_precision,
                       gradient_accumulation_steps=cfg.optim.accum_steps,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)])


# ---------------------------------------------------------------------------------- data

def _loader_kwargs(cfg: FinetuneConfig) -> Dict[str, Any]:
    # semseg as a *target* at full (label) resolution; as an *input* at 1/4, what its adapter expects
    semseg_scale = 4 if "semseg" in cfg.model.in_modalities else 1
    return dict(image_size=cfg.data.image_size, layout=cfg.data.layout, seed=cfg.train.seed,
                semseg_scale=semseg_scale, reduce_zero_label=cfg.task.reduce_zero_label,
                label_ranges=cfg.label_ranges())


def build_train_loader(cfg: FinetuneConfig, task: TaskSpec, rank: int, world: int) -> MultiModalLoader:
    """Training loader split over ranks by the data package, with the task's sample transform."""
    d = cfg.data
    ds = build_dataset(d.root, task.data_modalities(), split=d.train_split, train=True, rank=rank,
                       world_size=world, batch_size=d.batch_size, scale=tuple(d.crop_scale),
                       hflip=d.hflip, recipe=make_recipe(cfg, train=True), **_loader_kwargs(cfg))
    ds = training_subset(ds, d.train_fraction, cfg.train.seed)
    transform = getattr(task, "sample_transform", lambda: None)()
    ds = with_sample_transform(ds, transform)
    common = dict(batch_size=d.batch_size, num_workers=d.num_workers, collate_fn=collate, drop_last=True)
    if isinstance(ds, IterableDataset):
        return MultiModalLoader(ds, **common)
    sampler = EpochSampler(len(ds), shuffle=True, seed=cfg.train.seed, rank=rank, world_size=world)
    return MultiModalLoader(ds, sampler=sampler, **common)


def build_eval_loader(cfg: FinetuneConfig, task: TaskSpec, split: str, accelerator):
    """Deterministic loader over the whole ``split``, sharded and de-duplicated by Accelerate.

    ``eval_mode`` full: whole images resized to the input size, the task's targets also at their
    stored resolution (``*_native``, padded per batch, see :mod:`multimae_att.finetune.native`);
    center_crop: the centre crop of ``eval_crop_pct`` for inputs and targets alike. Protocol
    multimae: MultiMAE's recipe (:mod:`multimae_att.finetune.protocols`), scored at input size;
    ``data.max_eval_samples``: MultiMAE's seeded subset of the split.
    """
    d = cfg.data
    full = cfg.eval_mode() == "full"
    native = task.native_targets() if full else []
    loader = build_loader(d.root, task.data_modalities(), split=split, train=False,
                          batch_size=d.eval_batch_size or d.batch_size, num_workers=d.num_workers,
                          drop_last=False, eval_crop_pct=d.eval_crop_pct, eval_full_image=full,
                          native_modalities=native, recipe=make_recipe(cfg, train=False),
                          on_corrupt="mark",   # a corrupt sample is never replaced by another
                          collate_fn=make_native_collate(cfg.task.ignore_index) if native else collate,
                          **_loader_kwargs(cfg))
    if split == d.val_split:   # not k-NN's training bank
        loader = select_eval_samples(loader, d.max_eval_samples, f"{d.root} split {split!r}")
    return accelerator.prepare_data_loader(loader)


# ---------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, task: TaskSpec, accelerator,
             max_batches: Optional[int] = None) -> Dict[str, Any]:
    """Task metrics over every readable sample of ``loader`` (all processes get the same numbers),
    plus ``skipped_eval_samples``: the corrupt ones left out (see :mod:`multimae_att.finetune.skips`)."""
    was_training = model.training
    model.eval()
    metrics, skips = task.make_metrics(), EvalSkips()
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        with accelerator.autocast():
            pred = task.forward(model, batch)
        stats = task.eval_stats(metrics, pred, batch)
        stats, valid = accelerator.gather_for_metrics((stats, skips.valid(batch, len(stats), stats.device)))
        metrics.update(stats[valid.bool()])
        skips.add(batch)
    model.train(was_training)
    skipped = skips.finish(accelerator, task.cfg.data.eval_on_corrupt)
    return {**metrics.compute(), "skipped_eval_samples": skipped}


@torch.no_grad()
def extract_features(model, loader, task: TaskSpec, accelerator, max_batches: Optional[int] = None,
                     skips: EvalSkips | None = None):
    """(features ``[N, D]`` float32, labels ``[N]``) of every readable sample of ``loader``, on
    CPU; corrupt ones are left out and noted in ``skips``."""
    model.eval()
    feats, labels = [], []
    skips = skips if skips is not None else EvalSkips()
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        with accelerator.autocast():
            f = task.features(model, batch).float()
        f, y, valid = accelerator.gather_for_metrics((f, batch["cls"], skips.valid(batch, len(f), f.device)))
        feats.append(f[valid.bool()].cpu())
        labels.append(y[valid.bool()].cpu())
        skips.add(batch)
    return torch.cat(feats), torch.cat(labels)


# ----------------------------------------------------------------------------- optimiser

def build_optimizer(cfg: FinetuneConfig, model: torch.nn.Module, global_batch: int):
    """AdamW over timm's layer-decay parameter groups (each group carries ``lr_scale``)."""
    from timm.optim import param_groups_layer_decay
    o = cfg.optim
    base_lr = o.lr if o.lr is not None else scaled_lr(o.blr, global_batch)
    groups = param_groups_layer_decay(model, weight_decay=o.weight_decay,
                                      no_weight_decay_list=sorted(model.no_weight_decay()),
                                      layer_decay=o.layer_decay)
    if not groups:
        raise ValueError("nothing to optimise: every parameter is frozen")
    return torch.optim.AdamW(groups, lr=base_lr, betas=tuple(o.betas), eps=o.eps), base_lr


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def _better(key: str, new: float, old: Optional[float]) -> bool:
    if old is None or math.isnan(old):
        return not math.isnan(new)
    return new < old if key in LOWER_IS_BETTER else new > old


# ------------------------------------------------------------------------------- training

class _Trainer:
    """State of one training run: position (step, epoch, batch in epoch), best metric, I/O."""

    def __init__(self, cfg: FinetuneConfig, task: TaskSpec, model, accelerator, folder: RunFolder) -> None:
        self.cfg, self.task, self.acc = cfg, task, accelerator
        self.out = Path(cfg.output_dir)
        world = accelerator.num_processes
        self.train_loader = build_train_loader(cfg, task, accelerator.process_index, world)
        self.val_loader = build_eval_loader(cfg, task, cfg.data.val_split, accelerator)
        self.steps_per_epoch = len(self.train_loader) // cfg.optim.accum_steps
        if self.steps_per_epoch < 1:
            raise ConfigError(f"data.root={cfg.data.root!r}: the training split has fewer than one "
                              f"optimizer step of data (data.batch_size={cfg.data.batch_size} x "
                              f"optim.accum_steps={cfg.optim.accum_steps} per process)")
        global_batch = cfg.data.batch_size * cfg.optim.accum_steps * world
        optimizer, self.base_lr = build_optimizer(cfg, model, global_batch)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.total_steps = math.ceil(cfg.train.epochs * self.steps_per_epoch)
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.store, self.init = folder.store, folder.init
        self.step = self.epoch = self.batch_in_epoch = 0
        self.best: Optional[float] = None
        self.last_metrics: Dict[str, Any] = {}
        # {'epoch', 'step', 'metrics'} of the best and the last evaluation (train.report)
        self.best_record: Optional[Dict[str, Any]] = None
        self.last_record: Optional[Dict[str, Any]] = None
        self.logger: Optional[MetricsLogger] = None

    def start(self, loaded: Optional[LoadedState]) -> None:
        """Resume from ``loaded`` (checked by :class:`RunFolder`) or start fresh; open the log."""
        if loaded is not None:
            self.resume(loaded.state)
        self.logger = MetricsLogger(self.out / LOG_FILE, enabled=self.acc.is_main_process,
                                    resume_step=self.step if loaded is not None else None)

    # state ------------------------------------------------------------------------------
    def state(self) -> Dict[str, Any]:
        scaler = self.acc.scaler.state_dict() if self.acc.scaler is not None else None
        return {"model": self.acc.unwrap_model(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": scaler, "step": self.step,
                "epoch": self.epoch, "data_position": self.batch_in_epoch, "best": self.best,
                "last_metrics": self.last_metrics, "best_record": self.best_record,
                "last_record": self.last_record, "rng": capture_rng(),
                "config": config_to_dict(self.cfg), "init_checkpoint": self.init}

    def resume(self, state: Dict[str, Any]) -> None:
        """Continue from ``state``, the newest readable training state in ``output_dir/checkpoints``
        (loaded and config-checked by :class:`RunFolder`)."""
        self.acc.unwrap_model(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") is not None and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch, self.best = int(state["data_position"]), state["best"]
        self.last_metrics = state.get("last_metrics", {})
        self.best_record, self.last_record = state.get("best_record"), state.get("last_record")
        restore_rng(state["rng"])

    def save_state(self) -> None:
        if self.acc.is_main_process:
            self.store.save(self.state(), self.step)
        self.acc.wait_for_everyone()

    def export(self, name: str, metrics: Dict[str, Any]) -> None:
        """``output_dir/<name>`` = ``{'model', 'epoch', 'step', 'metrics', 'config', 'provenance'}``."""
        if self.acc.is_main_process:
            config = config_to_dict(self.cfg)
            save_atomic({"model": self.acc.unwrap_model(self.model).state_dict(), "epoch": self.epoch,
                         "step": self.step, "metrics": _scalars(metrics), "config": config,
                         "provenance": provenance(config, self.step, self.init)}, self.out / name)

    # loop -------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        o = self.cfg.optim
        return cosine_lr(step / self.steps_per_epoch, self.base_lr, o.min_lr, o.warmup_epochs,
                         self.cfg.train.epochs)

    def train_step(self, batch: Dict[str, Any]) -> Optional[torch.Tensor]:
        """One micro-batch; returns the (detached) loss when an optimizer step happened, else None."""
        from accelerate.utils import send_to_device
        batch = self.task.train_batch(send_to_device(batch, self.acc.device), self.step)
        with self.acc.accumulate(self.model):
            with self.acc.autocast():
                loss = self.task.loss(self.task.forward(self.model, batch), batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.step}")
            self.acc.backward(loss)
            if self.acc.sync_gradients and self.cfg.optim.clip_grad:
                self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
            if self.acc.sync_gradients:
                _set_lr(self.optimizer, self.lr_at(self.step))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach() if self.acc.sync_gradients else None

    def run_epoch(self, bar) -> None:
        self.model.train()
        if self.task.frozen_encoder:   # frozen features: encoder in eval mode, only the head trains
            self.acc.unwrap_model(self.model).encoder.eval()
        self.train_loader.set_epoch(self.epoch, self.batch_in_epoch)
        t0 = time.perf_counter()
        for batch in self.train_loader:
            loss = self.train_step(batch)
            self.batch_in_epoch += 1
            if loss is None:
                continue
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", epoch=self.epoch)
            if self.step % self.cfg.log.every == 0 or self.step == self.total_steps:
                mean_loss = self.acc.reduce(loss.reshape(1), reduction="mean").item()   # over processes
                self.logger.log({"step": self.step, "epoch": self.epoch, "lr": self.lr_at(self.step - 1),
                                 "loss": mean_loss, "step_time": (time.perf_counter() - t0) / self.cfg.log.every})
                t0 = time.perf_counter()
            if self.cfg.train.save_every and self.step % self.cfg.train.save_every == 0:
                self.save_state()
            if self.step >= self.total_steps:
                break
        if self.batch_in_epoch >= len(self.train_loader):   # the epoch is complete
            self.epoch += 1
            self.batch_in_epoch = 0

    def evaluate_and_keep(self) -> Dict[str, Any]:
        metrics = evaluate(self.acc.unwrap_model(self.model), self.val_loader, self.task, self.acc,
                           self.cfg.train.max_eval_batches)
        key = self.task.best_key()
        self.logger.log({"step": self.step, "epoch": self.epoch, **{f"val/{k}": v for k, v in
                                                                    _scalars(metrics).items()}})
        self.last_record = {"epoch": self.epoch, "step": self.step, "metrics": metrics}
        if _better(key, float(metrics[key]), self.best):
            self.best = float(metrics[key])
            self.best_record = self.last_record
            self.export("checkpoint-best.pth", metrics)
        self.export("checkpoint-last.pth", metrics)
        self.last_metrics = metrics
        return metrics

    def fit(self) -> Dict[str, Any]:
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"finetune {self.cfg.task.name}",
                   disable=not (self.acc.is_main_process and self.cfg.log.progress), dynamic_ncols=True)
        metrics = dict(self.last_metrics)
        while self.step < self.total_steps:
            epoch_before = self.epoch
            self.run_epoch(bar)
            finished = self.step >= self.total_steps
            if finished or (self.epoch != epoch_before and self.epoch % self.cfg.train.eval_every == 0):
                metrics = self.evaluate_and_keep()
            self.save_state()
        bar.close()
        if not metrics or self.last_record is None:   # resumed a finished run: evaluate again
            metrics = self.evaluate_and_keep()
        return reported_metrics(self.cfg, self.last_record, self.best_record)


def _scalars(metrics: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


# ----------------------------------------------------------------------------------- entry

def run(cfg: FinetuneConfig) -> Dict[str, Any]:
    """Train (if the task trains) and evaluate; returns and writes ``output_dir/metrics.json``.

    The run folder's lifecycle (fresh start, resume, finished, ``--overwrite``) is
    :class:`multimae_att.run.lifecycle.RunFolder`'s: a finished run is left untouched and its
    ``metrics.json`` returned.
    """
    check_finetune(cfg)                         # data root, init checkpoint, ...: before any work
    torch.manual_seed(cfg.train.seed)           # same head initialisation on every process
    task = make_task(cfg)
    accelerator = make_accelerator(cfg, task)
    out = Path(cfg.output_dir)
    folder = RunFolder(cfg, resume_config_changes, accelerator, trains=task.trains)
    folder.check()   # before any work: refusals and result-changing config changes stop here
    if folder.done:
        folder.report_finished()
        return read_results(out)
    accelerator.print(protocol_line(cfg, task.best_key() if task.trains else "", task.trains))
    if task.trains:
        line, warning = global_batch_line(cfg, accelerator.num_processes)
        accelerator.print(line if warning is None else f"{line}\n{warning}")
    model = task.build()
    if folder.fresh and cfg.init.checkpoint:    # loaded before config.yaml is (re)written
        accelerator.print(_load_init(model, cfg.init.checkpoint, task))
    if task.trains:
        trainer = _Trainer(cfg, task, model, accelerator, folder)
        if not folder.begin(trainer.total_steps):
            return read_results(out)
        trainer.start(folder.state)
        metrics, step = trainer.fit(), trainer.step
    else:
        if not folder.begin(0):
            return read_results(out)
        metrics, step = _knn(cfg, task, model.to(accelerator.device), accelerator), 0
    outputs = ["checkpoint-best.pth", "checkpoint-last.pth"] if task.trains else []
    result = {"task": cfg.task.name, **metrics, "step": step, "outputs": outputs,
              "provenance": provenance(config_to_dict(cfg), step, folder.init)}
    if accelerator.is_main_process:
        write_text_atomic(out / RESULTS_FILE, json.dumps(result, indent=2, default=_json_default) + "\n")
    accelerator.wait_for_everyone()
    return result


def _load_init(model, path: str, task: TaskSpec):
    """``init.checkpoint`` into ``model``; a file that does not fit is a ConfigError naming it."""
    from multimae_att.checkpoint import CheckpointKeyError, UnreadableCheckpointError, UnsafeCheckpointError
    from multimae_att.finetune.loading import load_pretrained
    from multimae_att.hub import CheckpointHashError

    try:
        return load_pretrained(model, path, task)
    except (CheckpointKeyError, UnreadableCheckpointError, UnsafeCheckpointError, CheckpointHashError,
            FileNotFoundError, ValueError, TypeError) as e:
        raise ConfigError(f"init.checkpoint={path!r}: {e}") from e


def end_distributed() -> None:
    """Destroy the process group (if any) before the interpreter exits.

    Call once per process, after the last :func:`run`: gloo's worker threads still alive at
    exit abort the process ("terminate called without an active exception"). Not done inside
    :func:`run`, because Accelerate's process state is a per-process singleton that a later
    :func:`run` in the same process reuses.
    """
    from accelerate.state import PartialState

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        PartialState().destroy_process_group()


def _knn(cfg: FinetuneConfig, task: TaskSpec, model, accelerator) -> Dict[str, Any]:
    t, mb, skips = cfg.task, cfg.train.max_eval_batches, EvalSkips()
    train = extract_features(model, build_eval_loader(cfg, task, cfg.data.train_split, accelerator),
                             task, accelerator, mb, skips)
    if cfg.data.train_fraction < 1.0:   # low-data k-NN: the same stratified share of the labelled set
        keep = torch.as_tensor(stratified_subset(train[1].tolist(), cfg.data.train_fraction, cfg.train.seed))
        train = (train[0][keep], train[1][keep])
    val = extract_features(model, build_eval_loader(cfg, task, cfg.data.val_split, accelerator),
                           task, accelerator, mb, skips)
    skipped = skips.finish(accelerator, cfg.data.eval_on_corrupt)
    return {**knn_evaluate(*train, *val, num_classes=t.num_classes, k=t.knn_k,
                           temperature=t.knn_temperature, shots=t.few_shot, repeats=t.few_shot_repeats,
                           seed=cfg.train.seed), "skipped_eval_samples": skipped}


def _json_default(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return str(v)
