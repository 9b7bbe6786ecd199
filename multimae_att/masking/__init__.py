"""Token masking: Dirichlet budgets over modalities and attention-guided strategies.

Public API (docs/INTERFACES.md):

- :func:`sample_budgets` -> int64 ``[B, M]`` visible counts, exactly ``K`` per sample;
- :data:`STRATEGIES`, :func:`make_masks` -> :class:`Masks` (``.hidden``, ``.thrown``; 1 = hidden);
- :func:`validate` checks the mask invariants;
- :class:`AdaptiveAlpha` (loss-driven Dirichlet concentrations);
- :class:`MaskingPolicy` / :func:`build_masker`: what the runner calls each step (warm-up,
  per-sample probability, budgets, adaptive alpha, whether a scoring pass is needed).

The pretraining step's :class:`~multimae_att.masking.planner.MaskPlanner` (scores ->
budgets -> masks for one micro-batch) is in :mod:`multimae_att.masking.planner`,
imported on its own (it needs the model).
"""
from multimae_att.masking import guided as _guided  # noqa: F401  (registers the strategies)
from multimae_att.masking import hpm as _hpm  # noqa: F401  (registers 'hpm')
from multimae_att.masking.budgets import AdaptiveAlpha, expected_shares, sample_budgets, sample_shares, shares_to_counts
from multimae_att.masking.policy import MaskingPolicy, build_masker
from multimae_att.masking.strategies import (
    STRATEGIES,
    Masks,
    Strategy,
    check_params,
    get_strategy,
    make_masks,
    register_strategy,
    validate,
)

__all__ = ["sample_budgets", "sample_shares", "shares_to_counts", "expected_shares",
           "AdaptiveAlpha", "STRATEGIES", "Masks", "Strategy", "register_strategy",
           "get_strategy", "check_params", "make_masks", "validate", "MaskingPolicy", "build_masker"]
