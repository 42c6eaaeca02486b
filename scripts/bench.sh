#!/usr/bin/env bash
# Set up (first run only) and run the benchmark; arguments go to bench/run.py (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
exec .venv/bin/python bench/run.py "$@"
