"""One pretraining step: embed once -> scores -> budgets -> masks -> masked pass -> loss.

The pieces, each usable on its own (the benchmark calls :func:`forward_loss` directly):

- :func:`model_inputs`: batch dict -> model inputs (depth standardised when asked);
- :class:`~multimae_att.masking.planner.MaskPlanner` (:mod:`multimae_att.masking.planner`): scores
  (a pass of the score source, :mod:`multimae_att.scoring`, or the attention cache), budgets and
  masks, the same for a sample whether 1 or N processes share the batch;
- :class:`PretrainModule`: the ``nn.Module`` that DDP wraps: its ``forward`` embeds the inputs
  once, asks the planner for masks and runs ``forward_masked`` over the same token embeddings
  (and, with a loss predictor, its head over the no-mask features, with grad);
- :func:`forward_loss`: the above plus the masked losses (optionally AttG-weighted) and, with
  ``masking.score_source=predicted_loss``, the loss predictor's ranking loss.

Process layout: local sample ``i`` of rank ``r`` is row ``i * W + r`` of the global micro-batch
(the interleaving of :class:`multimae_att.data.EpochSampler`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from multimae_att.masking.planner import MaskPlan, MaskPlanner, token_grids
from multimae_att.model import MultiMAE, Tokens
from multimae_att.model.packed import PackedPrediction
from multimae_att.pretrain.losses import LossSpec, multimodal_loss
from multimae_att.scoring.loss_prediction import loss_targets, ranking_loss, spearman

__all__ = ["model_inputs", "PretrainModule", "StepResult", "forward_loss", "input_grids"]

TensorDict = dict[str, torch.Tensor]


def model_inputs(batch: Mapping[str, Any], modalities: list[str], standardize_depth: bool,
                 device: torch.device) -> TensorDict:
    """Model inputs (= reconstruction targets) for ``modalities`` from a batch dict.

    rgb ``[B, 3, H, W]`` float, depth ``[B, 1, H, W]`` float (robustly standardised per sample
    when ``standardize_depth``, as MultiMAE's pretraining), semseg ``[B, H/4, W/4]`` int64.
    """
    from multimae_att.data import robust_standardize_depth
    from multimae_att.modalities import get_modality

    out = {}
    for m in modalities:
        if m not in batch:
            raise KeyError(f"the batch has no '{m}' (keys: {sorted(batch)}); check model.in_modalities")
        x = batch[m].to(device, non_blocking=True)
        if m == "depth" and standardize_depth:
            valid = batch.get("mask_valid")
            x = robust_standardize_depth(x, None if valid is None else valid.to(device, non_blocking=True))
        out[m] = x.long() if get_modality(m).labels else x.float()   # class labels stay integers
    return out


class PretrainModule(nn.Module):
    """What DDP wraps: ``forward(inputs, plan_fn)`` = embed once -> masks -> masked pass.

    ``plan_fn(model, tokens) -> MaskPlan`` runs inside ``forward`` so the scoring pass and the
    masked pass see the same token embeddings and DDP sees one forward per backward.
    ``self.model`` is the plain :class:`MultiMAE` (its state dict is the exported one).
    """

    def __init__(self, model: MultiMAE, fp32_output_adapters: tuple[str, ...] = (),
                 loss_predictor: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.fp32_output_adapters = tuple(fp32_output_adapters)
        self.loss_predictor = loss_predictor  # trained here, kept out of model's state dict

    def forward(self, inputs: TensorDict, plan_fn: Callable[[MultiMAE, Tokens], MaskPlan]
                ) -> tuple[TensorDict, MaskPlan]:
        tokens = self.model.embed(inputs)
        plan = plan_fn(self.model, tokens)
        preds = self.model.forward_masked(tokens, plan.hidden, plan.thrown, num_visible=plan.num_visible,
                                          kept_range=plan.kept_range, fp32_output_adapters=self.fp32_output_adapters,
                                          packed=True)  # AMT: losses read the decoded rows
        if self.loss_predictor is not None:
            if plan.features is None:
                raise ValueError("PretrainModule has a loss predictor but the planner gave no "
                                 "features (masking.score_source must be predicted_loss)")
            plan.lossp_pred = self.loss_predictor(plan.features)  # grad reaches the head only
        return preds, plan


@dataclass
class StepResult:
    loss: torch.Tensor                 # scalar, with graph (weighted sum over outputs)
    parts: dict[str, torch.Tensor]     # output -> loss, detached
    plan: MaskPlan
    preds: dict[str, torch.Tensor | PackedPrediction]  # image, or decoded rows when thrown (as_images)
    inputs: TensorDict
    # detached scalars to log: 'lossp/loss' (ranking loss), 'lossp/spearman_train' (scores vs losses)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def attg_scores_from_data(batch: Mapping[str, Any], grids: Mapping[str, tuple[int, int]],
                          device: torch.device) -> TensorDict:
    """``batch['att_map']`` ``[B, h, w]`` pooled to each modality's token grid -> ``[B, N_m]``."""
    if "att_map" not in batch:
        raise KeyError("loss.attg.source=data needs 'att_map' in the batch (precomputed maps)")
    maps = batch["att_map"].to(device, non_blocking=True).float().unsqueeze(1)
    return {m: F.adaptive_avg_pool2d(maps, hw).flatten(1) for m, hw in grids.items()}


def forward_loss(module: nn.Module, batch: Mapping[str, Any], planner: MaskPlanner, *,
                 epoch: float, generator: torch.Generator, in_modalities: list[str],
                 standardize_depth: bool, loss_weights: Mapping[str, float],
                 specs: Mapping[str, LossSpec] | None = None, attg: str | None = None,
                 tau: float = 0.75, attg_normalize: bool = False, want_scores: bool = False,
                 loss_prediction_weight: float = 1.0,
                 device: torch.device | None = None) -> StepResult:
    """Forward + loss of one micro-batch. ``module``: a (possibly DDP-wrapped) :class:`PretrainModule`.

    ``attg``: None (off), ``'scores'`` (this step's scores) or ``'data'`` (the batch's
    precomputed ``att_map``); ``attg_normalize``: ``loss.attg.normalize``. With a loss predictor
    (``predicted_loss`` source) the total adds ``loss_prediction_weight`` x its ranking loss on
    the counted tokens of the rows it has features for, against their per-patch losses
    (detached); ``extras`` holds ``lossp/loss`` and, when this step has scores,
    ``lossp/spearman_train`` (scores, predicted before the head saw this batch, vs the actual
    losses; the held-out figure ``lossp/spearman`` is :mod:`multimae_att.pretrain.heldout`'s).
    """
    device = device or next(module.parameters()).device
    inputs = model_inputs(batch, in_modalities, standardize_depth, device)

    def plan_fn(model: MultiMAE, tokens: Tokens) -> MaskPlan:
        return planner(model, tokens, batch, epoch, generator,
                       want_scores=want_scores or attg == "scores")

    preds, plan = module(inputs, plan_fn)
    attg_scores = None
    if attg == "scores":
        attg_scores = plan.scores
    elif attg == "data":
        inner = module.module if hasattr(module, "module") else module
        attg_scores = attg_scores_from_data(batch, input_grids(inner.model, inputs), device)
    patches: dict[str, torch.Tensor] | None = {} if plan.lossp_pred is not None else None
    loss, parts = multimodal_loss(preds, inputs, plan.hidden, plan.thrown, loss_weights, specs,
                                  attg_scores=attg_scores, tau=tau, denominators=plan.denominators,
                                  attg_normalize=attg_normalize, patch_losses=patches,
                                  # counted (hidden, not thrown) <= kept
                                  max_counted=None if plan.kept_range is None else
                                  {m: hi for m, (_, hi) in plan.kept_range.items()})
    extras: dict[str, torch.Tensor] = {}
    if plan.lossp_pred is not None:
        targets = loss_targets(patches, loss_weights, list(plan.hidden))
        counted = {m: c for m, c in plan.counted().items() if m in targets}
        rows = plan.feature_rows
        rank = ranking_loss({m: plan.lossp_pred[m] for m in targets}, {m: t[rows] for m, t in targets.items()},
                            {m: c[rows] for m, c in counted.items()}, num_pairs=plan.lossp_pairs)
        loss = loss + loss_prediction_weight * rank
        extras["lossp/loss"] = rank.detach()
        if plan.scores is not None:
            extras["lossp/spearman_train"] = spearman({m: plan.scores[m] for m in targets}, targets, counted)
    return StepResult(loss, {k: v.detach() for k, v in parts.items()}, plan, preds, inputs, extras)


def input_grids(model: MultiMAE, inputs: TensorDict) -> dict[str, tuple[int, int]]:
    """modality -> (h, w) token grid for raw model inputs (rgb/depth full size, semseg at 1/4).

    The image size comes from any input through its adapter's stride, as in ``model.embed``.
    """
    m = next(iter(inputs))
    return token_grids(model, Tokens(dict(inputs), model.input_adapters[m].full_image_size(inputs[m])))
