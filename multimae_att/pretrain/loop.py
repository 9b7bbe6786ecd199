"""The pretraining loop: Accelerate, exact resume, metrics, pictures, final export.

Exact resume without replay: every random draw is a function of (seed, step, ...):
the data order and augmentation of (seed, epoch, sample), the masks of a generator seeded by
(seed, step, micro-batch), the global torch RNG (drop-path) re-seeded per step and rank, the
learning rate a pure function of the step. A training state therefore only needs the model,
optimizer, scaler, step, masking-policy state (adaptive alphas) and, for the record, RNG states
and the data position. Killed anywhere, a run restarted with the same command continues from its
latest state and produces the same later losses and final weights as an uninterrupted run.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from multimae_att.config import ConfigError, config_to_dict
from multimae_att.losses import LossSpec
from multimae_att.pretrain.cache import CacheRefresher, build_cache
from multimae_att.pretrain.config import PretrainConfig, resume_config_changes
from multimae_att.pretrain.pictures import save_pictures
from multimae_att.preflight import check_pretrain
from multimae_att.pretrain.setup import (build_model, build_policy, build_pretrain_loader,
                                         load_init_checkpoint, make_accelerator, param_groups)
from multimae_att.pretrain.step import MaskPlanner, PretrainModule, forward_loss, input_grids
from multimae_att.run.folder import LOG_FILE, RESULTS_FILE
from multimae_att.run.lifecycle import RunFolder
from multimae_att.run.provenance import provenance
from multimae_att.runstate import MetricsLogger, capture_rng, step_seed, write_text_atomic
from multimae_att.schedules import LRSchedule, scaled_lr, tau_schedule
from multimae_att.scoring import build_scoring

__all__ = ["train", "DataStream", "RunPlan", "plan_run"]


class DataStream:
    """Endless micro-batches over epochs, positioned by the number already consumed."""

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
                          f"data.batch_size={cfg.data.batch_size} per process")
    spe = batches_per_epoch / accum
    total = max(1, math.ceil(cfg.train.epochs * spe))
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    gb = cfg.data.batch_size * world_size * accum
    base = cfg.optim.lr * cfg.optim.lr_scale if cfg.optim.lr is not None else scaled_lr(
        cfg.optim.blr, gb, cfg.optim.lr_scale)
    s = cfg.schedule
    sched = LRSchedule(base, cfg.optim.min_lr * cfg.optim.lr_scale, s.warmup_epochs,
                       s.total_epochs, s.start_epoch, spe)
    return RunPlan(batches_per_epoch, spe, total, gb, sched)


def train(cfg: PretrainConfig) -> Path:
    """Run (or resume) the pretraining of ``cfg``; returns ``output_dir``.

    The run folder's lifecycle (fresh start, resume, finished, ``--overwrite``) is
    :class:`multimae_att.run.lifecycle.RunFolder`'s: a finished run is left untouched.
    """
    check_pretrain(cfg)  # data root, init checkpoint, model-dependent masking: before any work
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    folder = RunFolder(cfg, resume_config_changes, accelerator)
    folder.check()   # before any work: refusals and result-changing config changes stop here
    if folder.done:
        folder.report_finished()
        return out
    loader = build_pretrain_loader(cfg, rank, world)
    run = plan_run(cfg, len(loader), world)
    torch.manual_seed(step_seed(cfg.train.seed, "init"))  # same initial weights in every run
    model = build_model(cfg)
    init_opt = None
    if folder.fresh and cfg.init.checkpoint:
        init_opt = load_init_checkpoint(model, cfg.init.checkpoint)
    source, predictor = build_scoring(cfg.masking, list(cfg.model.in_modalities), model.dim_tokens)
    module = PretrainModule(model, tuple(cfg.train.fp32_output_adapters), loss_predictor=predictor)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay, extra=predictor), lr=0.0,
                                  betas=cfg.optim.betas, eps=cfg.optim.eps)
    if init_opt is not None and cfg.init.load_optimizer:
        _try_load_optimizer(optimizer, init_opt, accelerator)
    module, optimizer = accelerator.prepare(module, optimizer)
    policy = build_policy(cfg)
    if not folder.begin(run.total_steps):   # finished: nothing is touched
        return out
    state = folder.state.state if folder.state is not None else None
    store = folder.store
    cache = build_cache(cfg, loader, accelerator)
    planner = MaskPlanner(policy, cfg.masking.num_encoded_tokens, rank=rank, world_size=world,
                          cache=cache, source=source, total_epochs=max(run.total_steps, 1) / run.steps_per_epoch,
                          cached_train_share=cfg.masking.loss_predictor.cached_train_share)
    step = 0
    if state is not None:
        step = _restore(state, module, optimizer, policy, accelerator)
    refresher = None
    if cache is not None and cfg.masking.cache.refresh == "full":
        refresher = CacheRefresher(cfg, cache, accelerator.unwrap_model(module).model, accelerator,
                                   resumed_step=step if state is not None else None, policy=policy,
                                   last_epoch=(run.total_steps - 1) / run.steps_per_epoch, source=source)
    elif cache is not None and state is not None:
        accelerator.print("note: masking.cache.refresh=crops: the cache may hold writes made after "
                          f"the state of step {step}; this resumed run is not bit-exact")
    if accelerator.is_main_process and accelerator.log_with:
        # TensorBoard's hparams accept only numbers, strings and booleans.
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                   for k, v in _flat(config_to_dict(cfg)).items()}
        accelerator.init_trackers("tb", config=hparams)
    logger = MetricsLogger(out / LOG_FILE, enabled=accelerator.is_main_process,
                           resume_step=step if state is not None else None)
    stream = DataStream(loader, run.batches_per_epoch, step * cfg.optim.accum_steps)
    _loop(cfg, run, step, module, optimizer, planner, policy, stream, store, logger, accelerator,
          refresher, folder.init)
    if accelerator.is_main_process:
        prov = provenance(config_to_dict(cfg), run.total_steps, folder.init)
        if cfg.train.final_export:
            inner = accelerator.unwrap_model(module)
            _export(inner.model, cfg, run.total_steps, out / "final.pth", prov,
                    inner.loss_predictor if cfg.train.export_loss_predictor else None)
        _write_results(out, run.total_steps, prov, ["final.pth"] if cfg.train.final_export else [])
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def _write_results(out: Path, step: int, prov: dict, outputs: list[str]) -> None:
    """``metrics.json``: the last logged record (its losses, lr, ...), the provenance and the
    exported files; it marks the run folder finished."""
    records = [r for r in MetricsLogger.read(out / LOG_FILE) if "loss" in r] if (out / LOG_FILE).exists() else []
    last = {k: v for k, v in (records[-1] if records else {}).items() if k != "step_time"}
    result = {"task": "pretrain", **last, "step": step, "outputs": outputs, "provenance": prov}
    write_text_atomic(out / RESULTS_FILE, json.dumps(result, indent=2) + "\n")


def _loop(cfg, run, step, module, optimizer, planner, policy, stream, store, logger, accelerator,
          refresher=None, init=None):
    accum, rank, seed = cfg.optim.accum_steps, accelerator.process_index, cfg.train.seed
    attg = cfg.loss.attg.source if cfg.loss.attg.enabled else None
    specs = {"semseg": LossSpec("ce", ignore_index=cfg.loss.semseg_ignore_index)}
    bar = tqdm(total=run.total_steps, initial=step, desc="pretrain", dynamic_ncols=True,
               disable=not (accelerator.is_main_process and cfg.log.progress))
    device = accelerator.device
    while step < run.total_steps:
        if refresher is not None:  # full-image cache refresh at the start of a window
            refresher.maybe_refresh(step, step / run.steps_per_epoch, lambda: _save(
                store, step, stream, module, optimizer, policy, cfg, accelerator, init))
        t0 = time.perf_counter()
        lr = run.schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        epoch = step / run.steps_per_epoch
        tau = tau_schedule(step, run.total_steps, cfg.loss.attg.tau0, cfg.loss.attg.tau_end)
        pictures = (accelerator.is_main_process and cfg.log.pictures_every > 0
                    and ((step + 1) % cfg.log.pictures_every == 0 or step + 1 == run.total_steps))
        torch.manual_seed(step_seed(seed, step, rank, "torch"))  # drop-path etc.
        totals: dict[str, float] = {}
        for j in range(accum):
            batch = stream.next()
            gen = torch.Generator(device=device).manual_seed(step_seed(seed, step, j, "masks"))
            sync = nullcontext() if j == accum - 1 else accelerator.no_sync(module)
            with sync:
                res = forward_loss(module, batch, planner, epoch=epoch, generator=gen,
                                   in_modalities=list(cfg.model.in_modalities),
                                   standardize_depth=cfg.data.standardize_depth,
                                   loss_weights=cfg.loss.weights, specs=specs, attg=attg, tau=tau,
                                   attg_normalize=cfg.loss.attg.normalize,
                                   loss_prediction_weight=cfg.loss.loss_prediction_weight,
                                   want_scores=pictures and j == accum - 1, device=device)
                accelerator.backward(res.loss / accum)
            _accumulate(totals, res, accum)
        if (step + 1) % cfg.log.every == 0 or step + 1 == run.total_steps:
            totals.update(_masking_diagnostics(cfg, res, accelerator.unwrap_model(module).model, policy,
                                               epoch, attg))
        if cfg.optim.clip_grad is not None:
            accelerator.clip_grad_norm_(module.parameters(), cfg.optim.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses = _reduce(totals, accelerator)
        policy.update_losses({m: losses[m] for m in cfg.model.in_modalities if m in losses})
        bar.update(1)
        bar.set_postfix(loss=f"{losses['total']:.4f}", lr=f"{lr:.2e}")
        if step % cfg.log.every == 0 or step == run.total_steps:
            rec = _record(step, epoch, lr, tau, losses, res, stream, time.perf_counter() - t0, policy)
            logger.log(rec)
            if accelerator.log_with:
                accelerator.log({k: v for k, v in _flat(rec).items() if isinstance(v, (int, float))},
                                step=step)
        if pictures:
            save_pictures(Path(cfg.output_dir) / "pictures", step, res.inputs, res.preds,
                          res.plan.hidden, res.plan.thrown, res.plan.scores,
                          input_grids(accelerator.unwrap_model(module).model, res.inputs),
                          cfg.log.pictures_samples)
        if step % cfg.train.save_every == 0 or step == run.total_steps:
            _save(store, step, stream, module, optimizer, policy, cfg, accelerator, init)
            if refresher is not None:
                refresher.last_saved = step
    bar.close()


def _accumulate(totals: dict[str, Any], res: Any, accum: int) -> None:
    """Sum this micro-batch's losses (1/accum each) and token counts into ``totals``."""
    totals["total"] = totals.get("total", 0.0) + res.loss.detach().float() / accum
    for k, v in {**res.parts, **res.extras}.items():
        totals[k] = totals.get(k, 0.0) + v.float() / accum
    for i, m in enumerate(res.plan.hidden):
        key = f"visible/{m}"
        totals[key] = totals.get(key, 0.0) + res.plan.visible[:, i].float().mean() / accum
        if res.plan.thrown is not None:
            key = f"thrown/{m}"
            totals[key] = totals.get(key, 0.0) + res.plan.thrown[m].float().sum(1).mean() / accum
    totals["guided"] = totals.get("guided", 0.0) + res.plan.guided.float().mean() / accum


def _masking_diagnostics(cfg, res, model, policy, epoch, attg) -> dict[str, Any]:
    """Log-step masking diagnostics of the last micro-batch (:func:`multimae_att.diagnostics.
    step_diagnostics`): ``mask/hidden_fg_share`` and, when this step's masks came from scores,
    ``attn/fg_auroc.<modality>``; nothing without ``data.background_classes`` or semseg labels.
    Every process computes the same keys (scores drawn only for pictures on the main process are
    left out), so the values reduce like the losses."""
    bg = cfg.data.background_classes
    if not bg or "semseg" not in res.inputs:
        return {}
    from multimae_att.diagnostics import step_diagnostics

    scores = res.plan.scores if (policy.needs_scores(epoch) or attg == "scores") else None
    return step_diagnostics(res.inputs["semseg"], input_grids(model, res.inputs), res.plan.hidden, scores, bg)


def _reduce(totals: dict[str, Any], accelerator: Any) -> dict[str, float]:
    """Mean over processes (one collective for all values); python floats."""
    keys = sorted(totals)
    vec = torch.stack([torch.as_tensor(totals[k], dtype=torch.float32, device=accelerator.device)
                       for k in keys])
    if accelerator.num_processes > 1:
        vec = accelerator.reduce(vec, reduction="mean")
    return dict(zip(keys, vec.tolist()))


def _record(step, epoch, lr, tau, losses, res, stream, seconds, policy) -> dict[str, Any]:
    rec: dict[str, Any] = {"step": step, "epoch": round(epoch, 6), "lr": lr,
                           "loss": losses["total"],
                           "losses": {k: v for k, v in losses.items()
                                      if k not in ("total", "guided") and "/" not in k},
                           "visible": {k.split("/", 1)[1]: v for k, v in losses.items()
                                       if k.startswith("visible/")},
                           "guided_fraction": losses["guided"],
                           "skipped_samples": int(stream.loader.skipped.value),
                           "step_time": round(seconds, 4)}
    thrown = {k.split("/", 1)[1]: v for k, v in losses.items() if k.startswith("thrown/")}
    if thrown:
        rec["thrown"] = thrown
    if policy.adaptive is not None:
        rec["alphas"] = [float(a) for a in policy.current_alphas()]
    lossp = {k.split("/", 1)[1]: v for k, v in losses.items() if k.startswith("lossp/")}
    if lossp:  # loss predictor: ranking loss and Spearman of its scores vs the actual losses
        rec["lossp"] = lossp
    # masking diagnostics (log steps with data.background_classes); NaN (nothing to measure) -> null
    rec.update({k: (v if v == v else None) for k, v in losses.items() if k.startswith(("mask/", "attn/"))})
    return rec


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "/"))
        elif isinstance(v, (list, tuple)):
            out[key] = str(v)
        else:
            out[key] = v
    return out


def _save(store, step, stream, module, optimizer, policy, cfg, accelerator, init) -> None:
    """Training state (main process writes; all wait so no rank runs ahead of a save)."""
    if accelerator.is_main_process:
        state = {
            "model": accelerator.unwrap_model(module).model.state_dict(),
            "loss_predictor": _predictor_state(accelerator.unwrap_model(module)),
            "optimizer": optimizer.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "step": step,
            "epoch": step / max(stream.per_epoch / cfg.optim.accum_steps, 1e-12),
            "data_position": {"consumed_batches": step * cfg.optim.accum_steps,
                              "batches_per_epoch": stream.per_epoch},
            "masking": policy.state_dict(),
            "rng": capture_rng(),
            "world_size": accelerator.num_processes,
            "config": config_to_dict(cfg),
            "init_checkpoint": init,
        }
        store.save(state, step)
    accelerator.wait_for_everyone()


def _restore(state, module, optimizer, policy, accelerator) -> int:
    """Load a training state into the prepared objects; returns its step."""
    inner = accelerator.unwrap_model(module)
    inner.model.load_state_dict(state["model"], strict=True)
    if (state.get("loss_predictor") is None) != (inner.loss_predictor is None):
        raise ValueError("training state and config disagree on the loss predictor "
                         "(masking.score_source)")
    if inner.loss_predictor is not None:
        inner.loss_predictor.load_state_dict(state["loss_predictor"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler") is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    policy.load_state_dict(state["masking"])
    # Global RNG states are re-seeded every step (see the module docstring); nothing to restore.
    return int(state["step"])


def _try_load_optimizer(optimizer, state: dict, accelerator) -> None:
    """Use the checkpoint's optimizer state when its parameter groups match ours."""
    ours = [len(g["params"]) for g in optimizer.param_groups]
    theirs = [len(g["params"]) for g in state.get("param_groups", [])]
    if ours != theirs:
        accelerator.print(f"init.checkpoint: optimizer state not used (groups {theirs} vs {ours})")
        return
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as e:
        accelerator.print(f"init.checkpoint: optimizer state not used ({e})")


def _predictor_state(inner) -> dict | None:
    return None if inner.loss_predictor is None else inner.loss_predictor.state_dict()


def _export(model, cfg: PretrainConfig, step: int, path: Path, prov: dict, loss_predictor=None) -> None:
    """Weights in MultiMAE layout: ``{'model': state_dict, 'step', 'config', 'provenance'}``
    (atomic), plus ``'loss_predictor'`` (its own state dict, outside ``'model'``) when one is given."""
    from multimae_att.checkpoint import export_weights

    extra = {"step": step, "config": config_to_dict(cfg), "provenance": prov}
    if loss_predictor is not None:
        extra["loss_predictor"] = {k: v.detach().cpu() for k, v in loss_predictor.state_dict().items()}
    export_weights(model, path, "multimae", extra=extra)
