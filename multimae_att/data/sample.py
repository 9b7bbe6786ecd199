"""Shared by both layouts: decoded images -> one sample dict; skip counter; batch collation."""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from multimae_att.data.decode import CorruptSample
from multimae_att.data.transforms import AugmentConfig, apply_geometry, make_geometry, to_tensors

__all__ = ["SkipCounter", "build_sample", "collate"]

log = logging.getLogger("multimae_att.data")
_MAX_WARNINGS = 10  # per process: enough to see what is wrong without flooding the logs


class SkipCounter:
    """Number of corrupt/incomplete samples skipped, shared by the DataLoader worker processes.

    Backed by a shared-memory int64 tensor with one slot per process (worker ``i`` writes slot
    ``i``, the main process the last one), so increments never race and the tensor crosses
    fork and spawn workers alike (a ``multiprocessing.Value`` is tied to one start method).
    The main process reads the total with :attr:`value` (the runner logs it in its metrics).
    """

    SLOTS = 64

    def __init__(self) -> None:
        self._counts = torch.zeros(self.SLOTS, dtype=torch.int64).share_memory_()
        self._warned = 0  # per-process copy: each worker warns about its first few skips

    @property
    def value(self) -> int:
        return int(self._counts.sum())

    def add(self, reason: str) -> None:
        info = get_worker_info()
        slot = info.id % (self.SLOTS - 1) if info is not None else self.SLOTS - 1
        self._counts[slot] += 1
        if self._warned < _MAX_WARNINGS:
            self._warned += 1
            more = " (further skips are counted, not logged)" if self._warned == _MAX_WARNINGS else ""
            log.warning("skipping sample: %s%s", reason, more)


def build_sample(images: Mapping[str, Image.Image], cls: int | None, sample_id: str,
                 cfg: AugmentConfig, epoch: int) -> dict[str, Any]:
    """Apply the sample's one geometry to every modality and convert to tensors.

    The source size is the rgb image's (else depth's, else the first modality's); every other
    modality must have the same aspect ratio (it may be stored at another resolution, e.g. a
    1/4-resolution label map), else :class:`CorruptSample`.
    """
    if not images:
        raise ValueError("a sample needs at least one image modality")
    ref = next(m for m in ("rgb", "depth", "semseg", "mask_valid", "att_map") if m in images)
    src_w, src_h = images[ref].size
    for modality, image in images.items():
        w, h = image.size
        # Same aspect up to rounding of the smaller grid (e.g. a 14 x 19 map of a 480 x 640 image).
        if abs(w - h * src_w / src_h) > max(1.0, 0.01 * w):
            raise CorruptSample(f"{sample_id}: {modality} is {w}x{h} but {ref} is {src_w}x{src_h} "
                                "(different aspect ratio)")
    if cfg.recipe is not None:   # a finetuning recipe does geometry and conversion itself
        sample = dict(cfg.recipe(images, sample_id, epoch))
        if cls is not None:
            sample["cls"] = torch.tensor(cls, dtype=torch.int64)
        sample["sample_id"] = sample_id
        return sample
    geom = make_geometry(cfg, (src_h, src_w), sample_id, epoch)
    arrays = apply_geometry(images, geom, cfg.semseg_scale, cfg.att_map_stride)
    sample: dict[str, Any] = to_tensors(arrays, cfg.reduce_zero_label)
    if not cfg.train and cfg.native_modalities:   # targets at the stored (label) resolution
        native = {m: np.array(images[m]) for m in cfg.native_modalities if m in images}
        sample.update({f"{m}_native": t for m, t in to_tensors(native, cfg.reduce_zero_label).items()})
    if cls is not None:
        sample["cls"] = torch.tensor(cls, dtype=torch.int64)
    sample["crop_box"] = torch.tensor(geom.box, dtype=torch.float32)
    sample["flip"] = torch.tensor(geom.flip)
    sample["source_size"] = torch.tensor(geom.source_size, dtype=torch.int64)
    sample["sample_id"] = sample_id
    return sample


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack samples into the batch dict of docs/INTERFACES.md (``sample_id`` stays a list of str)."""
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        batch[key] = values if key == "sample_id" else torch.stack(values)
    return batch
