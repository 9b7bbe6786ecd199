"""One pretraining step: embed once -> scores -> budgets -> masks -> masked pass -> loss.

The pieces, each usable on its own (the benchmark calls :func:`forward_loss` directly):

- :func:`model_inputs`: batch dict -> model inputs (depth standardised when asked);
- :class:`MaskPlanner`: scores (fresh scoring pass or the attention cache), budgets and masks.
  Randomness is drawn for the whole *global* micro-batch (all processes) from a generator
  seeded by the step, and each process keeps its own rows, so the masks of a sample do not
  depend on how many processes share the batch (1-process and N-process runs agree);
- :class:`PretrainModule`: the ``nn.Module`` that DDP wraps: its ``forward`` embeds the inputs
  once, asks the planner for masks and runs ``forward_masked`` over the same token embeddings;
- :func:`forward_loss`: the above plus the masked losses (optionally AttG-weighted).

Process layout: local sample ``i`` of rank ``r`` is row ``i * W + r`` of the global micro-batch
(the interleaving of :class:`multimae_att.data.EpochSampler`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from multimae_att.losses import LossSpec, multimodal_loss
from multimae_att.masking import MaskingPolicy
from multimae_att.model import MultiMAE, Tokens

__all__ = ["model_inputs", "MaskPlan", "MaskPlanner", "PretrainModule", "StepResult", "forward_loss",
           "token_grids", "input_grids"]

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


@dataclass
class MaskPlan:
    """Masks of the local batch and what the loss and pictures need.

    ``hidden``/``thrown``: modality -> bool ``[B, N_m]`` (1 = hidden / thrown); ``scores``:
    modality -> float ``[B, N_m]`` head-averaged (None when no scoring pass ran); ``visible``:
    int64 ``[B, M]``; ``guided``: bool ``[B]``; ``denominators``: modality -> scalar tensor on the
    masks' device, (samples of the global micro-batch with at least one hidden, non-thrown
    token) / number of processes. ``num_visible``: K, the visible tokens of every sample;
    ``kept_range``: modality -> (fewest, most) tokens a sample keeps (not thrown), known
    without reading the masks. Both are host ints, so the model and the losses need no host
    sync to size their tensors (None: read from the masks).
    """

    hidden: TensorDict
    thrown: Optional[TensorDict]
    scores: Optional[TensorDict]
    visible: torch.Tensor
    guided: torch.Tensor
    denominators: dict[str, torch.Tensor]
    num_visible: int | None = None
    kept_range: dict[str, tuple[int, int]] | None = None


class MaskPlanner:
    """Scores -> budgets -> masks for one micro-batch (see the module docstring).

    ``cache``: an :class:`multimae_att.attention_cache.AttentionCache` or None; when given,
    scores come from it and only samples without a fresh cached map get a scoring pass.
    """

    def __init__(self, policy: MaskingPolicy, num_encoded_tokens: int, score_layer: int = -1,
                 score_query: str = "global", rank: int = 0, world_size: int = 1,
                 cache: Any = None) -> None:
        self.policy = policy
        self.K = num_encoded_tokens
        self.score_layer, self.score_query = score_layer, score_query
        self.rank, self.world_size = rank, world_size
        self.cache = cache

    def scores(self, model: MultiMAE, tokens: Tokens, batch: Mapping[str, Any],
               epoch: float) -> TensorDict:
        """Attention scores of this batch: ``[B, N_m]`` (``[B, H, N_m]`` for per-head strategies)."""
        per_head = self.policy.per_head
        kw = dict(layer=self.score_layer, query=self.score_query)
        if self.cache is None or per_head:
            return model.attention_scores(tokens, per_head=per_head, **kw)
        grids = token_grids(model, tokens)
        # The cache lives on the host: keep `valid` there, so finding the misses reads no device
        # value; the scores go up from pinned memory (a pageable copy would wait for the GPU).
        cached, valid = self.cache.lookup(batch, grids, int(epoch))
        dev = next(iter(tokens.values())).device
        if dev.type == "cuda":
            cached = {m: s.pin_memory().to(dev, non_blocking=True) for m, s in cached.items()}
        elif dev.type != "cpu":
            cached = {m: s.to(dev) for m, s in cached.items()}

        def score_fn(index: torch.Tensor) -> TensorDict:
            sub = Tokens({m: t[index.to(t.device)] for m, t in tokens.items()}, tokens.image_size)
            return model.attention_scores(sub, **kw)

        return self.cache.fill(batch, cached, valid, score_fn, int(epoch), grids)

    def __call__(self, model: MultiMAE, tokens: Tokens, batch: Mapping[str, Any], epoch: float,
                 generator: torch.Generator, want_scores: bool = False) -> MaskPlan:
        """Masks for the local micro-batch; ``want_scores`` forces a scoring pass (AttG, pictures)."""
        first = next(iter(tokens.values()))
        B, W, dev = first.shape[0], self.world_size, first.device
        rows = torch.arange(B, device=dev) * W + self.rank     # local rows in the global batch
        sizes = {m: t.shape[1] for m, t in tokens.items()}
        need = self.policy.needs_scores(epoch)
        scores = self.scores(model, tokens, batch, epoch) if (need or want_scores) else None
        visible = self.policy.budgets(list(sizes.values()), self.K, B * W, generator, device=dev)
        glob = None
        if need:
            glob = {m: s.new_zeros((B * W,) + tuple(s.shape[1:])).index_copy_(0, rows, s.float())
                    for m, s in scores.items()}
        masks = self.policy(glob, visible, epoch, generator, num_tokens=sizes)
        counted = {m: masks.hidden[m] if masks.thrown is None else masks.hidden[m] & ~masks.thrown[m]
                   for m in masks.hidden}
        denominators = {m: c.any(dim=1).sum() / W for m, c in counted.items()}  # on the device: no sync
        if scores is not None and self.policy.per_head:
            scores = {m: s.mean(dim=1) for m, s in scores.items()}
        return MaskPlan(hidden={m: h[rows] for m, h in masks.hidden.items()},
                        thrown=None if masks.thrown is None else {m: t[rows] for m, t in masks.thrown.items()},
                        scores=scores, visible=visible[rows],
                        guided=(masks.guided[rows] if masks.guided is not None
                                else torch.ones(B, dtype=torch.bool, device=dev)),
                        denominators=denominators, num_visible=self.K,
                        kept_range=self.policy.kept_range(sizes, self.K, epoch))


def token_grids(model: MultiMAE, tokens: Tokens) -> dict[str, tuple[int, int]]:
    """modality -> (h, w) token grid of this batch (every adapter tiles the full image)."""
    H, W = tokens.image_size
    out = {}
    for m in tokens:
        ph, pw = model.input_adapters[m].patch_size_full
        out[m] = (H // ph, W // pw)
    return out


class PretrainModule(nn.Module):
    """What DDP wraps: ``forward(inputs, plan_fn)`` = embed once -> masks -> masked pass.

    ``plan_fn(model, tokens) -> MaskPlan`` runs inside ``forward`` so the scoring pass and the
    masked pass see the same token embeddings and DDP sees one forward per backward.
    ``self.model`` is the plain :class:`MultiMAE` (its state dict is the exported one).
    """

    def __init__(self, model: MultiMAE, fp32_output_adapters: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.model = model
        self.fp32_output_adapters = tuple(fp32_output_adapters)

    def forward(self, inputs: TensorDict, plan_fn: Callable[[MultiMAE, Tokens], MaskPlan]
                ) -> tuple[TensorDict, MaskPlan]:
        tokens = self.model.embed(inputs)
        plan = plan_fn(self.model, tokens)
        preds = self.model.forward_masked(tokens, plan.hidden, plan.thrown, num_visible=plan.num_visible,
                                          kept_range=plan.kept_range, fp32_output_adapters=self.fp32_output_adapters)
        return preds, plan


@dataclass
class StepResult:
    loss: torch.Tensor                 # scalar, with graph (weighted sum over outputs)
    parts: dict[str, torch.Tensor]     # output -> loss, detached
    plan: MaskPlan
    preds: TensorDict
    inputs: TensorDict


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
                 specs: Mapping[str, LossSpec] | None = None, attg: Optional[str] = None,
                 tau: float = 0.75, want_scores: bool = False,
                 device: torch.device | None = None) -> StepResult:
    """Forward + loss of one micro-batch. ``module``: a (possibly DDP-wrapped) :class:`PretrainModule`.

    ``attg``: None (off), ``'scores'`` (this step's attention scores) or ``'data'`` (the
    batch's precomputed ``att_map``).
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
    loss, parts = multimodal_loss(preds, inputs, plan.hidden, plan.thrown, loss_weights, specs,
                                  attg_scores=attg_scores, tau=tau, denominators=plan.denominators,
                                  # counted (hidden, not thrown) <= kept
                                  max_counted=None if plan.kept_range is None else
                                  {m: hi for m, (_, hi) in plan.kept_range.items()})
    return StepResult(loss, {k: v.detach() for k, v in parts.items()}, plan, preds, inputs)


def input_grids(model: MultiMAE, inputs: TensorDict) -> dict[str, tuple[int, int]]:
    """modality -> (h, w) token grid for raw model inputs (rgb/depth full size, semseg at 1/4).

    The image size comes from any input through its adapter's stride, as in ``model.embed``.
    """
    m = next(iter(inputs))
    return token_grids(model, Tokens(dict(inputs), model.input_adapters[m].full_image_size(inputs[m])))
