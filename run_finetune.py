#!/usr/bin/env python
"""Finetune or evaluate a (Multi)MAE encoder: ``python run_finetune.py --config FILE [key=value ...]``.

Tasks (``task.name``): cls, semseg, depth, linear_probe, knn; see README "Finetuning".
Multi-GPU: ``python -m multimae_att.launch --multi_gpu --num_processes 2 run_finetune.py ...``.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> dict:
    """Exit status 0, or non-zero with one line ``config error: ...`` (before any work) or
    ``data error: ...``: corrupt evaluation samples (``data.eval_on_corrupt=error``), or samples
    left out of the metrics with ``data.eval_on_corrupt=skip`` (after metrics.json is written,
    listing them in ``skipped_eval_samples``)."""
    import multimae_att  # noqa: F401  (torchvision guard before timm)
    from multimae_att.config import ConfigError, cli_config
    from multimae_att.finetune.config import FinetuneConfig
    from multimae_att.finetune.engine import end_distributed, run
    from multimae_att.finetune.skips import CorruptEvalData
    from multimae_att.run.lifecycle import RunFolderError, runner_parser

    cfg = cli_config(FinetuneConfig, argv, parser=runner_parser(__doc__))
    try:
        result = run(cfg)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except CorruptEvalData as e:
        sys.exit(f"data error: {e}")
    except RunFolderError as e:
        sys.exit(f"error: {e}")
    finally:
        end_distributed()
    skipped = result.get("skipped_eval_samples") or []
    if skipped and cfg.data.eval_on_corrupt == "skip":
        sys.exit(f"data error: the evaluation left out {len(skipped)} corrupt sample(s), listed in "
                 f"{cfg.output_dir}/metrics.json (skipped_eval_samples; the reasons are in the log): "
                 f"{skipped[:5]}; data.eval_on_corrupt=skip_ok accepts them with exit status 0")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
