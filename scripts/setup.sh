#!/usr/bin/env bash
# Sets up everything the server needs, once: the espeak-ng program and a Python virtual environment
# in .venv with requirements.txt (plus requirements-dev.txt when called with --dev). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v espeak-ng >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "espeak-ng is missing: install it with your package manager (Debian/Ubuntu: apt-get install espeak-ng)" >&2; exit 1
  fi
  if command -v apt-get >/dev/null 2>&1; then
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq espeak-ng >/dev/null
  else
    echo "espeak-ng is missing: install it with your package manager" >&2; exit 1
  fi
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed-$(cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)${1:-}"
if [ ! -e "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  if [ "${1:-}" = "--dev" ]; then .venv/bin/python -m pip install -q -r requirements-dev.txt; fi
  touch "$stamp"
fi
