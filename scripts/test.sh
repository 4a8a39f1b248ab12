#!/usr/bin/env bash
# Set up, lint, then run the fast test suite (no GPU, tiny checkpoints), then the runtime tests again on the oldest
# onnxruntime the runtime extra allows.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check rsedge tests scripts
# The tests keep their caches in a temporary XDG_CACHE_HOME: name the headers setup fetched for the kernel's tests.
export RSEDGE_ORT_INCLUDE="${XDG_CACHE_HOME:-$HOME/.cache}/rsedge/ort-include"
# An aarch64 cross compiler lets tests/test_kernels.py build the kernel for a Jetson's CPU (best effort: as root).
if ! command -v aarch64-linux-gnu-gcc >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq gcc-aarch64-linux-gnu) >/dev/null 2>&1 ||
    echo "test.sh: no aarch64 cross compiler; the Jetson build test will skip"
fi

# Bundles of each graph form and the newest onnxruntime's answers, for tests/test_ort_compat.py in both passes.
compat=$(mktemp -d)
trap 'rm -rf "$compat"' EXIT
.venv/bin/python -m tests.test_ort_compat export "$compat/bundles"
RSEDGE_COMPAT_BUNDLES="$compat/bundles" .venv/bin/python -m pytest -q "$@"

# Second pass: a venv with the oldest supported onnxruntime and no torch runs the ort_compat tests on those bundles:
# the forms it can run must answer as the newest does, the others must be refused in one line.
ort_min=$(.venv/bin/python -c "from rsedge.runtime.ort_support import MIN_SUPPORTED; print(MIN_SUPPORTED)")
numpy_req=$(.venv/bin/python -c "
from rsedge.runtime.ort_support import parse_version
print('numpy<2' if parse_version('$ort_min') < (1, 19) else 'numpy>=1.24')  # built against numpy 1 before 1.19")
old=.venv-ort-min
if ! "$old/bin/python" -c "import onnxruntime, pytest, sys; sys.exit(onnxruntime.__version__ != '$ort_min')" 2>/dev/null
then
  rm -rf "$old"
  "${PYTHON:-python3}" -m venv "$old"
  "$old/bin/python" -m pip install -q --upgrade pip
  "$old/bin/python" -m pip install -q "onnxruntime==$ort_min" "$numpy_req" "tokenizers>=0.21.1" "Pillow>=10" \
    "click>=8.1" "pytest>=8"
fi
RSEDGE_COMPAT_BUNDLES="$compat/bundles" "$old/bin/python" -m pytest -q -p no:cacheprovider -m ort_compat \
  tests/test_ort_compat.py
