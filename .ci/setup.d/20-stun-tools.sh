#!/usr/bin/env bash
# Installs the third-party STUN tools that tests/stund and bench/stun.py drive:
#   coturn      -> turnutils_stunclient, turnutils_natdiscovery, turnserver (bench comparison)
#   stun-client -> stun (classic RFC 3489 client)
# Runs as root on Debian bookworm. Idempotent: does nothing (and no apt-get update) when all are present.
set -euo pipefail

need=()
command -v turnutils_stunclient >/dev/null 2>&1 || need+=(coturn)
command -v stun >/dev/null 2>&1 || need+=(stun-client)

if [ "${#need[@]}" -eq 0 ]; then
    echo "stun tools: coturn and stun-client already installed"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
echo "stun tools: installing ${need[*]}"
apt-get update -qq
# coturn's package does not start turnserver unless /etc/default/coturn enables it.
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
command -v turnutils_stunclient >/dev/null
command -v stun >/dev/null
echo "stun tools: installed ${need[*]}"
