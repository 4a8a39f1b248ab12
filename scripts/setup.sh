#!/usr/bin/env bash
# Create .venv and install rsedge with its export and dev extras (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev,runtime]"
# onnxruntime's C API header, for rsedge's own attention kernel (rsedge/kernels; built on first use). Without it
# onnxruntime's attention runs: slower decode on a CPU, same answers.
bash scripts/fetch_ort_headers.sh || echo "setup: onnxruntime headers not fetched; rsedge's CPU attention kernel stays off"
