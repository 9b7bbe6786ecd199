"""Continual pretraining of MultiMAE: ``python run_pretrain.py --config FILE [key=value ...]``.

Multi-process: ``python -m multimae_att.launch --multi_gpu --num_processes N run_pretrain.py ...``
(``accelerate launch`` where torchvision loads normally). See README "Pretraining".
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    import multimae_att  # noqa: F401  (torchvision guard before timm)
    from multimae_att.config import ConfigError, cli_config
    from multimae_att.pretrain.config import PretrainConfig
    from multimae_att.pretrain.loop import train
    from multimae_att.run.lifecycle import RunFolderError, runner_parser
    from multimae_att.run.trainer import end_distributed

    cfg = cli_config(PretrainConfig, argv, parser=runner_parser(__doc__.splitlines()[0]))
    try:
        train(cfg)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except RunFolderError as e:
        sys.exit(f"error: {e}")
    finally:
        end_distributed()


if __name__ == "__main__":
    main()
