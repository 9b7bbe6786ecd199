#!/usr/bin/env bash
# Install the package (torch/torchvision pinned), generate the synthetic dataset and run the
# continual-pretraining demo on the CPU. Extra arguments are config overrides (key=value).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
python -m pip install -q -c constraints.txt -e ".[test]"
DATA=${DATA:-data/synthetic}
if [ ! -f "$DATA/.complete" ]; then
  python data_prep/make_synthetic.py --out "$DATA" --format both
fi
python run_pretrain.py --config configs/pretrain/demo.yaml data.root="$DATA" "$@"
