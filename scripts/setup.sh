#!/usr/bin/env bash
# Sets up everything the server needs, once: the espeak-ng program, a Python virtual environment in .venv with
# requirements.txt and requirements-turn.txt (plus requirements-rag.txt and requirements-dev.txt when called with
# --dev), and, when Node.js is installed, the browser client built into frontend_nextjs/out. With --dev also what
# only the tests use: Chromium (the browser test), nginx (the scale-out test) and openssl (certificates for the TLS
# test).
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
if [ "${1:-}" = "--dev" ] && ! command -v openssl >/dev/null 2>&1; then
  apt_install openssl
fi
# nginx, for tests/test_scale_out.py, which runs its own nginx as this user on free ports. Debian's package would
# also start a system nginx on port 80 as it installs: a policy-rc.d that answers 101 ("action forbidden"), which
# invoke-rc.d and deb-systemd-invoke both honour, keeps it stopped. It exists only during the install (one already
# there, as in most containers, is left as it is); `systemctl disable` then keeps nginx from starting at boot.
if [ "${1:-}" = "--dev" ] && ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  as_root=""; [ "$(id -u)" = 0 ] || as_root="sudo"
  if [ -e /usr/sbin/policy-rc.d ] || { [ -n "$as_root" ] && ! command -v sudo >/dev/null 2>&1; }; then
    apt_install nginx
  else
    printf '#!/bin/sh\nexit 101\n' | $as_root tee /usr/sbin/policy-rc.d >/dev/null && $as_root chmod 755 /usr/sbin/policy-rc.d
    status=0; (apt_install nginx) || status=$?
    $as_root rm -f /usr/sbin/policy-rc.d
    [ "$status" = 0 ] || exit "$status"
  fi
  if [ -d /run/systemd/system ]; then $as_root systemctl disable --quiet nginx 2>/dev/null || true; fi
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed-$(cat requirements.txt requirements-turn.txt requirements-rag.txt requirements-dev.txt | cksum | cut -d' ' -f1)${1:-}"
if [ ! -e "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  .venv/bin/python -m pip install -q --no-deps -r requirements-turn.txt
  # The tests cover the RAG agent too (s2s_server_pipeline_rag.py), so --dev installs what it adds.
  if [ "${1:-}" = "--dev" ]; then .venv/bin/python -m pip install -q -r requirements-rag.txt -r requirements-dev.txt; fi
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
