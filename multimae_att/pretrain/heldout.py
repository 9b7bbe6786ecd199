"""Held-out check of the loss predictor: ``lossp/spearman`` in each ``metrics.jsonl`` record.

With ``masking.score_source=predicted_loss`` and ``log.heldout_split`` set, every record (each
``log.every`` steps) measures how well the loss predictor orders the per-patch reconstruction
losses of images it never trained on: the first ``log.heldout_samples`` images of that split of
``data.root``, loaded once as whole images with deterministic transforms (the loader of the
attention cache's refresh, :func:`multimae_att.pretrain.setup.build_whole_image_loader`) and
kept on the device. At each record, with the model in eval mode and no grad:

1. the score source's no-mask pass -> the predictor's scores (its order),
2. masks from a generator seeded by a fixed seed (the same masks at every record, so records
   compare): MultiMAE's random strategy (:meth:`~multimae_att.model.MultiMAE.random_masks`) with
   the run's budgets (``masking.num_encoded_tokens``,
   the configured ``masking.alphas``, not adaptive ones, ``masking.sample_tasks_uniformly``),
3. the masked pass -> per-patch losses of the hidden tokens, summed as the head's training
   targets (:func:`multimae_att.scoring.loss_prediction.loss_targets`),
4. :func:`multimae_att.scoring.loss_prediction.spearman` between 1 and 3 over the hidden tokens
   (mean over images and modalities).

It changes nothing in training: its own generator (no global RNG draw), its own loader (the
training loader's order is untouched), train mode restored. It runs once per record, on the main
process only (:meth:`multimae_att.pretrain.loop.PretrainJob.log_checks`; every process would
measure the same images and weights, so the value is the one-process value), after the record's
``step_time`` is taken: its own seconds are logged as ``time/heldout_s``. The figure of the
training batch (predicted before the head trained on it, but on images seen in earlier epochs)
is ``lossp/spearman_train``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from multimae_att.pretrain.losses import LossSpec, multimodal_loss
from multimae_att.scoring.loss_prediction import loss_targets, spearman
from multimae_att.seeds import step_seed

__all__ = ["HeldoutRanking", "build_heldout_ranking"]

TensorDict = dict[str, Tensor]


class HeldoutRanking:
    """``check(model) -> float32 scalar`` (on the device): held-out Spearman of ``source``.

    ``inputs``: model inputs (:func:`multimae_att.pretrain.step.model_inputs`) of each held-out
    batch; ``source``: the run's score source (a
    :class:`~multimae_att.scoring.sources.PredictedLossScores`); ``K``, ``alphas``,
    ``sample_tasks_uniformly``: the run's budgets; ``loss_weights``, ``specs``: the run's losses;
    ``seed``: the run's seed (the masks' generator is seeded by it and the batch index only);
    ``autocast``: the training precision's context (the scoring pass runs under it in training).
    """

    def __init__(self, inputs: list[TensorDict], source: Any, K: int, alphas: Any,
                 sample_tasks_uniformly: bool, loss_weights: Mapping[str, float],
                 specs: Mapping[str, LossSpec] | None, seed: int, fp32_output_adapters: tuple[str, ...] = (),
                 autocast: Callable[[], Any] = nullcontext) -> None:
        if not inputs:
            raise ValueError("the held-out check needs at least one batch")
        self.inputs, self.source, self.K = inputs, source, int(K)
        self.alphas, self.sample_tasks_uniformly = alphas, bool(sample_tasks_uniformly)
        self.loss_weights, self.specs, self.seed = dict(loss_weights), specs, seed
        self.fp32_output_adapters, self.autocast = tuple(fp32_output_adapters), autocast

    @property
    def samples(self) -> int:
        return sum(next(iter(x.values())).shape[0] for x in self.inputs)

    def __call__(self, model: Any) -> Tensor:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.autocast():
                parts = [self._batch(model, x, i) for i, x in enumerate(self.inputs)]
        finally:
            model.train(was_training)
        scores, targets, hidden = ({m: torch.cat([p[j][m] for p in parts]) for m in parts[0][j]}
                                   for j in range(3))
        return spearman(scores, targets, hidden)

    def _batch(self, model: Any, x: TensorDict, index: int) -> tuple[TensorDict, TensorDict, TensorDict]:
        """(scores, per-patch loss targets, hidden) of one held-out batch, modality -> ``[B, N_m]``."""
        tokens = model.embed(x)
        scores = self.source(model, tokens).scores
        sizes = {m: t.shape[1] for m, t in tokens.items()}
        gen = torch.Generator(device=next(iter(tokens.values())).device)
        gen.manual_seed(step_seed(self.seed, index, "heldout-masks"))
        hidden = model.random_masks(tokens, self.K, self.alphas, self.sample_tasks_uniformly, gen)
        preds = model.forward_masked(tokens, hidden, None, num_visible=self.K,
                                     kept_range={m: (n, n) for m, n in sizes.items()},
                                     fp32_output_adapters=self.fp32_output_adapters)
        patches: TensorDict = {}
        multimodal_loss(preds, x, hidden, None, self.loss_weights, self.specs, patch_losses=patches)
        targets = loss_targets(patches, self.loss_weights, list(hidden))
        return ({m: scores[m].float() for m in targets}, targets, {m: hidden[m] for m in targets})


def build_heldout_ranking(cfg: Any, source: Any, specs: Mapping[str, LossSpec] | None,
                          device: torch.device, autocast: Callable[[], Any] = nullcontext
                          ) -> HeldoutRanking | None:
    """The check of a run (``cfg``: a :class:`~multimae_att.pretrain.config.PretrainConfig`), or
    None when it is off (``log.heldout_split`` null or ``masking.score_source`` not
    ``predicted_loss``). Loads the first ``log.heldout_samples`` images of ``log.heldout_split``
    (the same ones in every process) onto ``device``."""
    from multimae_att.config import ConfigError
    from multimae_att.pretrain.setup import build_whole_image_loader
    from multimae_att.pretrain.step import model_inputs

    split, wanted = cfg.log.heldout_split, cfg.log.heldout_samples
    if split is None or cfg.masking.score_source != "predicted_loss":
        return None
    loader = build_whole_image_loader(cfg, split, what="loss predictor's held-out check",
                                      key="log.heldout_split")
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(0)
    mods, inputs, n = list(cfg.model.in_modalities), [], 0
    for batch in loader:
        take = min(wanted - n, len(batch[mods[0]]))
        batch = {k: v[:take] if torch.is_tensor(v) else v for k, v in batch.items()}
        inputs.append(model_inputs(batch, mods, cfg.data.standardize_depth, device))
        n += take
        if n >= wanted:
            break
    if not inputs:
        raise ConfigError(f"log.heldout_split={split!r} of data.root={cfg.data.root!r} has no images")
    m = cfg.masking
    return HeldoutRanking(inputs, source, m.num_encoded_tokens, m.alphas, m.sample_tasks_uniformly,
                          cfg.loss.weights, specs, cfg.train.seed, tuple(cfg.train.fp32_output_adapters),
                          autocast)
