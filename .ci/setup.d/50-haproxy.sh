#!/usr/bin/env bash
# Installs Debian's HAProxy for tests/proxy (derpd behind an SNI router on a shared :443, with
# the PROXY protocol). Only the binary is used: the tests run their own haproxy on loopback
# ports, so the packaged service is stopped and not started at boot.
# Runs as root on Debian bookworm. Idempotent: does nothing (and no apt-get update) when present.
set -euo pipefail

if command -v haproxy >/dev/null 2>&1; then
    echo "haproxy: already installed ($(haproxy -v | head -n1))"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
echo "haproxy: installing"
apt-get update -qq
# A policy-rc.d that says 101 keeps the package's service from starting during the install.
# Use the machine's own if it has one (container images do); otherwise add one and remove it after.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get install -y -qq --no-install-recommends haproxy >/dev/null
command -v systemctl >/dev/null 2>&1 && systemctl disable --now haproxy >/dev/null 2>&1 || true
command -v haproxy >/dev/null
echo "haproxy: installed ($(haproxy -v | head -n1))"
