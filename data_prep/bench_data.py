#!/usr/bin/env python
"""Measure decode + augmentation throughput (samples/s in ONE process) for both layouts.

Generates a synthetic set (``make_synthetic.py``, JPEG RGB by default, like ImageNet) if ``--data``
has none, then times the pretraining transform (rgb + depth + semseg, random-resized crop to
``--image-size``, semseg at 1/4) through ``build_loader(num_workers=0)``: the figure is what one
DataLoader worker process delivers. Torch runs with one thread, as in a worker.

Usage: ``python data_prep/bench_data.py [--data /tmp/bench_data] [--image-size 224] [--source-size 320]``
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

import multimae_att  # noqa: F401  (torchvision guard, as everywhere)
from multimae_att.data import build_loader


def bench(data: Path, layout: str, image_size: int, batch_size: int, batches: int) -> float:
    """Samples per second over ``batches`` batches after one warm-up batch."""
    loader = build_loader(data, ["rgb", "depth", "semseg"], layout=layout, batch_size=batch_size,
                          image_size=image_size, num_workers=0, seed=0)
    done, epoch = 0, 0
    start = None
    while done < batches + 1:
        loader.set_epoch(epoch)
        for _ in loader:
            done += 1
            if done == 1:
                start = time.perf_counter()  # warm-up batch excluded (file cache, imports)
            if done == batches + 1:
                break
        epoch += 1
    return batches * batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("/tmp/bench_data"))
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--source-size", type=int, default=320, help="side of the generated source images")
    p.add_argument("--rgb-format", choices=("jpg", "png"), default="jpg")
    p.add_argument("--num", type=int, default=128, help="generated training samples")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=16)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if not (args.data / ".complete").is_file():
        subprocess.run([sys.executable, str(Path(__file__).parent / "make_synthetic.py"), "--out", str(args.data),
                        "--num-train", str(args.num), "--num-val", "0", "--size", str(args.source_size),
                        "--rgb-format", args.rgb_format], check=True)
    for layout in ("folder", "shards"):
        rate = bench(args.data, layout, args.image_size, args.batch_size, args.batches)
        print(f"{layout}: {rate:.0f} samples/s per process (rgb {args.rgb_format} {args.source_size}px "
              f"-> {args.image_size}px, depth, semseg)")


if __name__ == "__main__":
    main()
