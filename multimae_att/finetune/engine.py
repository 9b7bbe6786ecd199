"""The one finetuning engine shared by every task (cls, semseg, depth, linear_probe, knn).

``run(cfg)``: build the task's model, load ``init.checkpoint``, and hand :class:`FinetuneJob` (the
step: AdamW over timm's layer-wise LR decay groups, warm-up + cosine LR as a pure function of the
step; the evaluation over the whole validation set, keeping ``checkpoint-best.pth`` /
``checkpoint-last.pth`` in MultiMAE layout) to the run skeleton shared with pretraining
(:class:`multimae_att.run.trainer.Run`: run folder, resume, Accelerate, loop, ``metrics.jsonl``,
trackers, ``metrics.json``). Frozen-feature tasks (``trains = False``) only extract features and
evaluate.

Determinism: the data order and augmentation (crops, RandAugment) are functions of (seed, epoch,
sample), Mixup/CutMix of (seed, step), dropout and drop-path of (seed, step, rank), the head's
initialisation of the seed: two runs with one config give identical weights, and a killed run
restarted equals an uninterrupted one.

Distributed evaluation: the validation loader is prepared by Accelerate and per-sample metric
statistics go through ``gather_for_metrics`` (which drops the samples repeated to even out the
last batch), so every process sums exactly the statistics of the whole set once.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset

from multimae_att.atomic import save_atomic
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
from multimae_att.optim import build_adamw
from multimae_att.preflight import check_finetune
from multimae_att.run.trainer import Job, Run, end_distributed, run_length
from multimae_att.run.trainer import make_accelerator as _make_accelerator
from multimae_att.schedules import cosine_lr, scaled_lr
from multimae_att.seeds import step_seed

__all__ = ["run", "FinetuneJob", "evaluate", "extract_features", "build_optimizer", "make_accelerator",
           "end_distributed"]


def _find_unused(cfg: FinetuneConfig) -> bool:
    unused = cfg.train.find_unused_parameters
    return cfg.head_kind() == "dpt" if unused is None else unused   # DPT never uses refinenet4.resConfUnit1


def make_accelerator(cfg: FinetuneConfig, task: TaskSpec | None = None):
    """The skeleton's accelerator (:func:`multimae_att.run.trainer.make_accelerator`) for ``cfg``
    (without trackers: for evaluation outside a run)."""
    return _make_accelerator(cfg, _find_unused(cfg))


# ---------------------------------------------------------------------------------- data

def _loader_kwargs(cfg: FinetuneConfig) -> dict[str, Any]:
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
             max_batches: int | None = None) -> dict[str, Any]:
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
def extract_features(model, loader, task: TaskSpec, accelerator, max_batches: int | None = None,
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

def build_optimizer(cfg: FinetuneConfig, model: torch.nn.Module, global_batch: int,
                    device: torch.device | str = "cpu"):
    """AdamW over timm's layer-decay parameter groups (each group carries ``lr_scale``), on the
    fastest kernel of ``device`` (:func:`multimae_att.optim.build_adamw`)."""
    from timm.optim import param_groups_layer_decay
    o = cfg.optim
    base_lr = o.lr if o.lr is not None else scaled_lr(o.blr, global_batch)
    groups = param_groups_layer_decay(model, weight_decay=o.weight_decay,
                                      no_weight_decay_list=sorted(model.no_weight_decay()),
                                      layer_decay=o.layer_decay)
    if not groups:
        raise ValueError("nothing to optimise: every parameter is frozen")
    return build_adamw(groups, device, lr=base_lr, betas=tuple(o.betas), eps=o.eps), base_lr


def _better(key: str, new: float, old: float | None) -> bool:
    if old is None or math.isnan(old):
        return not math.isnan(new)
    return new < old if key in LOWER_IS_BETTER else new > old


# ------------------------------------------------------------------------------- training

class FinetuneJob(Job):
    """One finetuning step and the evaluation, for :meth:`multimae_att.run.trainer.Run.fit`.

    Keeps ``checkpoint-best.pth`` / ``checkpoint-last.pth`` at each evaluation (every
    ``train.eval_every`` epochs and at the last step) and, in its training state, the best value
    of the task's key and the records :func:`reported_metrics` chooses from.
    """

    def __init__(self, cfg: FinetuneConfig, task: TaskSpec, run: Run, model) -> None:
        self.cfg, self.task, self.run, acc = cfg, task, run, run.acc
        world = acc.num_processes
        self.loader = build_train_loader(cfg, task, acc.process_index, world)
        self.val_loader = build_eval_loader(cfg, task, cfg.data.val_split, acc)
        self.batches_per_epoch = len(self.loader)
        self.steps_per_epoch, self.total_steps = run_length(
            self.batches_per_epoch, cfg.optim.accum_steps, cfg.train.epochs, cfg.train.max_steps)
        if self.steps_per_epoch < 1:
            raise ValueError(f"{cfg.data.root}: the training split has fewer than one optimizer step "
                             f"of data (batch_size={cfg.data.batch_size} x accum_steps per process)")
        global_batch = cfg.data.batch_size * cfg.optim.accum_steps * world
        optimizer, self.base_lr = build_optimizer(cfg, model, global_batch, acc.device)
        self.module, self.optimizer = acc.prepare(model, optimizer)
        self.weights = acc.unwrap_model(self.module)
        self.best: float | None = None
        # {'epoch', 'step', 'metrics'} of the best and the last evaluation (train.report)
        self.best_record: dict[str, Any] | None = None
        self.last_record: dict[str, Any] | None = None

    def epochs_done(self, step: int) -> int:
        return step * self.cfg.optim.accum_steps // self.batches_per_epoch

    # the skeleton's hooks --------------------------------------------------------------
    def lr(self, step: int) -> float:
        o = self.cfg.optim
        return cosine_lr(step / self.steps_per_epoch, self.base_lr, o.min_lr, o.warmup_epochs,
                         self.cfg.train.epochs)

    def train_mode(self) -> None:
        self.module.train()
        if self.task.frozen_encoder:   # frozen features: encoder in eval mode, only the head trains
            self.weights.encoder.eval()

    def micro_step(self, batch: dict[str, Any], step: int, micro: int):
        from accelerate.utils import send_to_device
        batch = self.task.train_batch(send_to_device(batch, self.run.acc.device), step, micro,
                                      self.run.acc.process_index)
        with self.run.acc.autocast():
            loss = self.task.loss(self.task.forward(self.module, batch), batch)
        return loss, {}

    def evaluate_now(self, step: int) -> bool:
        if step == self.total_steps:
            return True
        done = self.epochs_done(step)
        return done > self.epochs_done(step - 1) and done % self.cfg.train.eval_every == 0

    def evaluate(self, step: int) -> dict[str, Any]:
        """Metrics over the validation set; keeps checkpoint-best/-last and the records."""
        metrics = evaluate(self.weights, self.val_loader, self.task, self.run.acc,
                           self.cfg.train.max_eval_batches)
        key = self.task.best_key()
        self.last_record = {"epoch": self.epochs_done(step), "step": step, "metrics": metrics}
        if _better(key, float(metrics[key]), self.best):
            self.best = float(metrics[key])
            self.best_record = self.last_record
            self.export("checkpoint-best.pth", step, metrics)
        self.export("checkpoint-last.pth", step, metrics)
        return metrics

    def extra_state(self) -> dict[str, Any]:
        return {"best": self.best, "best_record": self.best_record, "last_record": self.last_record}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")
        self.best_record, self.last_record = state.get("best_record"), state.get("last_record")

    # outputs ---------------------------------------------------------------------------
    def export(self, name: str, step: int, metrics: dict[str, Any]) -> None:
        """``output_dir/<name>`` = ``{'model', 'epoch', 'step', 'metrics', 'config', 'provenance'}``."""
        if self.run.acc.is_main_process:
            save_atomic({"model": self.weights.state_dict(), "epoch": self.epochs_done(step), "step": step,
                         "metrics": _scalars(metrics), "config": config_to_dict(self.cfg),
                         "provenance": self.run.provenance(step)}, Path(self.cfg.output_dir) / name)

    def reported(self, step: int) -> dict[str, Any]:
        """What ``metrics.json`` reports (``train.report``); a run resumed at its last step
        without an evaluation of its final weights evaluates them now."""
        if self.last_record is None or self.last_record["step"] != step:
            self.run.log_evaluation(self, step, self.evaluate(step))
        return reported_metrics(self.cfg, self.last_record, self.best_record)


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


# ----------------------------------------------------------------------------------- entry

def run(cfg: FinetuneConfig) -> dict[str, Any]:
    """Train (if the task trains) and evaluate; returns and writes ``output_dir/metrics.json``.

    The run folder's lifecycle (fresh start, resume, finished, ``--overwrite``) is the
    skeleton's (:class:`multimae_att.run.trainer.Run`): a finished run is left untouched and its
    ``metrics.json`` returned.
    """
    check_finetune(cfg)                         # data root, init checkpoint, ...: before any work
    task = make_task(cfg)
    run = Run(cfg, resume_config_changes, name=f"finetune {cfg.task.name}", trains=task.trains,
              find_unused_parameters=_find_unused(cfg))
    if run.done:
        return run.results()
    acc = run.acc
    acc.print(protocol_line(cfg, task.best_key() if task.trains else "", task.trains))
    if task.trains:
        line, warning = global_batch_line(cfg, acc.num_processes)
        acc.print(line if warning is None else f"{line}\n{warning}")
    torch.manual_seed(step_seed(cfg.train.seed, "init"))   # the same head in every run and process
    model = task.build()
    if run.fresh and cfg.init.checkpoint:       # loaded before config.yaml is (re)written
        acc.print(_load_init(model, cfg.init.checkpoint, task))
    if not task.trains:
        if not run.begin(0):
            return run.results()
        metrics = _knn(cfg, task, model.to(acc.device), acc)
        return run.finish(0, {"task": cfg.task.name, **metrics}, [])
    job = FinetuneJob(cfg, task, run, model)
    if not run.begin(job.total_steps):
        return run.results()
    run.restore(job)
    run.fit(job)
    metrics = job.reported(job.total_steps)
    return run.finish(job.total_steps, {"task": cfg.task.name, **metrics},
                      ["checkpoint-best.pth", "checkpoint-last.pth"])


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


def _knn(cfg: FinetuneConfig, task: TaskSpec, model, accelerator) -> dict[str, Any]:
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
