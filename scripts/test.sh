#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite; arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
# Test files run in parallel, each file on one worker (its tests share their servers). Most tests wait on sockets and
# real-time audio, not on the CPU (with one worker per core, 2 cores stay about half idle): two workers per core, at
# most 8. A later -n in the arguments wins (-n 0: one process).
workers=$(( $(nproc) * 2 ))
[ "$workers" -le 8 ] || workers=8
exec .venv/bin/python -m pytest -n "$workers" --dist loadfile tests "$@"
