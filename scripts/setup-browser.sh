#!/usr/bin/env bash
# Installs the headless browser the `serve` browser test drives over WebDriver: Debian's
# `chromium` + `chromium-driver` packages (no browser download from anywhere else).
# Idempotent: does nothing when `chromedriver` and `chromium` are already on PATH.
set -euo pipefail
if command -v chromedriver >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1; then
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
echo "setup-browser: installing chromium + chromium-driver (apt)" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
