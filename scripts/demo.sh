#!/usr/bin/env bash
# Set up, then run the main job: export the built-in model and answer every task on real sample images.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/rsedge demo --out out/demo "$@"
