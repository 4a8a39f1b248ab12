#!/usr/bin/env bash
# The GPU machine's side of scripts/gpu_check.py: onnxruntime-gpu arrives as xz parts (the machine has no
# package index and each call carries at most 64 MiB), is unpacked once, and shadows the CPU build.
#   ORT_PARTS: folder of the parts (default /tmp/ortparts); SRC: the rsedge tree to run (default: this one)
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${SRC:-$PWD}
SITE=${ORT_SITE:-/tmp/ortgpu-site}
if [ ! -d "$SITE/onnxruntime" ]; then
  mkdir -p "$SITE"
  cat "${ORT_PARTS:-/tmp/ortparts}"/part-* | xz -dc | tar -x -C "$SITE"
fi
export PYTHONPATH="$SITE:$SRC${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
python3 "$SRC/scripts/gpu_check.py" "$@"
