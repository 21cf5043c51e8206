#!/usr/bin/env bash
# Makes Go usable for the interop suite (tests/interop) and warms its caches, so the
# pytest run only links binaries instead of downloading and compiling tailscale.com.
#   1. finds `go` (PATH or /usr/local/go/bin) and checks it is new enough for go.mod;
#   2. `go mod download` in tests/interop (modules come from the Go module proxy);
#   3. compiles the programs the suite builds (derpinterop, derpprobe, and derper, which
#      test_mesh_interop.py meshes with derpd), to warm GOCACHE (output discarded).
# Runs as root on a fresh machine. Idempotent; network access is only the module proxy.
set -euo pipefail
cd "$(dirname "$0")/../../tests/interop"

if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
    export PATH="/usr/local/go/bin:$PATH"
    # Later CI steps run in fresh shells; give them the same go on PATH.
    ln -sf /usr/local/go/bin/go /usr/local/bin/go
    ln -sf /usr/local/go/bin/gofmt /usr/local/bin/gofmt
fi
if ! command -v go >/dev/null 2>&1; then
    echo "go-interop: Go is not installed. Install Go >= $(awk '/^go /{print $2}' go.mod) from https://go.dev/dl/" \
         "(tar -C /usr/local -xzf go*.linux-amd64.tar.gz) and re-run this script." >&2
    exit 1
fi

need=$(awk '/^go /{print $2}' go.mod)
have=$(go env GOVERSION | sed 's/^go//')
if [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -n1)" != "$need" ]; then
    # GOTOOLCHAIN=auto (the default) would fetch a newer toolchain through the proxy;
    # say so rather than let it happen silently.
    echo "go-interop: go.mod needs Go $need, this machine has $have; Go will try to download" \
         "toolchain go$need from the module proxy (set GOTOOLCHAIN=local to forbid that)." >&2
fi

echo "go-interop: $(go version); downloading modules for $(awk '$1=="tailscale.com"||$2=="tailscale.com"{print $NF}' go.mod | head -n1)"
start=$(date +%s)
GOFLAGS=-mod=readonly go mod download
echo "go-interop: modules ready in $(( $(date +%s) - start ))s"

# Same tags and packages as tests/interop/interop_harness.py, so its build hits the cache.
start=$(date +%s)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
GOFLAGS=-mod=readonly go build -tags ts_debug_websockets -o "$out/" \
    ./cmd/derpinterop tailscale.com/cmd/derpprobe tailscale.com/cmd/derper
echo "go-interop: build cache warm in $(( $(date +%s) - start ))s"
