#!/usr/bin/env python
"""Convert the labelled NYU Depth v2 set (``nyu_depth_v2_labeled.mat``) to our layouts.

Inputs:
* ``nyu_depth_v2_labeled.mat``: MATLAB v7.3 = HDF5, read with h5py one sample at a time (the file
  is ~2.8 GB). MATLAB stores arrays transposed: ``images`` is ``[N, 3, W, H]`` uint8, ``depths``
  ``[N, W, H]`` float32 metres, ``labels`` ``[N, W, H]`` uint16 (0 = unlabeled, 1..894), optional
  ``rawDepths`` ``[N, W, H]`` (0 where the sensor gave no reading). Per sample:
  ``images[i].transpose(2, 1, 0)`` -> ``[H, W, 3]``, ``depths[i].T`` -> ``[H, W]`` (480 x 640).
* ``splits.mat`` (MATLAB v5, scipy): ``trainNdxs`` (795) and ``testNdxs`` (654), 1-based.
* ``classMapping40.mat``: ``mapClass`` (894 entries, value 1..40 for class 1..894).

Outputs (``--format both``):
* ``OUT/{train,test}/{rgb,depth,semseg,mask_valid}/data/<index>.png``, ``index`` = 0-based
  position in the .mat, 4 digits;
* rgb: 8-bit PNG; depth: **16-bit PNG in millimetres** (``round(metres * 1000)``, so the loader's
  ``stored / 2**16`` gives metres * 1000 / 65536; 0 stays 0 = no depth); semseg: 8-bit PNG with
  40 classes 1..40 and 0 = unlabeled; mask_valid: 8-bit PNG, 255 where the raw (not inpainted)
  depth is valid (``rawDepths > 0``; ``depths > 0`` when the file has no ``rawDepths``);
* ``OUT/shards/{train,test}-NNNNNN.tar`` with members ``KEY.rgb.png``, ``KEY.depth.png``,
  ``KEY.semseg.png``, ``KEY.mask_valid.png``, ``KEY.json`` (KEY = the 4-digit index).

Usage: ``python data_prep/prepare_nyuv2.py --mat nyu_depth_v2_labeled.mat --splits splits.mat
--mapping classMapping40.mat --out data/nyuv2 [--format folder|shards|both]``
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np
import scipy.io
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shard_writer import FolderWriter, ShardSink, encode_png

NUM_CLASSES = 40


def load_splits(path: Path) -> dict[str, np.ndarray]:
    """0-based indices per split from ``splits.mat`` (stored 1-based, as floats)."""
    mat = scipy.io.loadmat(str(path))
    out = {}
    for split, key in (("train", "trainNdxs"), ("test", "testNdxs")):
        if key not in mat:
            raise KeyError(f"{path}: no {key!r} (keys: {sorted(k for k in mat if not k.startswith('__'))})")
        out[split] = np.asarray(mat[key]).astype(np.int64).ravel() - 1
    return out


def load_mapping(path: Path) -> np.ndarray:
    """Lookup table ``[895]`` uint8: 894-class label -> 40-class label, entry 0 (unlabeled) -> 0."""
    mat = scipy.io.loadmat(str(path))
    if "mapClass" not in mat:
        raise KeyError(f"{path}: no 'mapClass' (keys: {sorted(k for k in mat if not k.startswith('__'))})")
    mapping = np.asarray(mat["mapClass"]).astype(np.int64).ravel()
    if mapping.min() < 0 or mapping.max() > NUM_CLASSES:
        raise ValueError(f"{path}: mapClass values must be in 0..{NUM_CLASSES}, got {mapping.min()}..{mapping.max()}")
    return np.concatenate([[0], mapping]).astype(np.uint8)


def read_sample(f: h5py.File, index: int, lut: np.ndarray) -> dict[str, np.ndarray]:
    """One sample as HWC/HW arrays: rgb uint8, depth_mm uint16, semseg uint8 (40 classes), mask uint8."""
    rgb = np.ascontiguousarray(f["images"][index].transpose(2, 1, 0))  # [3, W, H] -> [H, W, 3]
    depth_m = np.asarray(f["depths"][index]).T  # [W, H] -> [H, W]
    labels = np.asarray(f["labels"][index]).T.astype(np.int64)
    if labels.max() >= len(lut):
        raise ValueError(f"sample {index}: label {labels.max()} is outside mapClass (size {len(lut) - 1})")
    valid_from = np.asarray(f["rawDepths"][index]).T if "rawDepths" in f else depth_m
    depth_mm = np.clip(np.round(np.nan_to_num(depth_m) * 1000.0), 0, 65535).astype(np.uint16)
    mask = np.where(np.nan_to_num(valid_from) > 0, 255, 0).astype(np.uint8)
    return {"rgb": rgb, "depth": depth_mm, "semseg": lut[labels], "mask_valid": mask}


def convert(args: argparse.Namespace) -> dict[str, int]:
    """Write every split; returns the number of samples per split."""
    splits = load_splits(args.splits)
    lut = load_mapping(args.mapping)
    counts = {}
    with h5py.File(args.mat, "r") as f:
        for key in ("images", "depths", "labels"):
            if key not in f:
                raise KeyError(f"{args.mat}: no {key!r} dataset (keys: {sorted(f.keys())})")
        n = f["images"].shape[0]
        for split, indices in splits.items():
            if indices.size and (indices.min() < 0 or indices.max() >= n):
                raise ValueError(f"{args.splits}: {split} indices out of range 1..{n}")
            if args.limit:
                indices = indices[: args.limit]
            folder = FolderWriter(args.out, split) if args.format in ("folder", "both") else None
            sink = ShardSink(args.out, split, args.shard_size) if args.format in ("shards", "both") else None
            for index in tqdm(indices, desc=f"nyuv2 {split}", unit="img"):
                arrays = read_sample(f, int(index), lut)
                stem = f"{int(index):04d}"
                encoded = {m: encode_png(a) for m, a in arrays.items()}
                if folder is not None:
                    for modality, data in encoded.items():
                        folder.write(modality, "data", stem, "png", data)
                if sink is not None:
                    members = {f"{m}.png": data for m, data in encoded.items()}
                    members["json"] = {"split": split, "index": int(index), "depth_unit": "mm"}
                    sink.write(stem, members)
            if sink is not None:
                sink.close()
            counts[split] = len(indices)
    return counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mat", type=Path, required=True, help="nyu_depth_v2_labeled.mat (HDF5)")
    p.add_argument("--splits", type=Path, required=True, help="splits.mat (trainNdxs, testNdxs; 1-based)")
    p.add_argument("--mapping", type=Path, required=True, help="classMapping40.mat (mapClass: 894 -> 40)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--format", choices=("folder", "shards", "both"), default="both")
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    p.add_argument("--limit", type=int, default=0, help="convert only the first N samples per split (debug)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    counts = convert(args)
    print(" ".join(f"{split}: {n}" for split, n in counts.items()), f"-> {args.out}")


if __name__ == "__main__":
    main()
