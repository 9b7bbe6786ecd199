"""The mask planner: scores -> budgets -> masks for one micro-batch of the pretraining step.

:class:`MaskPlanner` asks the score source (:mod:`multimae_att.scoring`) or the attention cache
for scores, the :class:`~multimae_att.masking.policy.MaskingPolicy` for budgets and masks, and
returns a :class:`MaskPlan` (the local rows' masks plus what the loss and pictures need).
Randomness is drawn for the whole *global* micro-batch (all processes) from a generator seeded
by the step, and each process keeps its own rows, so the masks of a sample do not depend on how
many processes share the batch (1-process and N-process runs agree).

Process layout: local sample ``i`` of rank ``r`` is row ``i * W + r`` of the global micro-batch
(the interleaving of :class:`multimae_att.data.EpochSampler`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from multimae_att.device_checks import to_device
from multimae_att.masking import MaskingPolicy
from multimae_att.model import MultiMAE, Tokens
from multimae_att.scoring.loss_prediction import count_pairs
from multimae_att.scoring.sources import AttentionScores, PredictedLossScores, ScorePass
from multimae_att.seeds import step_seed

TensorDict = dict[str, torch.Tensor]


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

    Loss prediction (``predicted_loss`` source, else None): ``features`` modality -> detached
    no-mask features ``[b, N_m, D]`` of the local rows ``feature_rows`` (int64 ``[b]``; all rows
    with a fresh pass, a drawn share with the cache); ``lossp_pairs``: pairs of counted tokens in
    those rows over the global micro-batch / number of processes (the ranking loss's divisor);
    ``lossp_pred``: the head's outputs on ``features`` with grad, set by :class:`PretrainModule`.
    """

    hidden: TensorDict
    thrown: TensorDict | None
    scores: TensorDict | None
    visible: torch.Tensor
    guided: torch.Tensor
    denominators: dict[str, torch.Tensor]
    num_visible: int | None = None
    kept_range: dict[str, tuple[int, int]] | None = None
    features: TensorDict | None = None
    feature_rows: torch.Tensor | None = None
    lossp_pairs: torch.Tensor | None = None
    lossp_pred: TensorDict | None = None

    def counted(self) -> TensorDict:
        """modality -> bool ``[B, N_m]``: hidden and not thrown (the tokens the loss reads)."""
        if self.thrown is None:
            return dict(self.hidden)
        return {m: h & ~self.thrown[m] for m, h in self.hidden.items()}


class MaskPlanner:
    """Scores -> budgets -> masks for one micro-batch (see the module docstring).

    ``source``: a score source (:mod:`multimae_att.scoring`; default: attention at
    ``score_layer`` / ``score_query``). ``cache``: an
    :class:`multimae_att.scoring.cache.AttentionCache` or None; when given, scores come from
    it and only samples without a fresh cached map get a scoring pass. ``total_epochs``: the
    run's length, for curriculum strategies (progress = epoch / total_epochs; required by them).
    ``cached_train_share``: with a ``predicted_loss`` source and the cache, the probability
    that a sample's no-mask features are computed to train the loss predictor (drawn per sample
    of the global micro-batch, on the host: :meth:`training_rows`); with fresh passes every
    sample trains it.
    """

    def __init__(self, policy: MaskingPolicy, num_encoded_tokens: int, score_layer: int = -1,
                 score_query: str = "global", rank: int = 0, world_size: int = 1,
                 cache: Any = None, *, source: Any = None, total_epochs: float | None = None,
                 cached_train_share: float = 0.0625) -> None:
        self.policy = policy
        self.K = num_encoded_tokens
        self.source = source if source is not None else AttentionScores(score_layer, score_query)
        self.rank, self.world_size = rank, world_size
        self.cache = cache
        if policy.uses_progress and not (total_epochs is not None and total_epochs > 0):
            raise ValueError(f"masking strategy {policy.strategy.name!r} follows the run's progress: "
                             "the planner needs total_epochs > 0")
        self.total_epochs = total_epochs
        if not 0.0 <= cached_train_share <= 1.0:
            raise ValueError(f"cached_train_share must lie in [0, 1], got {cached_train_share}")
        self.cached_train_share = float(cached_train_share)

    @property
    def trains_predictor(self) -> bool:
        """True when the source is a loss predictor that this planner feeds features to."""
        return isinstance(self.source, PredictedLossScores)

    def progress(self, epoch: float) -> float | None:
        """Position in the run in [0, 1] (None without ``total_epochs``)."""
        if self.total_epochs is None:
            return None
        return min(max(epoch / self.total_epochs, 0.0), 1.0)

    def scores(self, model: MultiMAE, tokens: Tokens, batch: Mapping[str, Any],
               epoch: float) -> ScorePass:
        """Scores of this batch: ``[B, N_m]`` (``[B, H, N_m]`` for per-head strategies)."""
        per_head = self.policy.per_head
        if self.cache is None or per_head:
            return self.source(model, tokens, per_head=per_head)
        grids = token_grids(model, tokens)
        # The cache lives on the host: keep `valid` there, so finding the misses reads no device
        # value.
        cached, valid = self.cache.lookup(batch, grids, int(epoch))
        dev = next(iter(tokens.values())).device
        cached = {m: to_device(s, dev) for m, s in cached.items()}

        def score_fn(index: torch.Tensor) -> TensorDict:
            sub = Tokens({m: t[index.to(t.device)] for m, t in tokens.items()}, tokens.image_size)
            return self.source(model, sub).scores

        return ScorePass(self.cache.fill(batch, cached, valid, score_fn, int(epoch), grids))

    def __call__(self, model: MultiMAE, tokens: Tokens, batch: Mapping[str, Any], epoch: float,
                 generator: torch.Generator, want_scores: bool = False) -> MaskPlan:
        """Masks for the local micro-batch; ``want_scores`` forces a scoring pass (AttG with ``source: scores``)."""
        first = next(iter(tokens.values()))
        B, W, dev = first.shape[0], self.world_size, first.device
        rows = torch.arange(B, device=dev) * W + self.rank     # local rows in the global batch
        sizes = {m: t.shape[1] for m, t in tokens.items()}
        need = self.policy.needs_scores(epoch)
        # A predictor trained on fresh passes gets one every step (warm-up included).
        fresh_lossp = self.trains_predictor and self.cache is None
        scored = self.scores(model, tokens, batch, epoch) if (need or want_scores or fresh_lossp) else None
        scores = None if scored is None else scored.scores
        visible = self.policy.budgets(list(sizes.values()), self.K, B * W, generator, device=dev)
        glob = None
        if need:
            glob = {m: s.new_zeros((B * W,) + tuple(s.shape[1:])).index_copy_(0, rows, s.float())
                    for m, s in scores.items()}
        masks = self.policy(glob, visible, epoch, generator, num_tokens=sizes,
                            progress=self.progress(epoch))
        counted = {m: masks.hidden[m] if masks.thrown is None else masks.hidden[m] & ~masks.thrown[m]
                   for m in masks.hidden}
        denominators = {m: c.any(dim=1).sum() / W for m, c in counted.items()}  # on the device: no sync
        if scores is not None and self.policy.per_head:
            scores = {m: s.mean(dim=1) for m, s in scores.items()}
        plan = MaskPlan(hidden={m: h[rows] for m, h in masks.hidden.items()},
                        thrown=None if masks.thrown is None else {m: t[rows] for m, t in masks.thrown.items()},
                        scores=scores, visible=visible[rows],
                        guided=(masks.guided[rows] if masks.guided is not None
                                else torch.ones(B, dtype=torch.bool, device=dev)),
                        denominators=denominators, num_visible=self.K,
                        kept_range=self.policy.kept_range(sizes, self.K, epoch))
        if self.trains_predictor:
            self._predictor_features(plan, model, tokens, scored, counted, rows, generator)
        return plan

    def training_rows(self, generator: torch.Generator, local_batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Which samples of a cached step get a no-mask pass to train the loss predictor.

        Returns (bool ``[B * W]`` over the global micro-batch, int64 local rows of this process).
        Each sample is picked with probability ``cached_train_share``, drawn on the host from a
        generator seeded by the step generator's seed (the runner seeds one per (seed, step,
        micro-batch)) for the whole global micro-batch, so the choice of a sample is the same
        for 1 and N processes and reading it never waits for the device.
        """
        W = self.world_size
        rng = np.random.default_rng(step_seed(generator.initial_seed(), "loss-predictor-rows"))
        picked = rng.random(local_batch * W) < self.cached_train_share
        local = np.flatnonzero(picked[np.arange(local_batch) * W + self.rank]).astype(np.int64)
        return picked, local

    def _predictor_features(self, plan: MaskPlan, model: MultiMAE, tokens: Tokens,
                            scored: ScorePass | None, counted: TensorDict, rows: torch.Tensor,
                            generator: torch.Generator) -> None:
        """Fill ``plan.features`` / ``feature_rows`` / ``lossp_pairs`` (the rows come from their
        own host generator, so the masks do not depend on them)."""
        B, W = rows.shape[0], self.world_size
        dev = rows.device
        if scored is not None and scored.features is not None:   # a fresh pass over every sample
            pick = torch.ones(B * W, dtype=torch.bool, device=dev)
            plan.features, plan.feature_rows = scored.features, torch.arange(B, device=dev)
        else:
            picked, local = self.training_rows(generator, B)      # host arrays: no device read
            pick = to_device(torch.from_numpy(picked), dev)
            plan.feature_rows = local = to_device(torch.from_numpy(local), dev)
            if local.numel():
                sub = Tokens({m: t[local] for m, t in tokens.items()}, tokens.image_size)
                plan.features = self.source.features(model, sub)
            else:  # no sample this step: an empty batch keeps the head in the graph (DDP)
                plan.features = {m: t.detach()[:0] for m, t in tokens.items()}
        plan.lossp_pairs = count_pairs({m: c & pick[:, None] for m, c in counted.items()}) / W


def token_grids(model: MultiMAE, tokens: Tokens) -> dict[str, tuple[int, int]]:
    """modality -> (h, w) token grid of this batch (every adapter tiles the full image)."""
    H, W = tokens.image_size
    out = {}
    for m in tokens:
        ph, pw = model.input_adapters[m].patch_size_full
        out[m] = (H // ph, W // pw)
    return out
