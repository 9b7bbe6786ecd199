"""Score sources: what the guided masking strategies rank tokens by (``masking.score_source``).

Every guided strategy (``high``, ``low``, ``noisy``, ``hint``, ``amt``, ``hpm``, ...) reads one
score per token, higher = "hide first". A score source turns the tokens of a step (or raw
inputs) into those scores with one no-grad pass over all tokens:

- ``attention`` (:class:`AttentionScores`): the global token's attention row at a readout layer
  (:meth:`MultiMAE.attention_scores`), averaged over heads; with ``masking.score_norm:
  head_minmax`` each head's row is first min-max normalised to [0, 1] over the patch tokens of
  all modalities, as AMT's code does before averaging the heads (raw averaging lets the heads
  with peaked rows dominate). Costs less than a plain forward (the readout block is cut short).
- ``predicted_loss`` (:class:`PredictedLossScores`): a loss-prediction head
  (:class:`~multimae_att.scoring.loss_prediction.LossPredictor`) on the last-layer features of the
  no-mask pass (the full last block runs: the cost of a plain inference forward). The head's raw
  outputs only order tokens (a pairwise ranking loss trains them), so the scores are their
  softmax over each modality's tokens: non-negative like attention probabilities, and
  ``exp(pred)`` is the "strength" of the Bradley-Terry model the ranking loss fits, which AMT's
  weighted draw then uses as weights. Rank-based strategies see the raw order unchanged. The
  features are returned too: the step trains the head on them after the masked pass.

Both return a :class:`ScorePass`. The pretraining planner (:mod:`multimae_att.pretrain.step`),
the attention cache's full-image refresh and the benchmark call sources only through this
interface (``source(model, tokens_or_inputs, per_head=False)``).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["SCORE_SOURCES", "SCORE_NORMS", "ScorePass", "AttentionScores", "PredictedLossScores",
           "head_minmax", "loss_strengths", "build_score_source", "build_scoring"]

SCORE_SOURCES = ("attention", "predicted_loss")
SCORE_NORMS = ("none", "head_minmax")

TensorDict = dict[str, Tensor]


@dataclass
class ScorePass:
    """What a source returns. ``scores``: modality -> float32 ``[B, N_m]`` (``[B, H, N_m]`` for
    per-head requests); ``features``: modality -> ``[B, N_m, D]`` detached last-layer features of
    the no-mask pass (``predicted_loss`` only, else None)."""

    scores: TensorDict
    features: TensorDict | None = None


def head_minmax(per_head: Mapping[str, Tensor]) -> TensorDict:
    """AMT's per-head normalisation: each head's row ``[B, H, N]`` (all modalities' tokens
    together, as one attention row) min-max scaled to [0, 1] (a constant row becomes 0).
    Returns modality -> ``[B, H, N_m]``."""
    mods = list(per_head)
    row = torch.cat([per_head[m].float() for m in mods], dim=-1)
    lo = row.amin(dim=-1, keepdim=True)
    span = row.amax(dim=-1, keepdim=True) - lo
    row = torch.where(span > 0, (row - lo) / span.clamp_min(1e-30), torch.zeros_like(row))
    return dict(zip(mods, row.split([per_head[m].shape[-1] for m in mods], dim=-1)))


def loss_strengths(pred: Mapping[str, Tensor]) -> TensorDict:
    """Predicted-loss scores: softmax of the head's outputs over each modality's tokens."""
    return {m: p.float().softmax(dim=-1) for m, p in pred.items()}


class AttentionScores:
    """``attention`` source: readout ``layer`` and ``query`` as :meth:`MultiMAE.attention_scores`,
    ``norm`` in :data:`SCORE_NORMS`."""

    name = "attention"

    def __init__(self, layer: int = -1, query: str = "global", norm: str = "none") -> None:
        if norm not in SCORE_NORMS:
            raise ValueError(f"masking.score_norm must be one of {SCORE_NORMS}, got {norm!r}")
        self.layer, self.query, self.norm = layer, query, norm

    def __call__(self, model: Any, x: Mapping[str, Tensor], per_head: bool = False) -> ScorePass:
        kw = dict(layer=self.layer, query=self.query)
        if self.norm == "none":
            return ScorePass(model.attention_scores(x, per_head=per_head, **kw))
        scores = head_minmax(model.attention_scores(x, per_head=True, **kw))
        return ScorePass(scores if per_head else {m: s.mean(dim=1) for m, s in scores.items()})


class PredictedLossScores:
    """``predicted_loss`` source over a :class:`~multimae_att.scoring.loss_prediction.LossPredictor`."""

    name = "predicted_loss"

    def __init__(self, predictor: torch.nn.Module) -> None:
        self.predictor = predictor

    def features(self, model: Any, x: Mapping[str, Tensor]) -> TensorDict:
        """The no-mask pass alone (what training the head reads)."""
        return model.encoder_features(x)

    def __call__(self, model: Any, x: Mapping[str, Tensor], per_head: bool = False) -> ScorePass:
        if per_head:
            raise ValueError("masking.score_source=predicted_loss has no attention heads; per-head "
                             "strategies (e.g. 'heads') need masking.score_source=attention")
        feats = self.features(model, x)
        with torch.no_grad():
            pred = self.predictor(feats)
        return ScorePass(loss_strengths(pred), feats)


def build_score_source(kind: str, *, layer: int = -1, query: str = "global", norm: str = "none",
                       predictor: torch.nn.Module | None = None):
    """The source named ``kind`` (``masking.score_source``); ``predicted_loss`` needs ``predictor``
    and takes no ``norm`` (it has no heads)."""
    if kind == "attention":
        return AttentionScores(layer, query, norm)
    if kind == "predicted_loss":
        if predictor is None:
            raise ValueError("masking.score_source=predicted_loss needs a loss predictor")
        if norm != "none":
            raise ValueError(f"masking.score_norm={norm!r} normalises attention heads; "
                             "masking.score_source=predicted_loss has none (use 'none')")
        return PredictedLossScores(predictor)
    raise ValueError(f"masking.score_source must be one of {SCORE_SOURCES}, got {kind!r}")


def build_scoring(masking: Any, modalities: list[str], dim: int):
    """``(source, loss_predictor or None)`` from the ``masking`` config section
    (``score_source``, ``score_norm``, ``score_layer``, ``score_query``, ``loss_predictor.hidden``)
    for a model of width ``dim`` with input ``modalities``."""
    from multimae_att.scoring.loss_prediction import LossPredictor

    predictor = None
    if masking.score_source == "predicted_loss":
        predictor = LossPredictor(modalities, dim, masking.loss_predictor.hidden)
    source = build_score_source(masking.score_source, layer=masking.score_layer, query=masking.score_query,
                                norm=masking.score_norm, predictor=predictor)
    return source, predictor
