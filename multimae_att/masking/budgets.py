"""Per-sample visible-token budgets over the input modalities.

Based on MultiMAE's Dirichlet budgets (Bachmann et al., 2022): every sample draws shares
``s ~ Dirichlet(alpha)`` over the M input modalities and keeps ``K`` visible tokens in total.
Unlike upstream (which rounds ``s * K`` and can miss ``K`` or exceed a modality's token count),
the integers here sum to exactly ``K`` per sample and never exceed ``N_m``:

1. continuous targets by water-filling: ``t_m = s_m * R / sum(s_free)`` over the modalities that
   are not yet full, ``R`` the budget left; a modality whose target reaches ``N_m`` is pinned at
   ``N_m`` and the rest is shared again (at most M rounds);
2. integers by largest remainder: ``floor(t)``, then +1 to the modalities with the largest
   fractional parts (ties: lower modality index first) until the sum is ``K``.

The adaptive-alpha controller (:class:`AdaptiveAlpha`, new in this project) lives here too.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from multimae_att.device_checks import check, to_device

__all__ = ["sample_budgets", "sample_shares", "shares_to_counts", "expected_shares",
           "AdaptiveAlpha"]


def _as_alpha(alphas: float | Sequence[float] | Tensor, num_modalities: int) -> Tensor:
    """Concentrations as a float64 CPU tensor ``[M]``; a scalar is shared by all modalities."""
    a = torch.as_tensor(alphas, dtype=torch.float64).detach().cpu()
    if a.ndim == 0:
        a = a.expand(num_modalities).clone()
    if a.shape != (num_modalities,):
        raise ValueError(f"alphas must be a scalar or have one entry per modality "
                         f"({num_modalities}), got shape {tuple(a.shape)}")
    if not all(math.isfinite(x) and x > 0 for x in a.tolist()):  # host values: plain Python
        raise ValueError(f"alphas must be finite and > 0, got {a.tolist()}")
    return a


def sample_shares(batch_size: int, alphas: float | Sequence[float] | Tensor, num_modalities: int,
                  sample_tasks_uniformly: bool = False, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> Tensor:
    """Dirichlet shares per sample, float64 ``[B, M]``, rows summing to 1.

    Sampled as normalised Gamma(alpha_m, 1) variables (the standard Dirichlet construction) so
    the given ``generator`` drives it. With ``sample_tasks_uniformly`` (MultiMAE's option) each
    sample first draws a non-empty subset of modalities uniformly among the ``2**M - 1`` subsets
    and the Dirichlet is taken over that subset only (the others get share exactly 0; upstream
    adds 1e-5 to their alpha instead, which gives them a tiny, almost always zero, share).
    """
    # Draw on the generator's device (a CPU generator may drive CUDA budgets), return on `device`.
    out_dev = torch.device(device) if device is not None else (
        generator.device if generator is not None else torch.device("cpu"))
    dev = generator.device if generator is not None else out_dev
    alpha = to_device(_as_alpha(alphas, num_modalities), dev)
    # torch.distributions.Dirichlet takes no generator; normalised Gamma(alpha, 1) draws are the
    # same distribution, and the (private but long-stable) _standard_gamma op does take one.
    gam = torch._standard_gamma(alpha.expand(batch_size, num_modalities).contiguous(),
                                generator=generator)
    chosen = torch.ones_like(gam, dtype=torch.bool)
    if sample_tasks_uniformly:
        code = torch.randint(1, 2 ** num_modalities, (batch_size, 1), device=dev,
                             generator=generator)
        chosen = (code & (2 ** torch.arange(num_modalities, device=dev))) > 0
        gam = gam * chosen
    total = gam.sum(-1, keepdim=True)
    # Tiny alphas can underflow every Gamma draw to 0; fall back to equal shares of the
    # chosen modalities rather than dividing by zero.
    fallback = chosen.to(gam.dtype) / chosen.sum(-1, keepdim=True).clamp_min(1)
    return torch.where(total > 0, gam / total.clamp_min(1e-300), fallback).to(out_dev)


def shares_to_counts(shares: Tensor, num_tokens: Sequence[int] | Tensor, K: int) -> Tensor:
    """Integer visible counts int64 ``[B, M]`` with ``sum_m = K`` and ``0 <= v_m <= N_m``.

    ``shares`` is ``[B, M]`` (non-negative rows, any positive sum). Water-filling then largest
    remainder, as in the module docstring. Raises if ``K`` is outside ``[0, sum N_m]``.
    """
    B, M = shares.shape
    n = torch.as_tensor(num_tokens, dtype=torch.float64)  # where given (a list: CPU)
    total_n = int(sum(n.tolist()))  # read before the move: no host sync when shares live on a GPU
    n = to_device(n, shares.device)
    if not 0 <= K <= total_n:
        raise ValueError(f"K={K} visible tokens is outside [0, {total_n}] (sum of num_tokens)")
    s = shares.to(torch.float64).clamp_min(0)
    full = (n == 0).expand(B, M).clone()  # modalities that cannot take more tokens
    t = torch.zeros(B, M, dtype=torch.float64, device=shares.device)
    for _ in range(M + 1):  # each round pins at least one modality or stops changing
        left = K - torch.where(full, n, torch.zeros_like(t)).sum(-1, keepdim=True)
        w = torch.where(full, torch.zeros_like(s), s)
        # No share left on the free modalities (e.g. a subset drawn by sample_tasks_uniformly
        # saturated): spread what is left in proportion to their capacity.
        w = torch.where(w.sum(-1, keepdim=True) > 0, w, torch.where(full, 0.0, n.expand(B, M)))
        t = torch.where(full, n, w / w.sum(-1, keepdim=True).clamp_min(1e-300) * left)
        full = full | (t >= n)
    t = torch.minimum(t, n)
    v = torch.floor(t + 1e-9).clamp(min=torch.zeros_like(n), max=n)
    left = K - v.sum(-1, keepdim=True)  # small: < M up to rounding
    frac = torch.where(v < n, t - v, torch.full_like(t, -1.0))
    # Rank the fractional parts (descending, stable -> lower modality index wins ties).
    order = torch.sort(frac, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(M, device=order.device)
                                            .expand(B, M).contiguous())
    v = v + ((rank < left) & (v < n)).to(v.dtype)
    v = v.to(torch.int64)
    # Cannot fail unless shares are not finite; no host sync on a GPU.
    check(v.sum(-1) == K, f"budget rounding failed to reach K={K}", RuntimeError, lambda: str(v.sum(-1).tolist()))
    return v


def sample_budgets(num_tokens: Sequence[int], K: int, batch_size: int,
                   alphas: float | Sequence[float] | Tensor = 1.0,
                   generator: torch.Generator | None = None, *,
                   sample_tasks_uniformly: bool = False,
                   device: torch.device | str | None = None) -> Tensor:
    """Visible-token counts per sample and modality, int64 ``[B, M]``.

    Args:
        num_tokens: ``N_m`` per input modality (the modality order of the result).
        K: visible tokens per sample (MultiMAE's ``num_encoded_tokens``), ``0 <= K <= sum N_m``.
        batch_size: B.
        alphas: Dirichlet concentration, a scalar or one value per modality (asymmetric).
        generator: drives every random draw; results live on its device unless ``device`` is set.
        sample_tasks_uniformly: MultiMAE's option, see :func:`sample_shares`.
    Returns:
        ``v`` with ``v.sum(1) == K`` and ``0 <= v[:, m] <= N_m`` for every sample.
    """
    shares = sample_shares(batch_size, alphas, len(num_tokens), sample_tasks_uniformly,
                           generator, device)
    return shares_to_counts(shares, num_tokens, K)


class AdaptiveAlpha:
    """Dirichlet concentrations driven by per-modality losses (new in this project).

    Update rule, called once per step with the per-modality reconstruction losses ``l_m``::

        L_m   <- l_m                                 (first update)
        L_m   <- momentum * L_m + (1 - momentum) * l_m   (later updates; EMA)
        r_m    = L_m / mean_j L_j                   (relative difficulty, 1 = average)
        alpha_m = clamp(base_m * r_m ** (-strength), min_alpha, max_alpha)

    A modality whose loss is above average gets a smaller alpha, hence a smaller expected share
    ``alpha_m / sum_j alpha_j`` of the visible tokens, hence MORE hidden tokens to reconstruct.
    ``strength = 0`` gives the fixed ``base`` alphas. Losses of different modalities live on
    different scales (MSE vs. cross-entropy); with ``relative_to_initial=True`` (the default)
    each EMA is divided by its own first value before comparing, so "harder" means "improving
    more slowly"; ``False`` compares the raw losses (only meaningful on one scale).

    Config keys (``masking.adaptive.*``): ``enabled`` (runner side), ``momentum``, ``strength``,
    ``min_alpha``, ``max_alpha``, ``relative_to_initial``; ``base`` comes from ``masking.alphas``.
    """

    def __init__(self, modalities: Sequence[str], base: float | Sequence[float] = 1.0,
                 momentum: float = 0.99, strength: float = 1.0, min_alpha: float = 0.1,
                 max_alpha: float = 10.0, relative_to_initial: bool = True) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"adaptive momentum must be in [0, 1), got {momentum}")
        if strength < 0:
            raise ValueError(f"adaptive strength must be >= 0, got {strength}")
        if not 0 < min_alpha <= max_alpha:
            raise ValueError(f"need 0 < min_alpha <= max_alpha, got {min_alpha}, {max_alpha}")
        self.modalities = list(modalities)
        self.base = _as_alpha(base, len(self.modalities))
        self.momentum, self.strength = float(momentum), float(strength)
        self.min_alpha, self.max_alpha = float(min_alpha), float(max_alpha)
        self.relative_to_initial = bool(relative_to_initial)
        self.ema: Tensor | None = None      # float64 [M]
        self.initial: Tensor | None = None  # float64 [M], first losses seen
        self.steps = 0

    def update(self, losses: Mapping[str, float | Tensor]) -> Tensor:
        """Feed this step's per-modality losses (all modalities, scalars); returns the alphas."""
        missing = [m for m in self.modalities if m not in losses]
        if missing:
            raise KeyError(f"adaptive alpha needs a loss for every modality; missing {missing}")
        x = torch.tensor([float(losses[m]) for m in self.modalities], dtype=torch.float64)
        if not bool(torch.isfinite(x).all()):
            return self.alphas  # skip non-finite steps instead of poisoning the EMA
        if self.ema is None:
            self.ema, self.initial = x.clone(), x.clamp_min(1e-12)
        else:
            self.ema = self.momentum * self.ema + (1.0 - self.momentum) * x
        self.steps += 1
        return self.alphas

    @property
    def alphas(self) -> Tensor:
        """Current concentrations, float64 ``[M]`` (``base`` before the first update)."""
        if self.ema is None:
            return self.base.clone()
        d = self.ema / self.initial if self.relative_to_initial else self.ema
        d = d.clamp_min(1e-12)
        r = d / d.mean()
        return (self.base * r.pow(-self.strength)).clamp(self.min_alpha, self.max_alpha)

    def state_dict(self) -> dict:
        """Everything needed for an exact resume (plain tensors and numbers)."""
        return {"modalities": list(self.modalities), "ema": self.ema, "initial": self.initial,
                "steps": self.steps}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`; the modality list must match."""
        if list(state["modalities"]) != self.modalities:
            raise ValueError(f"adaptive alpha state is for modalities {state['modalities']}, "
                             f"not {self.modalities}")
        self.ema = None if state["ema"] is None else torch.as_tensor(state["ema"],
                                                                     dtype=torch.float64)
        self.initial = None if state["initial"] is None else torch.as_tensor(
            state["initial"], dtype=torch.float64)
        self.steps = int(state["steps"])


def expected_shares(alphas: float | Sequence[float] | Tensor, num_modalities: int) -> Tensor:
    """Mean Dirichlet share per modality, ``alpha_m / sum alpha`` (float64 ``[M]``)."""
    a = _as_alpha(alphas, num_modalities)
    return a / a.sum()

