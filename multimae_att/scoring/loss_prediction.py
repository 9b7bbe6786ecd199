"""Loss prediction: a small head per input modality that ranks tokens by reconstruction loss.

Based on Hard Patches Mining (HPM; Wang et al., CVPR 2023), which trains a predictor of the
per-patch reconstruction loss with a pairwise ranking loss and hides the patches predicted
hardest. Here (the ``predicted_loss`` score source, ``masking.score_source``):

- **Input**: the encoder's last-layer features of the no-mask scoring pass
  (:meth:`MultiMAE.encoder_features`), detached. **Output**: one value per token.
- **Training**, in the same step, after the masked pass: on the hidden, counted tokens (hidden and
  not thrown) of each sample and modality, against their per-patch reconstruction losses
  (detached; :func:`loss_targets`), with :func:`ranking_loss` weighted by
  ``loss.loss_prediction_weight``. The head sees the same features in training and in use, and
  the encoder gets no gradient from it.
- **HPM instead** runs its predictor as a twin of the decoder on the *masked* pass (visible
  tokens plus mask tokens), so the ranking objective also trains the encoder (its paper reports
  that objective alone helps), and uses an EMA copy of the model over the full image to predict.
  The twin would cost one more decoder per modality in every step and the EMA copy a second
  model; the head here costs a LayerNorm and a 32-wide MLP per token on top of the scoring pass.

Why a ranking loss: per-patch losses differ in scale between images and modalities and drift
during training; only their order within a sample and modality is used (by the strategies) and
learned (by the BCE on the order of each pair, HPM's "relative" loss).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multimae_att.pretrain.losses import input_modality_of

__all__ = ["LossPredictor", "loss_targets", "ranking_loss", "count_pairs", "spearman"]

TensorDict = dict[str, Tensor]


class LossPredictor(nn.Module):
    """One head per input modality: ``LayerNorm(D) -> Linear(D, hidden) -> GELU ->
    Linear(hidden, 1)`` (default ``hidden = 32``), or ``LayerNorm(D) -> Linear(D, 1)`` with
    ``hidden = 0`` (D weights per modality).

    Why 32: fitted on the same frozen no-mask features of the tiny demo model (96-d), the
    held-out Spearman of the predicted order was 0.69 (linear), 0.76 (16), 0.77 (32), 0.78 (64
    and 128): 32 gets nearly all of the gain at a cost that is negligible next to the no-mask
    pass it reads (``D x 32`` multiply-adds per token, against ~``12 D^2`` per block).

    ``forward(features)``: dict modality -> ``[B, N_m, D]`` -> dict modality -> float32
    ``[B, N_m]`` (a predicted *order*: only differences within a sample and modality mean
    anything). The ranking loss sees differences only, so every parameter that just shifts the
    output (a final bias, LayerNorm's bias) would get no gradient, and LayerNorm's scale would
    duplicate the next layer's: LayerNorm has no affine part, the last linear map no bias.
    State-dict names: ``heads.<modality>.{1,...}.weight`` (and ``.bias`` inside the MLP).
    """

    def __init__(self, modalities: Sequence[str], dim: int, hidden: int = 32) -> None:
        super().__init__()
        if hidden < 0:
            raise ValueError(f"loss predictor hidden width must be >= 0, got {hidden}")
        self.modalities, self.dim, self.hidden = list(modalities), int(dim), int(hidden)

        def head() -> nn.Sequential:
            norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
            if hidden == 0:
                return nn.Sequential(norm, nn.Linear(dim, 1, bias=False))
            return nn.Sequential(norm, nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1, bias=False))

        self.heads = nn.ModuleDict({m: head() for m in self.modalities})
        for m in self.modules():
            if isinstance(m, nn.Linear):  # small random init: distinct, untrained predictions
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, features: Mapping[str, Tensor]) -> TensorDict:
        unknown = [m for m in features if m not in self.heads]
        if unknown:
            raise KeyError(f"no loss-prediction head for modality {unknown[0]!r} "
                           f"(heads: {self.modalities})")
        return {m: self.heads[m](f).squeeze(-1).float() for m, f in features.items()}


def loss_targets(patch_losses: Mapping[str, Tensor], loss_weights: Mapping[str, float] | None,
                 modalities: Sequence[str]) -> TensorDict:
    """Per-token loss of each *input* modality, ``[B, N_m]``: the sum over the outputs that read
    it (``rgb`` and ``norm_rgb`` read ``rgb``) of ``loss.weights[output] * per-patch loss``, i.e.
    what the token contributes to the training loss. ``patch_losses``: output -> ``[B, N_m]``
    (from :func:`multimae_att.pretrain.losses.multimodal_loss`); a modality no output reads is left out.
    """
    out: TensorDict = {}
    for name, loss in patch_losses.items():
        m = input_modality_of(name)
        if m not in modalities:
            continue
        w = 1.0 if loss_weights is None else float(loss_weights.get(name, 1.0))
        out[m] = w * loss.detach().float() if m not in out else out[m] + w * loss.detach().float()
    return out


def count_pairs(counted: Mapping[str, Tensor]) -> Tensor:
    """Unordered pairs of counted tokens, summed over samples and modalities (float32 scalar)."""
    total = None
    for c in counted.values():
        n = c.sum(1).float()
        pairs = (n * (n - 1) / 2).sum()
        total = pairs if total is None else total + pairs
    return total if total is not None else torch.zeros(())


def ranking_loss(pred: Mapping[str, Tensor], target: Mapping[str, Tensor],
                 counted: Mapping[str, Tensor], num_pairs: Tensor | float | None = None) -> Tensor:
    """HPM's pairwise ranking loss over every pair of counted tokens of a sample and modality.

    For each pair (i, j) with ``target_j > target_i``: the binary cross-entropy of "j is harder
    than i" under ``sigmoid(pred_j - pred_i)``, i.e. ``softplus(pred_i - pred_j)``; pairs with
    equal targets add 0. The sum is divided by ``num_pairs`` (default: the number of unordered
    pairs of counted tokens, :func:`count_pairs`). HPM sums both orders of each pair and divides by
    the number of non-tied ordered pairs: the same value when no targets tie (HPM also adds 1e-6
    inside its logarithms). Counting tied pairs makes the divisor a function of the masks only,
    so the runner passes the count over the global batch and N processes match one.

    ``pred``/``target``/``counted``: dicts modality -> ``[B, N_m]`` (``counted`` bool). Returns a
    float32 scalar with a graph through ``pred`` (0 with a graph when no pair exists).
    """
    total = None
    for m, p in pred.items():
        p, t, c = p.float(), target[m].float(), counted[m].bool()
        harder = (t[:, None, :] > t[:, :, None]) & c[:, None, :] & c[:, :, None]  # [B, i, j]
        pair = F.softplus(p[:, :, None] - p[:, None, :])                         # -log sig(p_j - p_i)
        s = torch.where(harder, pair, torch.zeros_like(pair)).sum()
        total = s if total is None else total + s
    if total is None:
        raise ValueError("ranking_loss needs at least one modality")
    den = count_pairs(counted) if num_pairs is None else num_pairs
    return total / torch.as_tensor(den, dtype=torch.float32, device=total.device).clamp_min(1.0)


def _ordinal_ranks(x: Tensor, counted: Tensor) -> Tensor:
    """Rank of each counted entry among the counted entries of its row (0 = smallest; ties ->
    lower index first); uncounted entries get ranks >= the row's count."""
    key = torch.where(counted, x.float(), torch.full_like(x, float("inf"), dtype=torch.float32))
    order = torch.sort(key, dim=-1, stable=True).indices
    ar = torch.arange(x.shape[-1], device=x.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ar).float()


def spearman(pred: Mapping[str, Tensor], target: Mapping[str, Tensor],
             counted: Mapping[str, Tensor]) -> Tensor:
    """Mean Spearman rank correlation between ``pred`` and ``target`` over the counted tokens of
    each sample and modality (rows with at least 2 counted tokens; ordinal ranks, ties broken by
    token index). float32 scalar, 0 when no row qualifies. No host sync."""
    total, rows = None, None
    for m, p in pred.items():
        c = counted[m].bool()
        n = c.sum(1).float()                                        # [B]
        rp, rt = _ordinal_ranks(p, c), _ordinal_ranks(target[m], c)
        mid = ((n - 1) / 2)[:, None]
        cov = torch.where(c, (rp - mid) * (rt - mid), torch.zeros_like(rp)).sum(1) / n.clamp_min(1)
        var = (n * n - 1) / 12                                      # variance of 0..n-1
        ok = n >= 2
        rho = torch.where(ok, cov / var.clamp_min(1e-12), torch.zeros_like(cov))
        total = rho.sum() if total is None else total + rho.sum()
        rows = ok.sum() if rows is None else rows + ok.sum()
    if total is None:
        return torch.zeros(())
    return total / rows.clamp_min(1).float()
