"""Shared by both layouts: decoded images -> one sample dict (labels checked); skip counter;
evaluation placeholders for corrupt samples; batch collation."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from multimae_att.data.decode import CorruptSample
from multimae_att.data.transforms import AugmentConfig, apply_geometry, make_geometry, to_tensors
from multimae_att.modalities import MODALITIES

__all__ = ["SkipCounter", "build_sample", "check_labels", "collate", "mark_valid", "placeholder_sample"]

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

    def add(self, reason: str, count: int = 1) -> None:
        """Count ``count`` skipped samples (e.g. the unread rest of a truncated shard) for ``reason``."""
        info = get_worker_info()
        slot = info.id % (self.SLOTS - 1) if info is not None else self.SLOTS - 1
        self._counts[slot] += count
        if self._warned < _MAX_WARNINGS:
            self._warned += 1
            more = " (further skips are counted, not logged)" if self._warned == _MAX_WARNINGS else ""
            log.warning("skipping sample: %s%s", reason, more)


def check_labels(images: Mapping[str, Image.Image], cls: int | None, cfg: AugmentConfig,
                 where: Mapping[str, str]) -> None:
    """Raise :class:`CorruptSample` naming the file when a label lies outside ``[0, classes)``.

    ``cfg.label_ranges``: ``(modality, classes, ignore_index or None)`` for ``semseg`` (every
    pixel of the stored map, after ``reduce_zero_label``, whatever the crop) and ``cls``. Such a
    label would otherwise fail deep inside the model (an embedding or loss index error).
    """
    for modality, classes, ignore in cfg.label_ranges:
        if modality == "cls":
            if cls is not None and not 0 <= cls < classes:
                raise CorruptSample(f"{where.get('cls', '?')}: class {cls} outside [0, {classes})")
            continue
        if modality not in images:
            continue
        array = np.asarray(images[modality])
        if not cfg.reduce_zero_label and array.size and array.min() >= 0 and array.max() < classes:
            continue  # the common case: one pass over the map, no copy
        labels = to_tensors({modality: array}, cfg.reduce_zero_label)[modality]
        bad = (labels < 0) | (labels >= classes)
        if ignore is not None:
            bad &= labels != ignore
        if bad.any():
            values = torch.unique(labels[bad]).tolist()
            kept = f" (ignore index {ignore})" if ignore is not None else ""
            raise CorruptSample(f"{where.get(modality, '?')}: {modality} label values {values[:5]}"
                                f"{' ...' if len(values) > 5 else ''} outside [0, {classes}){kept}")


def build_sample(images: Mapping[str, Image.Image], cls: int | None, sample_id: str,
                 cfg: AugmentConfig, epoch: int, where: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Apply the sample's one geometry to every modality and convert to tensors.

    The source size is the rgb image's (else depth's, else the first modality's); every other
    modality must have the same aspect ratio (it may be stored at another resolution, e.g. a
    1/4-resolution label map), else :class:`CorruptSample`. Labels are checked first
    (:func:`check_labels`); ``where`` names each modality's file (``cls``: the class source) in
    the messages.
    """
    if not images:
        raise ValueError("a sample needs at least one image modality")
    check_labels(images, cls, cfg, where or dict.fromkeys((*images, "cls"), sample_id))
    ref = next(m for m in MODALITIES if m in images)   # table order: rgb first
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


_BLANK_MODES = {"rgb8": "RGB", "depth16": "I;16", "labels": "L", "mask": "L", "map": "L"}   # by encoding


def placeholder_sample(modalities: Sequence[str], cfg: AugmentConfig, sample_id: str,
                       reason: str) -> dict[str, Any]:
    """Stand-in for a corrupt *evaluation* sample: blank images through the same
    :func:`build_sample` (so keys, shapes and dtypes match the readable samples, whatever the
    transform or recipe), marked ``valid = False`` with the ``skip_reason``. The batch keeps its
    order (no other sample is substituted) and the metrics leave the row out (docs/INTERFACES.md)."""
    h, w = cfg.image_size
    images = {m: Image.new(_BLANK_MODES[MODALITIES[m].encoding], (w, h)) for m in modalities if m != "cls"}
    blank = dataclasses.replace(cfg, label_ranges=())   # zeros need not be valid labels
    sample = build_sample(images, 0 if "cls" in modalities else None, sample_id, blank, epoch=0)
    sample["valid"] = torch.tensor(False)
    sample["skip_reason"] = reason
    return sample


def mark_valid(sample: dict[str, Any]) -> dict[str, Any]:
    """A readable evaluation sample: ``valid = True``, empty ``skip_reason`` (same keys as a
    :func:`placeholder_sample`, so both batch together)."""
    sample["valid"] = torch.tensor(True)
    sample["skip_reason"] = ""
    return sample


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack samples into the batch dict of docs/INTERFACES.md (strings such as ``sample_id``
    stay lists)."""
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        batch[key] = values if isinstance(values[0], str) else torch.stack(values)
    return batch
