"""Entry points for the runners: :func:`build_dataset` and :func:`build_loader` (plain arguments).

The loader already splits the data by rank (``rank``/``world_size``): do not pass it through
``accelerator.prepare`` (that would shard it a second time); move batches to the device yourself.
Call ``loader.set_epoch(epoch)`` before every epoch (``start_batch`` to resume mid-epoch) and log
``loader.skipped.value`` (corrupt samples skipped so far, all workers) in the metrics.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from multimae_att.data.folder import FolderDataset
from multimae_att.data.sample import SkipCounter, collate
from multimae_att.data.shards import ShardDataset, read_shard_index, resolve_shards
from multimae_att.data.transforms import AugmentConfig

__all__ = ["EpochSampler", "MultiModalLoader", "build_dataset", "build_loader", "detect_layout"]


class EpochSampler(Sampler[int]):
    """Seeded per-epoch permutation split over ranks, with a resumable start position.

    ``pad=True`` (training): every rank gets ``ceil(n / world)`` indices, the list padded by
    wrapping (as DistributedSampler), so all ranks run the same number of steps. ``pad=False``
    (evaluation): ranks get disjoint slices covering every sample exactly once (counts may differ
    by one), so whole-set metrics count no sample twice.
    """

    def __init__(self, n: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 pad: bool = True) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.n, self.shuffle, self.seed, self.pad = n, shuffle, seed, pad
        self.rank, self.world_size = rank, world_size
        self.per_rank = math.ceil(n / world_size) if pad else len(range(rank, n, world_size))
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """``start``: number of this rank's indices already consumed this epoch (resume)."""
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.pad:
            total = math.ceil(self.n / self.world_size) * self.world_size
            order = (order * math.ceil(total / self.n))[:total]
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return self.per_rank - self.start


class MultiModalLoader(DataLoader):
    """A DataLoader with ``set_epoch``, the shared ``skipped`` counter and ``sample_ids``."""

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Seed the epoch (order and augmentation); ``start_batch`` skips consumed batches."""
        # Both datasets take (epoch, start_batch); wrappers forwarding set_epoch keep working.
        self.dataset.set_epoch(epoch, start_batch)
        if isinstance(self.sampler, EpochSampler):
            self.sampler.set_epoch(epoch, start_batch * self.batch_size)

    @property
    def skipped(self) -> SkipCounter:
        return self.dataset.skipped

    def sample_ids(self) -> list[str] | None:
        """All sample ids of the split (folder layout, or shards with a ``<split>.keys.txt`` list)."""
        return self.dataset.sample_ids()


def detect_layout(source: Any, split: str) -> str:
    """'folder' if ``source/<split>/`` exists, 'shards' if ``source/shards/<split>.json`` exists or
    ``source`` is a shard spec (pattern, list file, URL list)."""
    if isinstance(source, (list, tuple)):
        return "shards"
    path = Path(os.fspath(source))
    if path.is_dir():
        if (path / split).is_dir():
            return "folder"
        if (path / "shards" / f"{split}.json").is_file():
            return "shards"
        raise FileNotFoundError(f"{path} has neither a {split}/ folder nor shards/{split}.json")
    return "shards"


def build_dataset(source: str | os.PathLike | Sequence[str], modalities: Sequence[str], *,
                  split: str = "train", image_size: int | tuple[int, int] = 224, train: bool = True,
                  layout: str = "auto", seed: int = 0, rank: int = 0, world_size: int = 1,
                  batch_size: int = 1, semseg_scale: int = 4, reduce_zero_label: bool = False,
                  scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                  hflip: float = 0.5, eval_crop_pct: float = 1.0, eval_full_image: bool = False,
                  att_map_stride: int = 16, native_modalities: Sequence[str] = (), recipe: Any = None,
                  shuffle_buffer: int = 1000, resampled: bool | None = None,
                  samples_per_epoch: int | None = None,
                  label_ranges: Mapping[str, tuple[int, int | None]] | None = None,
                  on_corrupt: str = "skip") -> FolderDataset | ShardDataset:
    """A dataset yielding sample dicts (keys/dtypes of docs/INTERFACES.md, without the batch dim).

    ``source``: a dataset root (``root/<split>/<modality>/<class>/<stem>.png`` and/or
    ``root/shards/<split>.json``) or a shard spec (brace pattern, ``.txt``/``.json`` list, list of
    URLs, ``pipe:`` URLs). ``modalities``: subset of rgb/depth/semseg/mask_valid/att_map/cls
    (att_map: a precomputed attention map, delivered at ``image_size // att_map_stride``).
    ``train``: random-resized crop + flip; else deterministic centre crop (``recipe``: a per-sample
    callable that replaces both, see :class:`AugmentConfig`). ``semseg_scale``: 4 for
    pretraining (semseg at H/4), 1 for finetuning. Shards: ``resampled`` defaults to
    ``train and world_size > 1``; ``samples_per_epoch`` (per rank) defaults to the index's count / world.
    ``label_ranges``: ``{modality: (classes, ignore_index or None)}`` for ``semseg`` / ``cls``; a
    sample with a label outside ``[0, classes)`` is corrupt (checked in the worker, named in the
    log). ``on_corrupt``: ``skip`` (count corrupt samples and go on) or ``mark`` (evaluation:
    placeholders with ``valid`` False keep their place; see :class:`FolderDataset`).
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    augment = AugmentConfig(image_size=size, train=train, scale=tuple(scale), ratio=tuple(ratio),
                            hflip=hflip, semseg_scale=semseg_scale, eval_crop_pct=eval_crop_pct,
                            eval_full_image=eval_full_image, reduce_zero_label=reduce_zero_label,
                            att_map_stride=att_map_stride, seed=seed,
                            native_modalities=tuple(native_modalities), recipe=recipe,
                            label_ranges=tuple((m, c, i) for m, (c, i) in (label_ranges or {}).items()))
    layout = detect_layout(source, split) if layout == "auto" else layout
    if layout == "folder":
        return FolderDataset(source, split, modalities, augment, on_corrupt=on_corrupt)
    if layout != "shards":
        raise ValueError(f"layout must be 'auto', 'folder' or 'shards', got {layout!r}")
    if not isinstance(source, (list, tuple)) and Path(os.fspath(source)).is_dir():
        source = str(Path(os.fspath(source)) / "shards" / f"{split}.json")
    urls, total = resolve_shards(source)
    local_index = str(source).endswith(".json") and Path(str(source)).is_file()
    counts = read_shard_index(Path(str(source)))["shard_samples"] if local_index else {}
    resampled = (train and world_size > 1) if resampled is None else resampled
    if samples_per_epoch is None and total is not None:
        samples_per_epoch = math.ceil(total / world_size)
    dataset = ShardDataset(urls, modalities, augment, batch_size=batch_size,
                           shuffle_buffer=shuffle_buffer if train else 0, resampled=resampled,
                           samples_per_epoch=samples_per_epoch, shuffle_shards=train, seed=seed,
                           rank=rank, world_size=world_size, shard_samples=counts,
                           on_corrupt=on_corrupt)
    keys = Path(str(source)[:-len(".json")] + ".keys.txt") if str(source).endswith(".json") else None
    dataset.keys_file = keys if keys is not None and keys.is_file() else None
    return dataset


def build_loader(source: str | os.PathLike | Sequence[str], modalities: Sequence[str], *,
                 batch_size: int, num_workers: int = 0, drop_last: bool | None = None,
                 pin_memory: bool = False, collate_fn: Any = collate,
                 **dataset_kwargs: Any) -> MultiModalLoader:
    """DataLoader over :func:`build_dataset` (same keyword arguments) yielding batch dicts.

    Folder layout: a seeded :class:`EpochSampler` split over ranks: in training shuffled and padded
    so every rank runs the same number of batches; in evaluation in order, each sample on exactly
    one rank. ``drop_last`` defaults to ``train``. Workers are not persistent, so ``set_epoch``
    before ``iter(loader)`` reaches them. ``collate_fn``: batch builder (default :func:`collate`;
    finetuning pads ``*_native`` targets of different sizes).
    """
    train = dataset_kwargs.get("train", True)
    drop_last = train if drop_last is None else drop_last
    dataset = build_dataset(source, modalities, batch_size=batch_size, **dataset_kwargs)
    common = dict(batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn,
                  pin_memory=pin_memory, drop_last=drop_last, persistent_workers=False)
    if isinstance(dataset, FolderDataset):
        sampler = EpochSampler(len(dataset), shuffle=train, seed=dataset_kwargs.get("seed", 0),
                               rank=dataset_kwargs.get("rank", 0),
                               world_size=dataset_kwargs.get("world_size", 1), pad=train)
        return MultiModalLoader(dataset, sampler=sampler, **common)
    return MultiModalLoader(dataset, **common)
