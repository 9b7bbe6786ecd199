"""What several test modules share (importable as ``helpers`` through pytest's ``pythonpath``).

``helpers.pretrain``: the pretraining CLI on tiny synthetic data (in process, or as a process that
can be killed); ``helpers.finetune``: the finetuning CLI on its synthetic configs;
``helpers.prep``: data_prep scripts as modules, the synthetic set in both layouts;
``helpers.upstream``: the original MultiMAE code, imported from ``MULTIMAE_SRC``.
Fixtures are imported by name into the modules that use them (autouse ones included).
"""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository root (tests/helpers/ -> .)
