"""The per-step masking decision the runner calls: budgets, warm-up, per-sample probability.

Config mapping (``masking.*`` -> :class:`MaskingPolicy` keywords, same names):

| config key | keyword | meaning |
|---|---|---|
| ``masking.strategy`` | ``strategy`` | a name in ``STRATEGIES`` (default ``high``) |
| ``masking.params.<p>`` | ``params`` | the strategy's own parameters (unknown ones are errors) |
| ``masking.warmup_epochs`` | ``warmup_epochs`` | E: random masking while ``epoch < E`` |
| ``masking.prob`` | ``prob`` | p: each sample uses the strategy with probability p, else random |
| ``masking.alphas`` | ``alphas`` | Dirichlet concentration (scalar or one per modality) |
| ``masking.sample_tasks_uniformly`` | ``sample_tasks_uniformly`` | MultiMAE's option |
| ``masking.adaptive.*`` | ``adaptive`` | dict of :class:`AdaptiveAlpha` keywords, None = off |

Typical step::

    v = policy.budgets(num_tokens, K, B, generator)          # [B, M]
    scores = model.attention_scores(...) if policy.needs_scores(epoch) else None
    masks = policy(scores, v, epoch, generator, num_tokens=dict_of_N)
    ...; policy.update_losses({"rgb": l_rgb, ...})           # only matters with adaptive alpha
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from multimae_att.masking.budgets import AdaptiveAlpha, sample_budgets
from multimae_att.masking.strategies import Masks, check_params, draw, get_strategy, make_masks

__all__ = ["MaskingPolicy", "build_masker"]


class MaskingPolicy:
    """Strategy + switches + budget sampler, one object per run (see the module docstring)."""

    def __init__(self, strategy: str = "high", params: Mapping[str, Any] | None = None,
                 warmup_epochs: float = 0, prob: float = 1.0,
                 alphas: float | Sequence[float] = 1.0, sample_tasks_uniformly: bool = False,
                 adaptive: Mapping[str, Any] | None = None,
                 modalities: Sequence[str] | None = None) -> None:
        self.strategy = get_strategy(strategy)
        self.params = check_params(strategy, dict(params or {}))
        if not 0.0 <= float(prob) <= 1.0:
            raise ValueError(f"masking.prob={prob} must lie in [0, 1]")
        if warmup_epochs < 0:
            raise ValueError(f"masking.warmup_epochs={warmup_epochs} must be >= 0")
        self.warmup_epochs, self.prob = warmup_epochs, float(prob)
        self.alphas, self.sample_tasks_uniformly = alphas, bool(sample_tasks_uniformly)
        self.adaptive: AdaptiveAlpha | None = None
        if adaptive is not None:
            adaptive = dict(adaptive)
            if not adaptive.pop("enabled", True):
                adaptive = None
        if adaptive is not None:
            if modalities is None:
                raise ValueError("masking.adaptive needs the list of input modalities")
            allowed = {"momentum", "strength", "min_alpha", "max_alpha", "relative_to_initial"}
            unknown = sorted(set(adaptive) - allowed)
            if unknown:
                raise ValueError(f"unknown key masking.adaptive.{unknown[0]}; valid: "
                                 f"{sorted(allowed | {'enabled'})}")
            self.adaptive = AdaptiveAlpha(modalities, base=alphas, **adaptive)

    @property
    def per_head(self) -> bool:
        """True if the strategy wants per-head scores ``[B, H, N_m]``."""
        return self.strategy.per_head

    @property
    def uses_progress(self) -> bool:
        """True if the strategy follows the run's progress (a curriculum such as ``hpm``)."""
        return self.strategy.uses_progress

    def guided_now(self, epoch: float) -> bool:
        """True if the attention-guided strategy is active at this epoch (warm-up over, p > 0)."""
        return (self.strategy.name != "random" and epoch >= self.warmup_epochs
                and self.prob > 0.0)

    def needs_scores(self, epoch: float) -> bool:
        """Whether the runner must run the scoring pass this step (random steps skip it)."""
        return self.guided_now(epoch) and self.strategy.needs_scores

    def current_alphas(self) -> Any:
        """The Dirichlet concentrations in use now (adaptive ones if enabled)."""
        return self.adaptive.alphas if self.adaptive is not None else self.alphas

    def budgets(self, num_tokens: Sequence[int], K: int, batch_size: int,
                generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> Tensor:
        """Visible counts int64 ``[B, M]`` (exactly K per sample), see :func:`sample_budgets`."""
        return sample_budgets(num_tokens, K, batch_size, self.current_alphas(), generator,
                              sample_tasks_uniformly=self.sample_tasks_uniformly, device=device)

    def kept_range(self, num_tokens: Mapping[str, int], K: int, epoch: float) -> dict[str, tuple[int, int]]:
        """modality -> (fewest, most) tokens a sample keeps (visible or hidden, i.e. not thrown) at
        this epoch with ``K`` visible per sample, from the configuration alone (no mask is read).
        Random masks throw nothing (``N_m``); with ``prob < 1`` some samples are random. The
        decoders and the losses size their tensors by it (equal ends: no padding)."""
        out = {}
        total = sum(int(n) for n in num_tokens.values())
        for m, n in num_tokens.items():
            n = int(n)
            if self.strategy.thrown_range is None or not self.guided_now(epoch):
                out[m] = (n, n)
                continue
            # Visible in this modality: at most K, at least what the others cannot hold.
            v_min, v_max = max(0, int(K) - (total - n)), min(int(K), n)
            lo, hi = (max(0, min(n, int(x))) for x in self.strategy.thrown_range(n, v_min, v_max, self.params))
            out[m] = (n - hi, n if self.prob < 1.0 else n - lo)
        return out

    def update_losses(self, losses: Mapping[str, float | Tensor]) -> None:
        """Feed per-modality losses to adaptive alpha (no-op when it is off)."""
        if self.adaptive is not None:
            self.adaptive.update(losses)

    def __call__(self, scores: Mapping[str, Tensor] | None, visible: Tensor, epoch: float,
                 generator: torch.Generator | None = None,
                 num_tokens: Mapping[str, int] | None = None,
                 progress: float | None = None) -> Masks:
        """Masks for one step; ``.guided`` [B] says which samples used the strategy.

        ``scores``: dict modality -> ``[B, N_m]`` (``[B, H, N_m]`` if :attr:`per_head`), or None
        when :meth:`needs_scores` is False — then ``num_tokens`` (modality -> N_m, in order)
        gives the shapes. ``visible``: int ``[B, M]``. ``progress``: position in the run in
        [0, 1], needed by curriculum strategies (:attr:`uses_progress`, e.g. ``hpm``).
        """
        B = visible.shape[0]
        dev = visible.device
        if not self.guided_now(epoch):
            return self._random(scores, visible, generator, num_tokens, guided=False)
        if self.strategy.needs_scores and scores is None:
            raise ValueError(f"masking strategy {self.strategy.name!r} needs attention scores "
                             f"at epoch {epoch} (check needs_scores() before the step)")
        if self.prob >= 1.0:
            guided = torch.ones(B, dtype=torch.bool, device=dev)
        else:
            guided = draw("uniform", (B,), dev, generator) < self.prob
        if scores is None:  # score-free strategy: only shapes matter
            scores = self._dummy(num_tokens, B, dev)
        out = make_masks(self.strategy.name, scores, visible, generator, progress=progress,
                         **self.params)
        if self.prob >= 1.0:
            return Masks(out.hidden, out.thrown, guided)
        rnd = self._random(scores, visible, generator, num_tokens, guided=False)
        g = guided[:, None]
        hidden = {m: torch.where(g, out.hidden[m], rnd.hidden[m]) for m in out.hidden}
        thrown = None if out.thrown is None else {m: out.thrown[m] & g for m in out.thrown}
        return Masks(hidden, thrown, guided)

    @staticmethod
    def _dummy(num_tokens: Mapping[str, int] | None, B: int, dev: torch.device) -> dict:
        if num_tokens is None:
            raise ValueError("without scores the masking policy needs num_tokens "
                             "(dict modality -> N_m)")
        return {m: torch.zeros(B, int(n), device=dev) for m, n in num_tokens.items()}

    def _random(self, scores, visible, generator, num_tokens, guided: bool) -> Masks:
        B = visible.shape[0]
        if scores is None:
            shapes = self._dummy(num_tokens, B, visible.device)
        else:  # per-head scores: only the last dim (N_m) matters for random masking
            shapes = {m: s.new_zeros(B, s.shape[-1]) for m, s in scores.items()}
        out = make_masks("random", shapes, visible, generator)
        return Masks(out.hidden, None,
                     torch.full((B,), guided, dtype=torch.bool, device=visible.device))

    def state_dict(self) -> dict:
        """Resumable state (only adaptive alpha has any)."""
        return {"adaptive": None if self.adaptive is None else self.adaptive.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        if (state.get("adaptive") is None) != (self.adaptive is None):
            raise ValueError("masking policy state and config disagree on masking.adaptive")
        if self.adaptive is not None:
            self.adaptive.load_state_dict(state["adaptive"])


_POLICY_KEYS = ("strategy", "params", "warmup_epochs", "prob", "alphas",
                "sample_tasks_uniformly", "adaptive")


def build_masker(cfg: Mapping[str, Any], modalities: Sequence[str] | None = None) -> MaskingPolicy:
    """:class:`MaskingPolicy` from the ``masking`` config section as a mapping.

    Keys: ``strategy``, ``params``, ``warmup_epochs``, ``prob``, ``alphas``,
    ``sample_tasks_uniformly``, ``adaptive`` (None or a mapping; ``enabled: false`` turns it
    off). Unknown keys raise ValueError naming them.
    """
    unknown = sorted(set(cfg) - set(_POLICY_KEYS))
    if unknown:
        raise ValueError(f"unknown key masking.{unknown[0]}; valid: {list(_POLICY_KEYS)}")
    return MaskingPolicy(**dict(cfg), modalities=modalities)
