#!/usr/bin/env bash
# Set up (first run only) and start the server; arguments go to s2s_server_pipeline.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python s2s_server_pipeline.py "$@"
