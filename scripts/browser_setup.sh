#!/usr/bin/env bash
# Set-up for tests/browser: Debian's Chromium (only if missing) and the Playwright Python package from PyPI into
# .cache/browser-py (kept out of .venv, so the pack's own environment stays as requirements*.txt describe it).
# Playwright drives /usr/bin/chromium; `playwright install` (its own browser download) is never used.
set -euo pipefail
cd "$(dirname "$0")/.."
PLAYWRIGHT="playwright==1.65.2"
TARGET=.cache/browser-py
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! command -v chromium >/dev/null 2>&1; then
  echo "browser-setup: installing Debian's chromium"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
fi
if [ ! -f "$TARGET/.stamp" ] || [ "$(cat "$TARGET/.stamp")" != "$PLAYWRIGHT" ]; then
  echo "browser-setup: installing $PLAYWRIGHT into $TARGET"
  rm -rf "$TARGET"
  .venv/bin/python -m pip install -q --target "$TARGET" "$PLAYWRIGHT"
  echo "$PLAYWRIGHT" > "$TARGET/.stamp"
fi
echo "browser-setup: $(chromium --version 2>/dev/null | head -1), $PLAYWRIGHT"
