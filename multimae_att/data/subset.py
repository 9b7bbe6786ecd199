"""Low-data training sets: a stratified, seeded subset of a labelled split (``data.train_fraction``).

Per class c with n_c samples, ``max(1, round(fraction * n_c))`` samples are kept, drawn uniformly
without replacement by a generator seeded with ``seed``; the kept indices keep their original
order. The same (labels, fraction, seed) always give the same subset, so two variants evaluated
with the same seed see the same images (a paired comparison).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = ["stratified_subset", "SubsetDataset", "training_subset"]


def stratified_subset(labels: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Indices of the kept samples (ascending); see the module docstring."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    y = torch.as_tensor(list(labels), dtype=torch.long)
    if fraction == 1.0 or y.numel() == 0:
        return list(range(y.numel()))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(y.numel(), generator=g)          # one random order for all classes
    keep = []
    for c in torch.unique(y).tolist():
        members = order[y[order] == c]                        # class c in random order
        keep.append(members[:max(1, round(fraction * members.numel()))])
    return sorted(torch.cat(keep).tolist())


class SubsetDataset(Dataset):
    """``base`` restricted to ``indices``; other attributes (``set_epoch``, ``skipped``, ...) come
    from ``base``, ``sample_ids`` and ``targets`` follow the subset."""

    def __init__(self, base: Dataset, indices: Sequence[int]) -> None:
        self.base, self.indices = base, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.base[self.indices[index]]

    @property
    def targets(self) -> list[int]:
        return [self.base.targets[i] for i in self.indices]

    def sample_ids(self) -> list[str]:
        ids = self.base.sample_ids()
        return [ids[i] for i in self.indices]

    def __getattr__(self, name: str) -> Any:
        if name in ("base", "indices"):
            raise AttributeError(name)
        return getattr(self.base, name)


def training_subset(dataset: Dataset, fraction: float, seed: int, where: str = "data.train_fraction") -> Dataset:
    """``dataset`` itself for ``fraction == 1``, else its stratified subset (needs per-sample
    class labels, ``dataset.targets``: the folder layout)."""
    if fraction == 1.0:
        return dataset
    labels = getattr(dataset, "targets", None)
    if labels is None:
        raise ValueError(f"{where}={fraction} needs the class of every sample up front (the folder "
                         "layout); WebDataset shards stream without one")
    return SubsetDataset(dataset, stratified_subset(labels, fraction, seed))
