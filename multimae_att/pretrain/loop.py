"""The pretraining runner: its step on the one run skeleton (:mod:`multimae_att.run.trainer`).

:func:`train` assembles a run (data, model, optimizer, masking) and hands :class:`PretrainJob`
to :class:`multimae_att.run.trainer.Run`, which owns the run folder, training states, loop,
logging and final outputs shared with finetuning.

Exact resume without replay: every random draw is a function of (seed, step, ...): the data
order and augmentation of (seed, epoch, sample), the masks of a generator seeded by (seed, step,
micro-batch), the global torch RNG (drop-path) re-seeded per step and rank by the skeleton, the
learning rate a pure function of the step. A training state therefore only needs the model,
optimizer, scaler, step, log window and masking-policy state (adaptive alphas). Killed anywhere,
a run restarted with the same command continues from its latest state and produces the same
later losses and final weights as an uninterrupted run.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from multimae_att.config import ConfigError
from multimae_att.masking.planner import MaskPlanner
from multimae_att.model.packed import as_images
from multimae_att.optim import build_adamw, load_optimizer_state
from multimae_att.preflight import check_pretrain
from multimae_att.pretrain.config import PretrainConfig, resume_config_changes
from multimae_att.pretrain.heldout import build_heldout_ranking
from multimae_att.pretrain.losses import LossSpec
from multimae_att.pretrain.pictures import picture_info, save_pictures
from multimae_att.pretrain.setup import (
    build_model,
    build_policy,
    build_pretrain_loader,
    load_init_checkpoint,
    param_groups,
)
from multimae_att.pretrain.step import PretrainModule, forward_loss, input_grids
from multimae_att.run.on_main import run_on_main
from multimae_att.run.trainer import DataStream, Job, Run, run_length
from multimae_att.schedules import LRSchedule, scaled_lr, tau_schedule
from multimae_att.scoring.refresh import CacheRefresher, build_cache
from multimae_att.scoring.sources import build_scoring
from multimae_att.seeds import step_seed

__all__ = ["train", "DataStream", "RunPlan", "plan_run", "PretrainJob"]


@dataclass
class RunPlan:
    batches_per_epoch: int      # micro-batches per rank and epoch
    steps_per_epoch: float      # optimizer steps per epoch
    total_steps: int
    global_batch: int
    schedule: LRSchedule


def plan_run(cfg: PretrainConfig, batches_per_epoch: int, world_size: int) -> RunPlan:
    """Steps, global batch and the LR schedule of a run (pure)."""
    accum = cfg.optim.accum_steps
    if batches_per_epoch < 1:
        raise ConfigError(f"data.root={cfg.data.root!r} has too few samples for one batch of "
                         f"{cfg.data.batch_size} per process")
    spe, total = run_length(batches_per_epoch, accum, cfg.train.epochs, cfg.train.max_steps)
    gb = cfg.data.batch_size * world_size * accum
    base = cfg.optim.lr * cfg.optim.lr_scale if cfg.optim.lr is not None else scaled_lr(
        cfg.optim.blr, gb, cfg.optim.lr_scale)
    s = cfg.schedule
    sched = LRSchedule(base, cfg.optim.min_lr * cfg.optim.lr_scale, s.warmup_epochs,
                       s.total_epochs, s.start_epoch, spe)
    return RunPlan(batches_per_epoch, spe, total, gb, sched)


def train(cfg: PretrainConfig) -> Path:
    """Run (or resume) the pretraining of ``cfg``; returns ``output_dir``.

    The run folder's lifecycle (fresh start, resume, finished, ``--overwrite``) is the
    skeleton's: a finished run is left untouched.
    """
    check_pretrain(cfg)  # data root, init checkpoint, model-dependent masking: before any work
    out = Path(cfg.output_dir)
    run = Run(cfg, resume_config_changes, name="pretrain")   # refusals and config changes stop here
    if run.done:
        run.results()
        return out
    acc = run.acc
    rank, world = acc.process_index, acc.num_processes
    loader = build_pretrain_loader(cfg, rank, world)
    plan = plan_run(cfg, len(loader), world)
    torch.manual_seed(step_seed(cfg.train.seed, "init"))  # same initial weights in every run
    model = build_model(cfg)
    init_opt = None
    if run.fresh and cfg.init.checkpoint:
        init_opt = load_init_checkpoint(model, cfg.init.checkpoint)
    source, predictor = build_scoring(cfg.masking, list(cfg.model.in_modalities), model.dim_tokens)
    module = PretrainModule(model, tuple(cfg.train.fp32_output_adapters), loss_predictor=predictor)
    optimizer = build_adamw(param_groups(model, cfg.optim.weight_decay, extra=predictor), acc.device, lr=0.0,
                            betas=cfg.optim.betas, eps=cfg.optim.eps)  # fused where the device has it
    if init_opt is not None and cfg.init.load_optimizer:
        _try_load_optimizer(optimizer, init_opt, acc)
    module, optimizer = acc.prepare(module, optimizer)
    policy = build_policy(cfg)
    if not run.begin(plan.total_steps):   # finished: nothing is touched
        return out
    job = PretrainJob(cfg, run, plan, module, optimizer, model, loader, policy, source, predictor)
    # Only the main process runs the check (log_checks), so only it reads the held-out images;
    # a split that is missing or yields nothing stops every process.
    job.heldout = run_on_main(acc, lambda: build_heldout_ranking(cfg, source, job.specs, acc.device, acc.autocast))
    run.restore(job)
    job.start_cache()
    run.fit(job)
    outputs = []
    if cfg.train.final_export:
        if acc.is_main_process:
            _export(model, cfg, plan.total_steps, out / "final.pth", run.provenance(plan.total_steps),
                    predictor if cfg.train.export_loss_predictor else None)
        outputs.append("final.pth")
    last = {k: v for k, v in (run.last_logged() or {}).items()      # results, not timings
            if k not in ("step", "step_time") and not k.startswith("time/")}
    run.finish(plan.total_steps, {"task": "pretrain", **last}, outputs)
    return out


class PretrainJob(Job):
    """One pretraining step (masks, forward, losses) and what it logs, for :meth:`Run.fit`.

    Logged (means over the ``log.every`` steps of a record): ``loss``, ``losses`` per output,
    ``visible`` tokens per modality, ``thrown`` (AMT), ``guided_fraction``; at the logging step
    itself: ``alphas`` (adaptive budgets) and the masking diagnostics (:meth:`log_values`). Any
    other scalar a step returns under a ``group/name`` key is logged under that key as is: the
    loss predictor's ``lossp/loss`` and ``lossp/spearman_train`` (``masking.score_source=predicted_loss``);
    with ``log.heldout_split`` also ``lossp/spearman`` at the logging step and its seconds
    ``time/heldout_s`` (:meth:`log_checks`, :mod:`multimae_att.pretrain.heldout`).
    """

    def __init__(self, cfg: PretrainConfig, run: Run, plan: RunPlan, module, optimizer, model, loader,
                 policy, source=None, predictor=None) -> None:
        self.cfg, self.run, self.plan = cfg, run, plan
        self.module, self.optimizer, self.weights, self.loader = module, optimizer, model, loader
        self.policy, self.source, self.predictor = policy, source, predictor
        self.batches_per_epoch, self.total_steps = plan.batches_per_epoch, plan.total_steps
        self.steps_per_epoch = plan.steps_per_epoch
        acc = run.acc
        self.device, self.accum = acc.device, cfg.optim.accum_steps
        self.attg = cfg.loss.attg.source if cfg.loss.attg.enabled else None
        self.specs = {"semseg": LossSpec("ce", ignore_index=cfg.loss.semseg_ignore_index)}
        self.cache = None
        self.planner = None
        self.refresher = None
        self.pictures = False
        self.picture_info = picture_info(cfg) if run.acc.is_main_process else None
        self.epoch, self.tau = 0.0, cfg.loss.attg.tau0
        self.last_res = None
        self.heldout = None   # the loss predictor's held-out check (set by train)

    def start_cache(self) -> None:
        """The attention cache and its refresher, once the state (and step) are restored."""
        cfg, run, acc = self.cfg, self.run, self.run.acc
        self.cache = build_cache(cfg, self.loader, acc)
        self.planner = MaskPlanner(self.policy, cfg.masking.num_encoded_tokens, rank=acc.process_index,
                                   world_size=acc.num_processes, cache=self.cache, source=self.source,
                                   total_epochs=max(self.total_steps, 1) / self.steps_per_epoch,
                                   cached_train_share=cfg.masking.loss_predictor.cached_train_share)
        step = run.step
        if self.cache is not None and cfg.masking.cache.refresh == "full":
            self.refresher = CacheRefresher(cfg, self.cache, self.weights, acc,
                                            resumed_step=step if run.resumed else None, policy=self.policy,
                                            last_epoch=(self.total_steps - 1) / self.steps_per_epoch,
                                            source=self.source)
        elif self.cache is not None and run.resumed:
            run.print("note: masking.cache.refresh=crops: the cache may hold writes made after "
                      f"the state of step {step}; this resumed run is not bit-exact")

    # the skeleton's hooks --------------------------------------------------------------
    def lr(self, step: int) -> float:
        return self.plan.schedule(step)

    def before_step(self, step: int, save) -> None:
        self.last_res = None
        if self.refresher is not None:  # full-image cache refresh at the start of a window
            self.refresher.maybe_refresh(step, step / self.steps_per_epoch, save)
        self.epoch = step / self.steps_per_epoch
        self.tau = tau_schedule(step, self.total_steps, self.cfg.loss.attg.tau0, self.cfg.loss.attg.tau_end)
        every = self.cfg.log.pictures_every
        self.pictures = (self.run.acc.is_main_process and every > 0
                         and ((step + 1) % every == 0 or step + 1 == self.total_steps))

    def micro_step(self, batch: dict, step: int, micro: int):
        cfg = self.cfg
        gen = torch.Generator(device=self.device).manual_seed(step_seed(cfg.train.seed, step, micro, "masks"))
        last = micro == self.accum - 1
        res = forward_loss(self.module, batch, self.planner, epoch=self.epoch, generator=gen,
                           in_modalities=list(cfg.model.in_modalities),
                           standardize_depth=cfg.data.standardize_depth, loss_weights=cfg.loss.weights,
                           specs=self.specs, attg=self.attg, tau=self.tau,
                           attg_normalize=cfg.loss.attg.normalize,
                           loss_prediction_weight=cfg.loss.loss_prediction_weight, device=self.device)
        if last:
            self.last_res = res
        scalars = {k: v.float() for k, v in {**res.parts, **res.extras}.items()}
        for i, m in enumerate(res.plan.hidden):
            scalars[f"visible/{m}"] = res.plan.visible[:, i].float().mean()
            if res.plan.thrown is not None:
                scalars[f"thrown/{m}"] = res.plan.thrown[m].float().sum(1).mean()
        scalars["guided"] = res.plan.guided.float().mean()
        return res.loss, scalars

    def after_step(self, step: int, values: Mapping[str, torch.Tensor]) -> None:
        mods = [m for m in self.cfg.model.in_modalities if m in values]
        if self.policy.adaptive is not None:   # the alphas follow each step's losses (a host sync)
            losses = _mean_over_processes({m: values[m] for m in mods}, self.run.acc)
            self.policy.update_losses(losses)
        res = self.last_res
        if self.pictures:  # score panels only when the masks came from scores (no extra scoring pass)
            drawn = save_pictures(Path(self.cfg.output_dir) / "pictures", step, res.inputs, as_images(res.preds),
                                  res.plan.hidden, res.plan.thrown, res.plan.scores,
                                  input_grids(self.weights, res.inputs), self.cfg.log.pictures_samples,
                                  info=self.picture_info, guided=res.plan.guided)
            for m, image in drawn.items():
                self.run.log_image(f"pictures/{m}", image, step)

    def log_values(self, step: int) -> dict[str, torch.Tensor]:
        """``mask/hidden_fg_share`` and, when this step's masks came from scores,
        ``scores/fg_auroc.<modality>`` of the last micro-batch
        (:func:`multimae_att.diagnostics.step_diagnostics`; nothing without
        ``data.background_classes`` or semseg labels). Every process computes the same keys
        (scores drawn only for pictures on the main process are left out)."""
        res, bg = self.last_res, self.cfg.data.background_classes
        if res is None or not bg or "semseg" not in res.inputs:
            return {}
        from multimae_att.diagnostics import step_diagnostics

        scores = res.plan.scores if (self.policy.needs_scores(self.epoch) or self.attg == "scores") else None
        return step_diagnostics(res.inputs["semseg"], input_grids(self.weights, res.inputs),
                                res.plan.hidden, scores, bg)

    def log_checks(self, step: int) -> dict[str, Any]:
        """The loss predictor's held-out ``lossp/spearman`` (with ``log.heldout_split``,
        :mod:`multimae_att.pretrain.heldout`), measured on the main process only (every process
        would measure the same images and weights) and outside ``step_time``; its seconds
        (device work included) as ``time/heldout_s``."""
        if self.heldout is None:
            return {}
        started = time.perf_counter()
        value = float(self.heldout(self.weights))   # the transfer waits for the device
        return {"lossp/spearman": value if value == value else None,   # NaN: nothing to rank -> null
                "time/heldout_s": round(time.perf_counter() - started, 4)}

    def saved(self, step: int) -> None:
        if self.refresher is not None:
            self.refresher.last_saved = step

    def record(self, step: int, means: Mapping[str, float]) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "losses": {k: v for k, v in means.items() if k not in ("loss", "guided") and "/" not in k},
            "visible": {k.split("/", 1)[1]: v for k, v in means.items() if k.startswith("visible/")},
            "guided_fraction": means["guided"]}
        thrown = {k.split("/", 1)[1]: v for k, v in means.items() if k.startswith("thrown/")}
        if thrown:
            rec["thrown"] = thrown
        # other group/name scalars (masking diagnostics: NaN = nothing to measure -> null)
        rec.update({k: (v if v == v else None) for k, v in means.items()
                    if "/" in k and not k.startswith(("visible/", "thrown/"))})
        if self.policy.adaptive is not None:
            rec["alphas"] = [float(a) for a in self.policy.current_alphas()]
        return rec

    def extra_state(self) -> dict[str, Any]:
        predictor = None if self.predictor is None else self.predictor.state_dict()
        return {"masking": self.policy.state_dict(), "loss_predictor": predictor}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.policy.load_state_dict(state["masking"])
        if (state.get("loss_predictor") is None) != (self.predictor is None):
            raise ValueError("training state and config disagree on the loss predictor "
                             "(masking.score_source)")
        if self.predictor is not None:
            self.predictor.load_state_dict(state["loss_predictor"], strict=True)


def _mean_over_processes(values: Mapping[str, torch.Tensor], accelerator) -> dict[str, float]:
    keys = sorted(values)
    vec = torch.stack([values[k].float() for k in keys])
    if accelerator.num_processes > 1:
        vec = accelerator.reduce(vec, reduction="mean")
    return dict(zip(keys, vec.tolist()))


def _try_load_optimizer(optimizer, state: dict, accelerator) -> None:
    """Use the checkpoint's optimizer state when its parameter groups match ours."""
    ours = [len(g["params"]) for g in optimizer.param_groups]
    theirs = [len(g["params"]) for g in state.get("param_groups", [])]
    if ours != theirs:
        accelerator.print(f"init.checkpoint: optimizer state not used (groups {theirs} vs {ours})")
        return
    try:
        load_optimizer_state(optimizer, state)  # keeps our AdamW kernel
    except (ValueError, KeyError, RuntimeError) as e:
        accelerator.print(f"init.checkpoint: optimizer state not used ({e})")


def _export(model, cfg: PretrainConfig, step: int, path: Path, prov: dict, loss_predictor=None) -> None:
    """Weights in MultiMAE layout: ``{'model': state_dict, 'step', 'config', 'provenance'}``
    (atomic), plus ``'loss_predictor'`` (its own state dict, outside ``'model'``) when one is given."""
    from multimae_att.checkpoint import export_weights
    from multimae_att.config import config_to_dict

    extra = {"step": step, "config": config_to_dict(cfg), "provenance": prov}
    if loss_predictor is not None:
        extra["loss_predictor"] = {k: v.detach().cpu() for k, v in loss_predictor.state_dict().items()}
    export_weights(model, path, "multimae", extra=extra)
