#!/usr/bin/env python
"""Pack ImageNet-1K images with MultiMAE's pseudo labels (depth, 133-class COCO semseg) into shards.

Inputs:
* ``--imagenet DIR``: ``DIR/<split>/<wnid>/*.JPEG`` (or ``DIR/<wnid>/*.JPEG`` directly);
* ``--pseudo-labels DIR``: per modality (``depth``, ``semseg``) a folder found as
  ``DIR/<modality>``, ``DIR/<split>/<modality>`` or ``DIR/<modality>/<split>``, holding per class
  either a folder ``<wnid>/<stem>.png`` or a tar ``<wnid>.tar`` (members ``.../<stem>.png``; read
  in place through the tar index, no extraction).

Samples are paired by file stem within each class; stems lacking a modality are reported
(first few + count) and left out. The class index is the position of the wnid in the sorted
list (written to ``OUT/classes.txt``). Samples are written in a seeded random order, so a
shard holds many classes and a modest shuffle buffer mixes well.

Output: ``OUT/shards/<split>-NNNNNN.tar`` (``KEY.rgb.jpg`` as stored, ``KEY.depth.png``,
``KEY.semseg.png``, ``KEY.cls``, ``KEY.json``), ``OUT/shards/<split>.json`` and ``.keys.txt``;
with semseg, ``OUT/semseg_classes.json``: the 133 COCO-panoptic class names by label index (the
training pictures name the classes from it).

Usage: ``python data_prep/imagenet_to_shards.py --imagenet DIR --pseudo-labels DIR --out DIR``
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tarfile
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shard_writer import ShardSink, index_files, pair_by_stem, report_unpaired, write_classes

TarRef = tuple[Path, int, int]  # (tar path, data offset, size)
FileRef = Path | TarRef
IMAGE_EXTS = (".jpeg", ".jpg", ".png")
# MultiMAE's semseg pseudo labels are Mask2Former's COCO-panoptic semantic output (arg-max over its
# 133 channels): label k = the k-th category of COCO panoptic sorted by category id (80 things,
# then 53 stuff), detectron2's contiguous ids.
COCO_PANOPTIC_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
    "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush", "banner", "blanket", "bridge",
    "cardboard", "counter", "curtain", "door-stuff", "floor-wood", "flower", "fruit", "gravel", "house",
    "light", "mirror-stuff", "net", "pillow", "platform", "playingfield", "railroad", "river", "road",
    "roof", "sand", "sea", "shelf", "snow", "stairs", "tent", "towel", "wall-brick", "wall-stone",
    "wall-tile", "wall-wood", "water-other", "window-blind", "window-other", "tree-merged", "fence-merged",
    "ceiling-merged", "sky-other-merged", "cabinet-merged", "table-merged", "floor-other-merged",
    "pavement-merged", "mountain-merged", "grass-merged", "dirt-merged", "paper-merged",
    "food-other-merged", "building-other-merged", "rock-merged", "wall-other-merged", "rug-merged",
)


def read_ref(ref: FileRef) -> bytes:
    """Bytes of a plain file or of a tar member located by its data offset."""
    if isinstance(ref, Path):
        return ref.read_bytes()
    path, offset, size = ref
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def index_tar(path: Path) -> dict[str, TarRef]:
    """stem -> (path, offset, size) for the PNG members of an uncompressed tar."""
    with tarfile.open(path, "r:") as tar:
        return {Path(m.name).stem: (path, m.offset_data, m.size) for m in tar.getmembers()
                if m.isfile() and m.name.lower().endswith(".png")}


def find_modality_root(base: Path, modality: str, split: str) -> Path:
    """The pseudo-label folder of ``modality``: the most specific of the accepted layouts."""
    candidates = (base / split / modality, base / modality / split, base / modality)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no {modality} pseudo labels under {base}; tried {[str(c) for c in candidates]}")


def index_class(root: Path, wnid: str) -> dict[str, FileRef]:
    """Pseudo-label files of one class: folder ``root/wnid/`` or tar ``root/wnid.tar`` (empty if none)."""
    if (root / wnid).is_dir():
        return dict(index_files(root / wnid, (".png",)))
    if (root / f"{wnid}.tar").is_file():
        return dict(index_tar(root / f"{wnid}.tar"))
    return {}


def collect(args: argparse.Namespace) -> tuple[list[str], list[tuple[str, int, dict[str, FileRef]]]]:
    """Class names and the paired samples ``(stem, class index, modality -> ref)``."""
    images_root = args.imagenet / args.split if (args.imagenet / args.split).is_dir() else args.imagenet
    wnids = sorted(p.name for p in images_root.iterdir() if p.is_dir())
    if not wnids:
        raise FileNotFoundError(f"no class folders in {images_root}")
    label_roots = {m: find_modality_root(args.pseudo_labels, m, args.split) for m in args.modalities}
    samples, unpaired = [], 0
    for cls, wnid in enumerate(tqdm(wnids, desc="indexing classes", unit="class")):
        indexes: dict[str, dict[str, FileRef]] = {"rgb": dict(index_files(images_root / wnid, IMAGE_EXTS))}
        indexes.update({m: index_class(root, wnid) for m, root in label_roots.items()})
        stems, missing = pair_by_stem(indexes)
        unpaired += report_unpaired(f"{args.split}/{wnid}", missing) if missing else 0
        samples.extend((stem, cls, {m: ix[stem] for m, ix in indexes.items()}) for stem in stems)
    print(f"{len(samples)} paired samples in {len(wnids)} classes, {unpaired} unpaired files left out")
    return wnids, samples


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--imagenet", type=Path, required=True, help="ImageNet root (with <split>/<wnid>/)")
    p.add_argument("--pseudo-labels", type=Path, required=True, help="MultiMAE pseudo-label root")
    p.add_argument("--out", type=Path, required=True, help="output directory (shards/ and classes.txt)")
    p.add_argument("--split", default="train")
    p.add_argument("--modalities", default="depth,semseg", help="pseudo-label modalities to pack")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep class order")
    args = p.parse_args(argv)
    args.modalities = [m for m in args.modalities.split(",") if m]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    wnids, samples = collect(args)
    write_classes(args.out, wnids)
    if "semseg" in args.modalities:
        names = {str(k): name for k, name in enumerate(COCO_PANOPTIC_CLASSES)}
        (args.out / "semseg_classes.json").write_text(json.dumps(names, indent=1) + "\n")
    if args.shuffle:
        random.Random(args.seed).shuffle(samples)
    with ShardSink(args.out, args.split, args.shard_size) as sink:
        for stem, cls, refs in tqdm(samples, desc=f"writing {args.split}", unit="img"):
            rgb_ext = "png" if isinstance(refs["rgb"], Path) and refs["rgb"].suffix.lower() == ".png" else "jpg"
            members = {f"rgb.{rgb_ext}": read_ref(refs["rgb"])}
            members.update({f"{m}.png": read_ref(refs[m]) for m in args.modalities})
            members["cls"] = str(cls)
            members["json"] = {"wnid": wnids[cls], "stem": stem}
            sink.write(stem, members)
    print(f"wrote {sink.num_samples} samples -> {args.out / 'shards'}")


if __name__ == "__main__":
    main()
