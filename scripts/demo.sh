#!/usr/bin/env bash
# Install the package (torch/torchvision pinned), generate the synthetic dataset and run the
# continual-pretraining demo on the CPU (a few minutes on 2 cores). Extra arguments are config
# overrides (key=value), e.g. `bash scripts/demo.sh masking.strategy=amt output_dir=runs/demo_amt`.
# A finished run folder is resumed, i.e. left as is: delete runs/demo to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
python -m pip install -q -c constraints.txt -e ".[test]"
DATA=${DATA:-data/synthetic}
if [ ! -f "$DATA/.complete" ]; then
  python data_prep/make_synthetic.py --out "$DATA" --format both
fi
python run_pretrain.py --config configs/pretrain/demo.yaml data.root="$DATA" "$@"
echo "demo done: see runs/demo/ (metrics.jsonl, pictures/, checkpoints/, final.pth) unless output_dir was overridden"
