#!/usr/bin/env bash
# Install the package (torch/torchvision and ruff pinned), lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
python -m pip install -q -c constraints.txt -e ".[test]"
python -m ruff check .   # lint and import order (pyproject.toml)
python -m pytest -q "$@"
