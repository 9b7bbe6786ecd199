#!/usr/bin/env python
"""Finetune or evaluate a (Multi)MAE encoder: ``python run_finetune.py --config FILE [key=value ...]``.

Tasks (``task.name``): cls, semseg, depth, linear_probe, knn; see README "Finetuning".
Multi-GPU: ``python -m multimae_att.launch --multi_gpu --num_processes 2 run_finetune.py ...``.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> dict:
    import multimae_att  # noqa: F401  (torchvision guard before timm)
    from multimae_att.config import ConfigError, cli_config
    from multimae_att.finetune.config import FinetuneConfig
    from multimae_att.finetune.engine import end_distributed, run
    from multimae_att.run.lifecycle import RUNNER_FLAGS, RunFolderError

    cfg = cli_config(FinetuneConfig, argv, description=__doc__, flags=RUNNER_FLAGS)
    try:
        return run(cfg)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except RunFolderError as e:
        sys.exit(f"error: {e}")
    finally:
        end_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
