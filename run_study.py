#!/usr/bin/env python
"""Ablation studies in one command: ``python run_study.py --config configs/study/FILE.yaml [key=value ...]``.

Variants x seeds x evaluations, every cell an ordinary run folder of run_pretrain.py /
run_finetune.py; ``--dry-run`` prints the plan, ``--jobs N`` runs N cells at once,
``--launcher submitit`` submits Slurm jobs. See docs/STUDY.md.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from multimae_att.study.cli import main as study_main

    return study_main(argv)


if __name__ == "__main__":
    sys.exit(main())
