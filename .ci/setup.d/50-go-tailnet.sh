#!/usr/bin/env bash
# Prepares the tailnet suite (tests/tailnet): headscale and two tailscaled relaying through
# derpd inside a private network namespace.
#   1. installs the namespace tools if missing (unshare, nsenter: util-linux; ip: iproute2);
#   2. builds tailscaled and tailscale (the tailscale.com version tests/interop pins) and
#      headscale (HEADSCALE_VERSION in tests/tailnet/tailnet_harness.py), each inside its
#      downloaded module directory, into the suite's binary cache, so pytest finds them ready.
# Runs as root on a fresh machine after 10-go-interop.sh (which puts go on PATH).
# Idempotent: a warm run finds the cached binaries and compiles nothing. Network access is
# Debian's mirror (only when a tool is missing) and the Go module proxy.
set -euo pipefail
cd "$(dirname "$0")/../.."

need=()
command -v unshare >/dev/null 2>&1 && command -v nsenter >/dev/null 2>&1 || need+=(util-linux)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
    echo "go-tailnet: installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
    export PATH="/usr/local/go/bin:$PATH"
fi
# The build helper is plain Python (no venv needed); it prints one line with the time taken.
python3 -m tests.tailnet.tailnet_harness build
