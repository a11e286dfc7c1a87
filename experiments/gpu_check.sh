#!/usr/bin/env bash
# The GPU check (experiments/gpu_check.py): training throughput of WRN-28-10 TRADES-10 in bf16 through ssat's
# Lightning module and a plain PyTorch loop, FAISS k-means and the torch GMM on 1M x 640, one batch of every stage
# of experiment=cifar10_paper trainer=gpu. One command, one JSON on stdout (progress on stderr):
#   experiments/gpu_check.sh [--tiny] [--json out.json] [--batch 256 --rows 1000000 ...]
# Uses .venv/bin/python when the checkout has one (make install), else $PYTHON or python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" experiments/gpu_check.py "$@"
