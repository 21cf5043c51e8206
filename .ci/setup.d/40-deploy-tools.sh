#!/usr/bin/env bash
# Installs the tools tests/deploy drives and caches the container base image:
#   systemd     -> systemd-analyze verify (deploy/systemd units)
#   prometheus  -> promtool check rules, and a real Prometheus scraping a relay
#   buildah     -> builds deploy/container/Containerfile (--isolation chroot)
#   debootstrap -> a Debian bookworm root with python3, imported as the image's BASE
# The base root is cached as /var/cache/derpd-ci/bookworm-python3.tar and reused when present.
# Runs as root on Debian bookworm. Idempotent: no apt-get update when everything is installed.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
cache=/var/cache/derpd-ci
base_tar=$cache/bookworm-python3.tar

need=()
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v buildah >/dev/null 2>&1 || need+=(buildah)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)

if [ "${#need[@]}" -gt 0 ]; then
    echo "deploy tools: installing ${need[*]}"
    start=$(date +%s)
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    echo "deploy tools: installed in $(( $(date +%s) - start ))s"
else
    echo "deploy tools: systemd-analyze, promtool, buildah and debootstrap already installed"
fi
command -v systemd-analyze promtool prometheus buildah debootstrap >/dev/null

# The Debian package starts a system Prometheus on :9090; the tests run their own on
# loopback port 0 and need no daemon.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true
fi

# debootstrap must fetch from the mirror apt uses (the only one reachable in CI).
mirror() {
    local uri
    uri=$(grep -hE '^\s*URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
          | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)
    if [ -z "$uri" ]; then
        uri=$(grep -hE '^\s*deb\s' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
              | awk '{for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' \
              | grep -E '/debian/?$' | head -n1 || true)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

if [ -s "$base_tar" ]; then
    echo "deploy tools: base root cached ($base_tar, $(du -h "$base_tar" | cut -f1))"
    exit 0
fi

mkdir -p "$cache"
root=$(mktemp -d "$cache/root.XXXXXX")
trap 'rm -rf "$root"' EXIT
url=$(mirror)
echo "deploy tools: debootstrap bookworm from $url"
start=$(date +%s)
# minbase + python3 (with venv/pip for the image's builder stage) and CA certificates; no
# compiler: the build stage installs gcc and python3-dev itself, the final image has none.
debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$root" "$url" >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" --numeric-owner -cf "$base_tar.tmp" .
mv "$base_tar.tmp" "$base_tar"
echo "deploy tools: base root cached ($base_tar, $(du -h "$base_tar" | cut -f1)) in $(( $(date +%s) - start ))s"
