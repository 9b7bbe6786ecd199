"""Finetuning and frozen-feature evaluation (cls, semseg, depth, k-NN, linear probe).

``python run_finetune.py --config FILE [key=value ...]`` is the entry point; see
:mod:`multimae_att.finetune.metrics` for the metric conventions.
"""
