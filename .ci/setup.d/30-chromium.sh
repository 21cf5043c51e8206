#!/usr/bin/env bash
# Installs headless Chromium (Debian `chromium`) for the coordinator's browser test
# (tests/coordinator/test_status_browser.py loads /status and checks a dead node shows as down).
# Runs as root on Debian. Idempotent: does nothing (and no apt-get update) when chromium is present.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    echo "chromium: already installed ($(chromium --version 2>/dev/null || echo 'version unknown'))"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
echo "chromium: installing"
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
command -v chromium >/dev/null
echo "chromium: installed ($(chromium --version 2>/dev/null || echo 'version unknown'))"
