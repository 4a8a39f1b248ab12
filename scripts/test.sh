#!/usr/bin/env bash
# Set up, lint, then run the fast test suite (no GPU, tiny checkpoints).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check rsedge tests scripts
.venv/bin/python -m pytest -q -m "not slow" "$@"
