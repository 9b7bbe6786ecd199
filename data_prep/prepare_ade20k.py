#!/usr/bin/env python
"""Convert ADE20K (``ADEChallengeData2016``) to our folder layout and/or WebDataset shards.

Input: ``ROOT/images/{training,validation}/ADE_*.jpg`` and ``ROOT/annotations/{training,validation}/
ADE_*.png`` (8-bit labels: 0 = "other", 1..150 = classes). Images and annotations are paired by
file stem; unpaired files are reported (first few + count) and left out (``--strict``: error).
Files are copied byte for byte (no re-encoding). Labels are stored as they are: the ADE20K
"zero-label reduction" (0 -> ignore 255, others -1) is a load-time switch
(``build_loader(..., reduce_zero_label=True)``), not baked into the files.

Output: ``OUT/{train,val}/{rgb,semseg}/data/<stem>.{jpg,png}`` and
``OUT/shards/{train,val}-NNNNNN.tar`` (``KEY.rgb.jpg``, ``KEY.semseg.png``, ``KEY.json``).

Usage: ``python data_prep/prepare_ade20k.py --root ADEChallengeData2016 --out data/ade20k
[--format folder|shards|both]``
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shard_writer import FolderWriter, ShardSink, index_files, pair_by_stem, report_unpaired

SPLITS = {"train": "training", "val": "validation"}
NUM_CLASSES = 150


def check_annotation(path: Path) -> None:
    """Raise ``ValueError`` unless ``path`` is a single-channel label PNG with values 0..150."""
    with Image.open(path) as image:
        if image.mode not in ("L", "P"):
            raise ValueError(f"{path}: annotation must be an 8-bit label PNG, got mode {image.mode}")
        top = int(np.asarray(image).max())
    if top > NUM_CLASSES:
        raise ValueError(f"{path}: label {top} > {NUM_CLASSES}")


def convert_split(args: argparse.Namespace, split: str) -> int:
    """Convert one split; returns the number of samples written."""
    source = SPLITS[split]
    images = index_files(args.root / "images" / source, (".jpg", ".jpeg"))
    labels = index_files(args.root / "annotations" / source, (".png",))
    stems, missing = pair_by_stem({"rgb": images, "semseg": labels})
    if report_unpaired(f"ade20k {split}", missing) and args.strict:
        raise SystemExit(f"ade20k {split}: unpaired files (see above) and --strict was given")
    folder = FolderWriter(args.out, split) if args.format in ("folder", "both") else None
    sink = ShardSink(args.out, split, args.shard_size) if args.format in ("shards", "both") else None
    for stem in tqdm(stems, desc=f"ade20k {split}", unit="img"):
        if args.check:
            check_annotation(labels[stem])
        rgb, semseg = images[stem].read_bytes(), labels[stem].read_bytes()
        if folder is not None:
            folder.write("rgb", "data", stem, "jpg", rgb)
            folder.write("semseg", "data", stem, "png", semseg)
        if sink is not None:
            sink.write(stem, {"rgb.jpg": rgb, "semseg.png": semseg, "json": {"split": split, "stem": stem}})
    if sink is not None:
        sink.close()
    return len(stems)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--root", type=Path, required=True, help="ADEChallengeData2016 directory")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--format", choices=("folder", "shards", "both"), default="both")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--strict", action="store_true", help="fail on unpaired files instead of skipping them")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="do not decode annotations to check their mode and label range")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    counts = {split: convert_split(args, split) for split in SPLITS}
    print(" ".join(f"{split}: {n}" for split, n in counts.items()), f"-> {args.out}")


if __name__ == "__main__":
    main()
