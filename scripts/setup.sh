#!/usr/bin/env bash
# Sets up everything the server needs, once: the espeak-ng program, a Python virtual environment in .venv
# with requirements.txt (plus requirements-dev.txt when called with --dev), and, when Node.js is installed,
# the browser client built into frontend_nextjs/out. With --dev also Chromium, for the browser test.
# Safe to re-run: each part is redone only when its inputs change.
set -euo pipefail
cd "$(dirname "$0")/.."

# apt_install PACKAGE: installs a Debian/Ubuntu package, as root or with sudo, or says how to install it.
apt_install() {
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "$1 is missing: install it with your package manager (Debian/Ubuntu: apt-get install $1)" >&2; exit 1
  fi
  if command -v apt-get >/dev/null 2>&1; then
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "$1" >/dev/null
  else
    echo "$1 is missing: install it with your package manager" >&2; exit 1
  fi
}

if ! command -v espeak-ng >/dev/null 2>&1; then
  apt_install espeak-ng
fi
if [ "${1:-}" = "--dev" ] && [ ! -x "${CHROMIUM_PATH:-/usr/bin/chromium}" ]; then
  apt_install chromium
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

# The browser client: npm ci when package-lock.json changes, npm run build when any of its files do.
# Without Node.js 20.9+ the server still runs; it just serves no page (other clients can still connect).
if command -v npm >/dev/null 2>&1 \
    && node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 9) ? 0 : 1)'; then
  installed="frontend_nextjs/node_modules/.installed-$(cksum < frontend_nextjs/package-lock.json | cut -d' ' -f1)"
  if [ ! -e "$installed" ]; then
    (cd frontend_nextjs && npm ci --no-audit --no-fund --loglevel=error)
    touch "$installed"
  fi
  # Every file of the client but its dependencies and what the build writes.
  sources=$(find frontend_nextjs \( -name node_modules -o -name .next -o -name out -o -name next-env.d.ts \
    -o -name '*.tsbuildinfo' \) -prune -o -type f -print | LC_ALL=C sort)
  built="frontend_nextjs/node_modules/.built-$( (echo "$sources"; echo "$sources" | xargs cat) | cksum | cut -d' ' -f1)"
  if [ ! -e "$built" ] || [ ! -e frontend_nextjs/out/index.html ]; then
    if ! log=$(cd frontend_nextjs && npm run build 2>&1); then echo "$log" >&2; exit 1; fi
    rm -f frontend_nextjs/node_modules/.built-*
    touch "$built"
  fi
else
  echo "note: no Node.js 20.9+, so the browser client (frontend_nextjs/) is not built" >&2
fi
