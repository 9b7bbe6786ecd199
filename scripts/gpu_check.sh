#!/usr/bin/env bash
# The GPU figures of docs/BENCHMARKS.md in one run (budget: under 8 minutes on one modern GPU;
# not yet timed on one):
# the base bench preset in bf16, host syncs per step, three 200-step ViT-B pretraining runs at
# 224 px on synthetic scenes (fresh scoring pass, attention cache, AMT) and, with two GPUs, the
# 2-process equality check. Prints s/step, samples/s, efficiency, peak memory and the ratios;
# writes runs/gpu_check/summary.json. Needs the package importable (pip install -e . or PYTHONPATH).
#   bash scripts/gpu_check.sh                         # on a CUDA machine
#   MULTIMAE_SRC=/path/to/MultiMAE bash scripts/gpu_check.sh   # + the original's step (bench)
#   bash scripts/gpu_check.sh --dry-run               # CPU, toy sizes: tests the script itself
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
exec python -m multimae_att.bench.gpu_check "$@"
