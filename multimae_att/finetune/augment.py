"""Per-sample training augmentation added on top of :mod:`multimae_att.data` samples.

:class:`RandAugmentRGB` runs timm's RandAugment (PIL operations) on a sample's normalised RGB
tensor: denormalise to 8 bit, augment, normalise again. It is applied inside the dataset (so in
DataLoader workers), never on the batch in the training loop.

Sample transforms are called as ``transform(sample, epoch)``; their randomness is a function of
(seed, epoch, sample id), as the crops of :mod:`multimae_att.data`, so it depends neither on the
worker that loads the sample nor on what was loaded before (exact resume, identical reruns).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from multimae_att.data import IMAGENET_MEAN, IMAGENET_STD
from multimae_att.seeds import step_seed

__all__ = ["RandAugmentRGB", "TransformedDataset", "TransformedIterable", "with_sample_transform",
           "seeded_global_rngs"]

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


class _KeepOneBit:
    """Posterize's level -> bits, kept in Pillow's range [1, 8].

    timm maps the top of the magnitude range to 0 bits (``inc1``: ``4 - int(m / 10 * 4)`` at
    m = 10, reached by ``mstd`` noise; plain ``Posterize`` below m = 2.5). Pillow >= 13 rejects
    0 bits (older versions returned a black image), so the range ends at 1 bit: the strongest
    posterize Pillow allows. Picklable, for DataLoader workers.
    """

    def __init__(self, level_fn: Callable[..., tuple]) -> None:
        self.level_fn = level_fn

    def __call__(self, level: float, hparams: dict[str, Any]) -> tuple:
        bits, *rest = self.level_fn(level, hparams)
        return (min(max(int(bits), 1), 8), *rest)


@contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed Python's ``random`` and numpy's global generator (what timm's RandAugment draws
    from) for the block, and put their previous states back afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class RandAugmentRGB:
    """``sample['rgb']`` (float ``[3, H, W]``, ImageNet-normalised) through timm RandAugment,
    with its draws seeded by (``seed``, epoch, ``sample['sample_id']``)."""

    def __init__(self, spec: str = "rand-m9-mstd0.5-inc1", seed: int = 0) -> None:
        from timm.data import rand_augment_transform
        fill = tuple(round(255 * m) for m in IMAGENET_MEAN)
        self.spec, self.seed = spec, seed
        self.transform = rand_augment_transform(spec, {"translate_const": 100, "img_mean": fill})
        for op in self.transform.ops:
            if op.name.startswith("Posterize"):
                op.level_fn = _KeepOneBit(op.level_fn)

    def __call__(self, sample: dict[str, Any], epoch: int = 0) -> dict[str, Any]:
        rgb = sample["rgb"]
        img = ((rgb * _STD + _MEAN).clamp(0, 1) * 255).round().to(torch.uint8)
        with seeded_global_rngs(step_seed(self.seed, epoch, sample["sample_id"], "randaug")):
            out = self.transform(Image.fromarray(img.permute(1, 2, 0).numpy()))
        x = torch.from_numpy(np.asarray(out, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return {**sample, "rgb": (x - _MEAN) / _STD}


Transform = Callable[[dict[str, Any], int], dict[str, Any]]   # (sample, epoch) -> sample


class TransformedDataset(Dataset):
    """A map-style dataset with a per-sample transform; other attributes come from ``base``."""

    def __init__(self, base: Dataset, transform: Transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.transform(self.base[index], getattr(self.base, "epoch", 0))

    def __getattr__(self, name: str) -> Any:   # set_epoch, skipped, sample_ids, ...
        if name in ("base", "transform"):
            raise AttributeError(name)
        return getattr(self.base, name)


class TransformedIterable(IterableDataset):
    """An iterable dataset with a per-sample transform; other attributes come from ``base``."""

    def __init__(self, base: IterableDataset, transform: Transform):
        self.base, self.transform = base, transform

    def __iter__(self):
        epoch = getattr(self.base, "epoch", 0)
        return (self.transform(sample, epoch) for sample in self.base)

    def __len__(self) -> int:
        return len(self.base)

    def __getattr__(self, name: str) -> Any:
        if name in ("base", "transform"):
            raise AttributeError(name)
        return getattr(self.base, name)


def with_sample_transform(dataset, transform):
    """Wrap ``dataset`` (map-style or iterable) so every sample goes through ``transform``."""
    if transform is None:
        return dataset
    cls = TransformedIterable if isinstance(dataset, IterableDataset) else TransformedDataset
    return cls(dataset, transform)
