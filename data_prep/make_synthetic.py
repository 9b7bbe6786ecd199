#!/usr/bin/env python
"""Generate a small, deterministic, procedural multimodal dataset (RGB, depth, semseg, class).

Each scene is a room corner seen by a pinhole camera: a back wall and a perspective floor
(checkerboard texture in floor coordinates), with 1-3 textured foreground objects standing on
the floor. Geometry is consistent across modalities: depth is the real distance along the
optical axis (floor depth grows towards the horizon, objects are nearer than what they cover
and are drawn far-to-near), object size shrinks with depth, and the semantic labels are the
same masks that paint the RGB image.

Labels (all < 133, so the 133-class MultiMAE semseg adapter accepts them unchanged):
``0`` = wall, ``1`` = floor, ``2 + k`` = object class ``k`` (k = 0..7, see ``OBJECT_CLASSES``).
The image-level class is the object class covering the most pixels. Depth is stored as a
16-bit PNG in millimetres (``multimae_att.data`` divides stored values by 2**16).

Output (``--format both``): ``OUT/{train,val}/{rgb,depth,semseg}/<k>_<name>/<stem>.png``,
``OUT/shards/{train,val}-NNNNNN.tar`` + ``{train,val}.json``, ``OUT/classes.txt``,
``OUT/semseg_classes.json`` and, last of all, the marker ``OUT/.complete``.

Usage: ``python data_prep/make_synthetic.py --out data/synthetic [--num-train 128]
[--num-val 32] [--size 96] [--seed 0] [--format folder|shards|both]``
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shard_writer import FolderWriter, ShardSink, encode_jpg, encode_png, write_classes

OBJECT_CLASSES = ("disk", "square", "triangle", "ring", "cross", "diamond", "bar", "blob")
# Base colours per object class (RGB, 0-1): RGB alone is informative, shape disambiguates.
CLASS_COLOURS = np.array(
    [[0.85, 0.20, 0.20], [0.20, 0.55, 0.90], [0.95, 0.80, 0.15], [0.25, 0.75, 0.35],
     [0.75, 0.30, 0.80], [0.95, 0.55, 0.15], [0.20, 0.80, 0.80], [0.55, 0.35, 0.20]],
    dtype=np.float32,
)
WALL, FLOOR, FIRST_OBJECT_LABEL = 0, 1, 2
CAMERA_HEIGHT_M = 1.2
SPLITS = {"train": 0, "val": 1}


def class_dir(k: int) -> str:
    """Folder name of image-level class ``k``; sorted folder order equals class order."""
    return f"{k}_{OBJECT_CLASSES[k]}"


def _shape_mask(name: str, u: np.ndarray, v: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """Boolean mask of a unit-size shape in object coordinates ``u, v`` (radius 1)."""
    au, av = np.abs(u), np.abs(v)
    if name == "disk":
        return rho < 1
    if name == "square":
        return np.maximum(au, av) < 0.85
    if name == "triangle":
        return (v < 0.8) & (v > -1.0 + 2.0 * au)  # apex up (v grows downwards)
    if name == "ring":
        return (rho < 1) & (rho > 0.55)
    if name == "cross":
        return ((au < 0.3) & (av < 1)) | ((av < 0.3) & (au < 1))
    if name == "diamond":
        return au + av < 1
    if name == "bar":
        return (au < 1) & (av < 0.35)
    # blob: a disk with a wobbly boundary
    theta = np.arctan2(v, u)
    return rho < 0.8 + 0.2 * np.sin(3 * theta)


def _background(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray):
    """Wall + floor: returns rgb [H, W, 3] float, depth [H, W] metres, labels [H, W] uint8."""
    focal = 1.1 * size
    horizon = size * rng.uniform(0.25, 0.45)
    wall_depth = rng.uniform(5.0, 8.0) + rng.uniform(-1.0, 1.0) * (xx / size - 0.5)  # tilted wall
    below = yy > horizon + 0.5
    floor_depth = np.where(below, CAMERA_HEIGHT_M * focal / np.maximum(yy - horizon, 0.5), np.inf)
    is_floor = floor_depth < wall_depth
    depth = np.where(is_floor, floor_depth, wall_depth)
    # Floor texture: checkerboard in floor coordinates (X, Z), so it shows real perspective.
    floor_x = (xx - size / 2) * depth / focal
    tile = rng.uniform(0.4, 0.8)
    checker = ((np.floor(floor_x / tile) + np.floor(depth / tile)) % 2).astype(np.float32)
    floor_a, floor_b = rng.uniform(0.25, 0.75, 3), rng.uniform(0.25, 0.75, 3)
    floor_rgb = floor_a + (floor_b - floor_a) * checker[..., None]
    # Wall texture: soft stripes of random frequency and orientation.
    angle, freq = rng.uniform(0, np.pi), rng.uniform(2, 8) / size
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    wall_base = rng.uniform(0.3, 0.9, 3)
    wall_rgb = wall_base * (0.8 + 0.2 * stripes[..., None])
    rgb = np.where(is_floor[..., None], floor_rgb, wall_rgb).astype(np.float32)
    labels = np.where(is_floor, FLOOR, WALL).astype(np.uint8)
    return rgb, depth.astype(np.float32), labels, horizon, focal


def _paint_object(rng, scene, k: int, base_y: float, horizon: float, focal: float) -> None:
    """Paint object class ``k`` standing on the floor at image row ``base_y`` (in place)."""
    rgb, depth, labels, yy, xx = scene
    size = labels.shape[0]
    dist = CAMERA_HEIGHT_M * focal / max(base_y - horizon, 0.5)
    radius_m = rng.uniform(0.25, 0.45)
    radius = radius_m * focal / dist
    cy, cx = base_y - radius, rng.uniform(0.1, 0.9) * size
    angle = rng.uniform(-0.5, 0.5)
    du, dv = (xx - cx) / radius, (yy - cy) / radius
    u = np.cos(angle) * du + np.sin(angle) * dv
    v = -np.sin(angle) * du + np.cos(angle) * dv
    rho = np.sqrt(u * u + v * v)
    # Object surface bulges towards the camera (sphere-like); always nearer than the wall/floor.
    surface = dist - radius_m * np.sqrt(np.clip(1 - rho * rho, 0, 1))
    mask = _shape_mask(OBJECT_CLASSES[k], u, v, rho) & (surface < depth)
    colour = np.clip(CLASS_COLOURS[k] + rng.normal(0, 0.06, 3), 0, 1)
    pattern = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(1.5, 3.0) * (u + (k % 3) * v))
    shade = 0.75 + 0.25 * np.clip(1 - rho, 0, 1)  # brighter centre: a cue for the bulge
    obj_rgb = colour * (shade * (0.85 + 0.15 * pattern))[..., None]
    rgb[mask] = obj_rgb[mask]
    depth[mask] = surface[mask]
    labels[mask] = FIRST_OBJECT_LABEL + k


def make_scene(seed: int, split: str, index: int, size: int):
    """One scene. Returns ``rgb`` [H, W, 3] uint8, ``depth_mm`` [H, W] uint16, ``semseg`` [H, W]
    uint8, ``cls`` int. Depends only on ``(seed, split, index, size)``."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    rgb, depth, labels, horizon, focal = _background(rng, size, yy, xx)
    num_objects = int(rng.integers(1, 4))
    classes = rng.integers(0, len(OBJECT_CLASSES), num_objects)
    # Far to near (base row grows towards the bottom): nearer objects occlude farther ones. The
    # lowest base row keeps every object under 4 m, in front of the whole wall (>= 4.5 m).
    base_rows = np.sort(rng.uniform(horizon + 0.6 * (size - horizon), size * 1.05, num_objects))
    scene = (rgb, depth, labels, yy, xx)
    for k, base_y in zip(classes, base_rows):
        _paint_object(rng, scene, int(k), float(base_y), horizon, focal)
    rgb = np.clip(rgb + rng.normal(0, 0.02, rgb.shape), 0, 1)
    counts = np.bincount(labels.ravel(), minlength=FIRST_OBJECT_LABEL + len(OBJECT_CLASSES))
    object_counts = counts[FIRST_OBJECT_LABEL:]
    # Dominant visible object; if all are occluded (rare), the nearest drawn object's class.
    cls = int(object_counts.argmax()) if object_counts.max() > 0 else int(classes[-1])
    depth_mm = np.clip(np.round(depth * 1000.0), 1, 65535).astype(np.uint16)
    return (rgb * 255 + 0.5).astype(np.uint8), depth_mm, labels, cls


def generate_split(out: Path, split: str, num: int, args: argparse.Namespace) -> None:
    """Write ``num`` scenes of ``split`` in the requested layouts."""
    folder = FolderWriter(out, split) if args.format in ("folder", "both") else None
    sink = ShardSink(out, split, maxcount=args.shard_size) if args.format in ("shards", "both") else None
    rgb_ext = args.rgb_format
    for index in tqdm(range(num), desc=f"synthetic {split}", unit="scene"):
        rgb, depth, semseg, cls = make_scene(args.seed, split, index, args.size)
        stem = f"{split}_{index:06d}"
        files = {
            "rgb": (rgb_ext, encode_png(rgb) if rgb_ext == "png" else encode_jpg(rgb)),
            "depth": ("png", encode_png(depth)),
            "semseg": ("png", encode_png(semseg)),
        }
        if folder is not None:
            for modality, (ext, data) in files.items():
                folder.write(modality, class_dir(cls), stem, ext, data)
        if sink is not None:
            members = {f"{m}.{ext}": data for m, (ext, data) in files.items()}
            members["cls"] = str(cls)
            members["json"] = {"class_name": class_dir(cls), "split": split, "stem": stem}
            sink.write(stem, members)
    if sink is not None:
        sink.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--num-train", type=int, default=128, help="number of training scenes")
    p.add_argument("--num-val", type=int, default=32, help="number of validation scenes")
    p.add_argument("--size", type=int, default=96, help="image side in pixels (square)")
    p.add_argument("--seed", type=int, default=0, help="base seed; scene i depends only on (seed, split, i)")
    p.add_argument("--format", choices=("folder", "shards", "both"), default="both")
    p.add_argument("--rgb-format", choices=("png", "jpg"), default="png",
                   help="png keeps RGB lossless (shards and folders then decode identically)")
    p.add_argument("--shard-size", type=int, default=64, help="samples per shard")
    args = p.parse_args(argv)
    if args.size < 16:
        p.error("--size must be at least 16")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out: Path = args.out
    marker = out / ".complete"
    marker.unlink(missing_ok=True)  # a partial re-run must not look complete
    write_classes(out, [class_dir(k) for k in range(len(OBJECT_CLASSES))])
    names = {WALL: "wall", FLOOR: "floor"}
    names.update({FIRST_OBJECT_LABEL + k: n for k, n in enumerate(OBJECT_CLASSES)})
    (out / "semseg_classes.json").write_text(json.dumps({str(k): v for k, v in names.items()}, indent=1))
    generate_split(out, "train", args.num_train, args)
    generate_split(out, "val", args.num_val, args)
    marker.write_text(json.dumps(vars(args), default=str, indent=1))


if __name__ == "__main__":
    main()
