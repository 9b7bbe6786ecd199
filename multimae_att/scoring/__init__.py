"""Scoring: what the guided masking strategies rank tokens by, and where scores are kept.

- :mod:`.sources`: the score sources (``masking.score_source``): ``attention`` (the readout of one
  encoder layer) and ``predicted_loss`` (a loss-prediction head), one interface;
- :mod:`.readout`: the cheap attention readout of one encoder layer (the scoring pass);
- :mod:`.loss_prediction`: the loss-prediction head and its ranking loss (HPM);
- :mod:`.cache`: the crop-aware attention cache (``masking.cache.*``): per-sample maps on a grid
  over the source image, resampled through each new crop box and flip;
- :mod:`.refresh`: the runner's side of the cache: creation and full-image refresh windows;
- :mod:`.tokencut`: TokenCut maps (offline, ``data_prep/export_attention_maps.py``).

The masks themselves are made in :mod:`multimae_att.masking`. Map of the whole step:
docs/ARCHITECTURE.md.
"""
from multimae_att.scoring.readout import readout_attention
from multimae_att.scoring.sources import (
    SCORE_NORMS,
    SCORE_SOURCES,
    AttentionScores,
    PredictedLossScores,
    ScorePass,
    build_score_source,
    build_scoring,
    head_minmax,
    loss_strengths,
)

__all__ = ["SCORE_SOURCES", "SCORE_NORMS", "ScorePass", "AttentionScores", "PredictedLossScores",
           "head_minmax", "loss_strengths", "build_score_source", "build_scoring", "readout_attention"]
