#!/usr/bin/env bash
# Warms the Go caches for Pebble, Let's Encrypt's ACME test server, which tests/acme builds
# (tests/acme/pebble_harness.py: PEBBLE_VERSION; binary cached in a folder beside the interop one):
#   1. `go mod download` of github.com/letsencrypt/pebble/v2 at that version and its
#      dependencies, from the Go module proxy;
#   2. compiles cmd/pebble once (output discarded) so the pytest run only links it.
# Runs after 10-go-interop.sh, as root on a fresh machine. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
    export PATH="/usr/local/go/bin:$PATH"
fi
if ! command -v go >/dev/null 2>&1; then
    echo "pebble: Go is not installed; install it from https://go.dev/dl/ and re-run this script." >&2
    exit 1
fi
module=github.com/letsencrypt/pebble/v2
version=$(sed -n 's/^PEBBLE_VERSION = "\(v[^"]*\)"$/\1/p' tests/acme/pebble_harness.py)
[ -n "$version" ] || { echo "pebble: PEBBLE_VERSION not found in tests/acme/pebble_harness.py" >&2; exit 1; }

start=$(date +%s)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dir=$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "$module@$version" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
[ -d "$dir" ] || { echo "pebble: go mod download $module@$version failed" >&2; exit 1; }
(cd "$dir" && GOFLAGS=-mod=readonly go build -o "$work/" ./cmd/pebble)
echo "pebble: $module@$version downloaded and compiled in $(( $(date +%s) - start ))s"
