"""Frozen-feature k-NN classification, full and few-shot.

Based on the weighted k-NN protocol of DINO (Caron et al. 2021), used by AttMask for full and
few-shot evaluation: features are L2-normalised, the k most cosine-similar training samples
vote for their class with weight exp(similarity / T).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from multimae_att.finetune.metrics import ClassificationMetrics

__all__ = ["knn_scores", "few_shot_indices", "knn_evaluate"]


@torch.no_grad()
def knn_scores(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
               num_classes: int, k: int = 20, temperature: float = 0.07,
               chunk_size: int = 1024) -> torch.Tensor:
    """Class scores ``[M, C]`` of ``query`` ``[M, D]`` against ``bank`` ``[N, D]`` (labels ``[N]``).

    Neighbours are the ``min(k, N)`` most similar bank rows; queries are processed in chunks of
    ``chunk_size`` so the ``[chunk, N]`` similarity matrix stays small.
    """
    if bank.shape[0] != bank_labels.shape[0]:
        raise ValueError(f"knn_scores: {bank.shape[0]} bank features but {bank_labels.shape[0]} labels")
    k = min(k, bank.shape[0])
    bank = F.normalize(bank.float(), dim=1)
    out = []
    for q in F.normalize(query.float(), dim=1).split(chunk_size):
        sim, idx = (q @ bank.T).topk(k, dim=1)                   # [m, k]
        weights = (sim / temperature).exp()
        scores = torch.zeros(q.shape[0], num_classes, device=q.device)
        out.append(scores.scatter_add_(1, bank_labels[idx], weights))
    return torch.cat(out)


def few_shot_indices(labels: torch.Tensor, shots: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of ``shots`` random samples per class (all of a class that has fewer), sorted.

    labels: int64 ``[N]``. Deterministic given the generator's state.
    """
    perm = torch.randperm(labels.numel(), generator=generator)
    by_class = perm[torch.sort(labels[perm], stable=True).indices]   # random order within class
    sorted_labels = labels[by_class]
    first = torch.searchsorted(sorted_labels, sorted_labels, side="left")   # start of own class
    rank = torch.arange(labels.numel()) - first
    return by_class[rank < shots].sort().values


@torch.no_grad()
def knn_evaluate(train_feats: torch.Tensor, train_labels: torch.Tensor,
                 val_feats: torch.Tensor, val_labels: torch.Tensor, num_classes: int,
                 k: int = 20, temperature: float = 0.07, shots: Sequence[int] = (1, 5, 10, 20),
                 repeats: int = 3, seed: int = 0) -> dict[str, float]:
    """k-NN top-1/top-5 (``knn_top1``, ``knn_top5``) and few-shot k-NN top-1 per shot count
    (``knn_{s}shot_top1``, mean over ``repeats`` random draws of the labelled subset)."""
    train_labels, val_labels = train_labels.long().cpu(), val_labels.long().cpu()
    train_feats, val_feats = train_feats.cpu(), val_feats.cpu()

    def evaluate(bank_idx: torch.Tensor | None) -> dict[str, float]:
        bank, labels = ((train_feats, train_labels) if bank_idx is None
                        else (train_feats[bank_idx], train_labels[bank_idx]))
        m = ClassificationMetrics((1, 5))
        m.update(m.stats(knn_scores(val_feats, bank, labels, num_classes, k, temperature), val_labels))
        return m.compute()

    full = evaluate(None)
    out = {"knn_top1": full["top1"], "knn_top5": full["top5"]}
    g = torch.Generator().manual_seed(seed)
    for s in shots:
        accs = [evaluate(few_shot_indices(train_labels, s, g))["top1"] for _ in range(repeats)]
        out[f"knn_{s}shot_top1"] = sum(accs) / len(accs)
    return out
