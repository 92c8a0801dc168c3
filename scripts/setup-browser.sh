#!/usr/bin/env bash
# Installs what the browser test needs when missing: Debian's Chromium (apt, as root or through
# sudo) and playwright-core from tests/browser/package-lock.json (npm, no browser download).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x "${CHROMIUM:-/usr/bin/chromium}" ]; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  # playwright-core never downloads browsers; the test uses Debian's.
  npm ci --prefix tests/browser --no-audit --no-fund --silent
fi
