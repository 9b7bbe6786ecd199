"""``python -m multimae_att.bench --preset tiny --out bench_tiny.json``: run, print a table, write JSON."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import multimae_att  # noqa: F401  (torchvision guard before timm)
from multimae_att.atomic import write_text_atomic
from multimae_att.run.cpu_malloc import CPU_MALLOC_CHOICES


def _count(least: int):
    """argparse type: an int >= ``least`` (a usage error otherwise, not a traceback)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
        return value
    parse.__name__ = "int"
    return parse


def main(argv: list[str] | None = None) -> int:
    from multimae_att.bench import PRESETS, format_table, run_bench

    parser = argparse.ArgumentParser(prog="python -m multimae_att.bench", description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16", "both"), default="auto",
                        help="auto = bf16 autocast where supported (CUDA bf16, CPU AMX/AVX512-BF16), else fp32")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--attn", choices=("auto", "fused", "explicit"), default="auto",
                        help="attention path of the training steps and scoring pass, as train.attention "
                             "(auto: chosen per pass; the floor is always fused)")
    parser.add_argument("--vs-upstream", metavar="PATH", default=None,
                        help="a checkout of the original MultiMAE (github.com/EPFL-VILAB/MultiMAE): "
                             "time its training step next to ours and report ours/upstream")
    parser.add_argument("--compile", action="store_true", help="torch.compile the blocks, as train.compile")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--warmup", type=_count(0), default=None, help="untimed rounds (default: the preset's)")
    parser.add_argument("--repeats", type=_count(1), default=None, help="timed rounds (default: the preset's)")
    parser.add_argument("--ab-repeats", type=_count(1), default=None,
                        help="back-to-back pairs per A/B ratio (default: --repeats)")
    parser.add_argument("--malloc", choices=CPU_MALLOC_CHOICES, default="keep",
                        help="glibc malloc thresholds for the whole process, as train.cpu_malloc (keep: no page "
                             "faults per step; default: glibc's own)")
    args = parser.parse_args(argv)
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        result = run_bench(args.preset, args.dtype, args.device, args.warmup, args.repeats, args.attn,
                           vs_upstream=args.vs_upstream, compile=args.compile,
                           ab_repeats=args.ab_repeats, malloc=args.malloc)
    except FileNotFoundError as e:  # --vs-upstream PATH is not a MultiMAE checkout
        parser.error(str(e))
    print(format_table(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out, json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
