"""Folder layout (MultiMAE-compatible): ``root/<split>/<modality>/<class>/<stem>.<ext>``.

Modalities are paired by file stem, never by sorted position: a stem missing from (or extra in)
one modality is an error listing the offending stems. The image-level class is the class folder;
class indices follow ``root/classes.txt`` (one folder name per line) when present, else the
sorted class folders of the split (as torchvision's ImageFolder). For rgb alone, a plain
ImageFolder split (``root/<split>/<class>/<file>``, e.g. ImageNet) is read as well.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from multimae_att.data.decode import IMAGE_MODALITIES, CorruptSample, decode_modality
from multimae_att.data.sample import SkipCounter, build_sample, mark_valid, placeholder_sample
from multimae_att.data.transforms import AugmentConfig

__all__ = ["FolderDataset", "scan_modality", "read_class_names"]

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg"}
_SHOW = 5  # stems listed in an error message


def read_class_names(root: Path, modality_dir: Path) -> list[str]:
    """Class folder names in index order: ``root/classes.txt`` if present, else sorted folders."""
    listing = root / "classes.txt"
    if listing.is_file():
        return [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    return sorted(e.name for e in os.scandir(modality_dir) if e.is_dir() and not e.name.startswith("."))


def scan_modality(folder: Path) -> dict[str, tuple[str, Path]]:
    """stem -> (class folder, path) for all image files under ``folder/<class>/``.

    Raises ``FileNotFoundError`` for a missing folder and ``ValueError`` for a stem stored twice.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"modality folder {folder} does not exist")
    found: dict[str, tuple[str, Path]] = {}
    duplicates: list[str] = []
    for class_entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not class_entry.is_dir() or class_entry.name.startswith("."):
            continue
        for entry in os.scandir(class_entry.path):
            stem, ext = os.path.splitext(entry.name)
            if ext.lower() not in IMAGE_EXTENSIONS or entry.name.startswith("."):
                continue
            if stem in found:
                duplicates.append(stem)
            found[stem] = (class_entry.name, Path(entry.path))
    if duplicates:
        raise ValueError(f"{folder}: {len(duplicates)} stems stored more than once, e.g. {sorted(duplicates)[:_SHOW]}")
    return found


def _check_pairing(split_dir: Path, per_modality: dict[str, dict[str, tuple[str, Path]]]) -> list[str]:
    """Sorted stems present in every modality; raises ``ValueError`` listing the unpaired ones."""
    all_stems = set().union(*(set(files) for files in per_modality.values()))
    problems = []
    for modality, files in per_modality.items():
        missing = sorted(all_stems - set(files))
        if missing:
            problems.append(f"  {modality}: {len(missing)} missing, e.g. {missing[:_SHOW]}")
    if problems:
        raise ValueError(f"{split_dir}: modalities are paired by file stem and these stems are not "
                         "present in every modality:\n" + "\n".join(problems))
    stems = sorted(all_stems)
    ref = next(iter(per_modality))
    for modality, files in per_modality.items():
        wrong = [s for s in stems if files[s][0] != per_modality[ref][s][0]]
        if wrong:
            raise ValueError(f"{split_dir}: {len(wrong)} stems are in different class folders in {ref} "
                             f"and {modality}, e.g. {wrong[:_SHOW]}")
    return stems


class FolderDataset(Dataset):
    """Map-style dataset over the folder layout; items are sample dicts (see docs/INTERFACES.md).

    ``modalities``: any subset of rgb/depth/semseg/mask_valid/cls (``cls`` = class folder index).
    ``on_corrupt="skip"`` (training): a corrupt sample is counted in ``skipped`` and replaced by
    the next readable index, so batch sizes (and DDP step counts) stay fixed; an error is raised
    when no sample is readable. ``on_corrupt="mark"`` (evaluation): nothing is substituted; the
    sample's place holds a :func:`~multimae_att.data.sample.placeholder_sample` (``valid`` False,
    ``skip_reason`` naming the file) and every item carries ``valid`` / ``skip_reason``.
    Call :meth:`set_epoch` before each epoch: augmentation is a function of (seed, epoch, stem).
    """

    def __init__(self, root: str | os.PathLike, split: str, modalities: Sequence[str],
                 augment: AugmentConfig, skipped: SkipCounter | None = None,
                 on_corrupt: str = "skip") -> None:
        if on_corrupt not in ("skip", "mark"):
            raise ValueError(f"on_corrupt must be 'skip' or 'mark', got {on_corrupt!r}")
        self.on_corrupt = on_corrupt
        self.modalities = list(modalities)
        self.root = Path(root)
        self.split_dir = self.root / split
        unknown = set(modalities) - set(IMAGE_MODALITIES) - {"cls"}
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; "
                             f"expected a subset of {IMAGE_MODALITIES + ('cls',)}")
        self.image_modalities = [m for m in modalities if m != "cls"]
        if not self.image_modalities:
            raise ValueError("at least one image modality is needed (cls alone has no files)")
        self.with_cls = "cls" in modalities
        self.augment = augment
        self.skipped = skipped if skipped is not None else SkipCounter()
        self.epoch = 0
        files = {m: scan_modality(self._modality_dir(m)) for m in self.image_modalities}
        self.stems = _check_pairing(self.split_dir, files)
        if not self.stems:
            raise ValueError(f"{self.split_dir}: no image files found for {self.image_modalities}")
        self.paths = {m: [files[m][s][1] for s in self.stems] for m in self.image_modalities}
        ref = self.image_modalities[0]
        self.class_names = read_class_names(self.root, self._modality_dir(ref))
        class_index = {name: i for i, name in enumerate(self.class_names)}
        unknown_classes = sorted({files[ref][s][0] for s in self.stems} - set(class_index))
        if self.with_cls and unknown_classes:
            raise ValueError(f"{self.split_dir}: class folders {unknown_classes[:_SHOW]} are not in "
                             f"{self.root / 'classes.txt'}")
        self.targets = [class_index.get(files[ref][s][0], -1) for s in self.stems]

    def _modality_dir(self, modality: str) -> Path:
        """``split/<modality>``; for rgb alone also a plain ImageFolder split (``split/<class>/``,
        e.g. ImageNet's ``val/<wnid>/*.JPEG``) when the split has no modality folders at all."""
        folder = self.split_dir / modality
        plain = (modality == "rgb" and self.image_modalities == ["rgb"] and self.split_dir.is_dir()
                 and not any((self.split_dir / m).is_dir() for m in IMAGE_MODALITIES))
        return self.split_dir if plain else folder

    def __len__(self) -> int:
        return len(self.stems)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (seeds augmentation). ``start_batch`` is handled by the sampler
        (``EpochSampler.set_epoch``); accepted here so both datasets share one signature."""
        self.epoch = epoch

    def sample_ids(self) -> list[str]:
        """Stable sample ids (file stems), in index order."""
        return list(self.stems)

    def load(self, index: int) -> dict[str, Any]:
        """Decode and transform sample ``index``; raises :class:`CorruptSample` on a bad file."""
        stem = self.stems[index]
        where = {m: str(self.paths[m][index]) for m in self.image_modalities}
        where["cls"] = f"{self.paths[self.image_modalities[0]][index].parent} (class folder)"
        images = {m: decode_modality(m, self.paths[m][index], where[m]) for m in self.image_modalities}
        cls = self.targets[index] if self.with_cls else None
        return build_sample(images, cls, stem, self.augment, self.epoch, where)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.on_corrupt == "mark":
            try:
                return mark_valid(self.load(index))
            except CorruptSample as exc:
                self.skipped.add(str(exc))
                return placeholder_sample(self.modalities, self.augment, self.stems[index], str(exc))
        for attempt in range(len(self.stems)):
            candidate = (index + attempt) % len(self.stems)
            try:
                return self.load(candidate)
            except CorruptSample as exc:
                self.skipped.add(str(exc))
        raise RuntimeError(f"{self.split_dir}: no readable sample among {len(self.stems)} "
                           f"(modalities {self.image_modalities})")
