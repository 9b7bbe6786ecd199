"""Shared helpers of the offline converters: image encoding, folder writing, WebDataset shards.

Every converter in ``data_prep/`` writes through this module, so the two layouts read by
``multimae_att.data`` have one definition:

* folder layout: ``OUT/<split>/<modality>/<class>/<stem>.<ext>``
* shard layout:  ``OUT/shards/<split>-NNNNNN.tar`` plus ``OUT/shards/<split>.json``
  (``{"num_samples": ..., "shards": [...], "shard_samples": [per-shard counts]}``) and
  ``OUT/shards/<split>.keys.txt`` (all keys),
  one tar member per modality:
  ``KEY.rgb.jpg|png``, ``KEY.depth.png`` (16-bit), ``KEY.semseg.png`` (8- or 16-bit),
  ``KEY.mask_valid.png`` (8-bit, 255 = valid), ``KEY.cls`` (decimal text), ``KEY.json``.

Not imported by the package (``multimae_att`` never imports ``data_prep``).
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

__all__ = ["encode_png", "encode_jpg", "FolderWriter", "ShardSink", "write_classes", "index_files",
           "pair_by_stem", "report_unpaired"]


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of an ``[H, W]`` uint8/uint16 or ``[H, W, 3]`` uint8 array (uint16 stays 16-bit)."""
    if array.dtype == np.uint16:
        if array.ndim != 2:
            raise ValueError(f"16-bit PNG needs a [H, W] array, got shape {array.shape}")
        image = Image.fromarray(array)  # Pillow stores uint16 as mode I;16 -> 16-bit PNG
    elif array.dtype == np.uint8:
        image = Image.fromarray(array)
    else:
        raise ValueError(f"PNG encoding needs uint8 or uint16, got {array.dtype}")
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # fast: shards are read far more than written
    return buf.getvalue()


def encode_jpg(array: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of an ``[H, W, 3]`` uint8 RGB array."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_classes(out: Path, class_names: list[str]) -> None:
    """Write ``OUT/classes.txt`` (one class folder name per line, line i = class index i)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("".join(f"{c}\n" for c in class_names))


def index_files(folder: Path, extensions: tuple[str, ...]) -> dict[str, Path]:
    """stem -> path of the files directly in ``folder`` whose suffix (any case) is in ``extensions``."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder} does not exist")
    return {p.stem: p for p in sorted(Path(folder).iterdir())
            if p.suffix.lower() in extensions and not p.name.startswith(".")}


def pair_by_stem(indexes: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], dict[str, list[str]]]:
    """Stems present in every modality (sorted) and, per modality, the stems it lacks."""
    all_stems = set().union(*(set(ix) for ix in indexes.values()))
    paired = sorted(set.intersection(*(set(ix) for ix in indexes.values()))) if indexes else []
    missing = {m: sorted(all_stems - set(ix)) for m, ix in indexes.items()}
    return paired, {m: v for m, v in missing.items() if v}


def report_unpaired(where: str, missing: Mapping[str, list[str]], show: int = 5) -> int:
    """Print the unpaired stems per modality (first few + count); returns the total count."""
    total = 0
    for modality, stems in missing.items():
        print(f"{where}: {len(stems)} stems have no {modality} file, e.g. {stems[:show]}")
        total += len(stems)
    return total


class FolderWriter:
    """Writes encoded files to ``OUT/<split>/<modality>/<class>/<stem>.<ext>``."""

    def __init__(self, out: Path, split: str) -> None:
        self.root = Path(out) / split
        self._made: set[Path] = set()

    def write(self, modality: str, class_name: str, stem: str, ext: str, data: bytes) -> None:
        folder = self.root / modality / class_name
        if folder not in self._made:
            folder.mkdir(parents=True, exist_ok=True)
            self._made.add(folder)
        (folder / f"{stem}.{ext}").write_bytes(data)


class ShardSink:
    """WebDataset shard writer for one split: ``OUT/shards/<split>-%06d.tar`` + ``<split>.json``.

    ``maxcount`` samples (and at most ``maxsize`` bytes) per shard. Use as a context manager;
    the index file is written on a clean exit only, so a crashed conversion is visible.
    """

    def __init__(self, out: Path, split: str, maxcount: int = 1000, maxsize: float = 1e9) -> None:
        self.dir = Path(out) / "shards"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.num_samples = 0
        self._keys: list[str] = []
        self._counts: dict[str, int] = {}   # shard file name -> samples written to it
        for stale in self.dir.glob(f"{split}-*.tar"):  # a re-run must not mix in old shards
            stale.unlink()
        self._writer = wds.ShardWriter(
            str(self.dir / f"{split}-%06d.tar"), maxcount=maxcount, maxsize=maxsize, verbose=0
        )

    def write(self, key: str, members: Mapping[str, Any]) -> None:
        """Write one sample; ``members`` maps extension (``rgb.png``, ``cls``, ...) to bytes/str."""
        if "." in key or "/" in key:
            # WebDataset splits member names at the first dot: a dotted key would be mangled.
            raise ValueError(f"shard key {key!r} must not contain '.' or '/'")
        sample: dict[str, Any] = {"__key__": key}
        for ext, value in members.items():
            if isinstance(value, (dict, list)):
                value = json.dumps(value, sort_keys=True)
            sample[ext] = value.encode("utf-8") if isinstance(value, str) else value
        self._writer.write(sample)
        name = Path(self._writer.fname).name
        self._counts[name] = self._counts.get(name, 0) + 1
        self._keys.append(key)
        self.num_samples += 1

    def close(self) -> None:
        self._writer.close()
        shards = sorted(p.name for p in self.dir.glob(f"{self.split}-*.tar"))
        # Per-shard counts let the loader count every sample a broken shard loses.
        index = {"num_samples": self.num_samples, "shards": shards,
                 "shard_samples": [self._counts.get(name, 0) for name in shards]}
        tmp = self.dir / f".{self.split}.json.tmp"
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, self.dir / f"{self.split}.json")
        # All keys, one per line: lets a consumer (e.g. an attention cache) list the sample ids.
        (self.dir / f"{self.split}.keys.txt").write_text("".join(f"{k}\n" for k in self._keys))

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._writer.close()
