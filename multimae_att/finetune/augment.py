"""Per-sample training augmentation added on top of :mod:`multimae_att.data` samples.

:class:`RandAugmentRGB` runs timm's RandAugment (PIL operations) on a sample's normalised RGB
tensor: denormalise to 8 bit, augment, normalise again. It is applied inside the dataset (so in
DataLoader workers), never on the batch in the training loop.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from multimae_att.data import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["RandAugmentRGB", "TransformedDataset", "TransformedIterable", "with_sample_transform"]

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

    def __call__(self, level: float, hparams: Dict[str, Any]) -> tuple:
        bits, *rest = self.level_fn(level, hparams)
        return (min(max(int(bits), 1), 8), *rest)


class RandAugmentRGB:
    """``sample['rgb']`` (float ``[3, H, W]``, ImageNet-normalised) through timm RandAugment."""

    def __init__(self, spec: str = "rand-m9-mstd0.5-inc1") -> None:
        from timm.data import rand_augment_transform
        fill = tuple(round(255 * m) for m in IMAGENET_MEAN)
        self.spec = spec
        self.transform = rand_augment_transform(spec, {"translate_const": 100, "img_mean": fill})
        for op in self.transform.ops:
            if op.name.startswith("Posterize"):
                op.level_fn = _KeepOneBit(op.level_fn)

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        rgb = sample["rgb"]
        img = ((rgb * _STD + _MEAN).clamp(0, 1) * 255).round().to(torch.uint8)
        out = self.transform(Image.fromarray(img.permute(1, 2, 0).numpy()))
        x = torch.from_numpy(np.asarray(out, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return {**sample, "rgb": (x - _MEAN) / _STD}


class TransformedDataset(Dataset):
    """A map-style dataset with a per-sample transform; other attributes come from ``base``."""

    def __init__(self, base: Dataset, transform: Callable[[Dict[str, Any]], Dict[str, Any]]):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return self.transform(self.base[index])

    def __getattr__(self, name: str) -> Any:   # set_epoch, skipped, sample_ids, ...
        if name in ("base", "transform"):
            raise AttributeError(name)
        return getattr(self.base, name)


class TransformedIterable(IterableDataset):
    """An iterable dataset with a per-sample transform; other attributes come from ``base``."""

    def __init__(self, base: IterableDataset, transform: Callable[[Dict[str, Any]], Dict[str, Any]]):
        self.base, self.transform = base, transform

    def __iter__(self):
        return map(self.transform, iter(self.base))

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
