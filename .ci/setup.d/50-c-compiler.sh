#!/usr/bin/env bash
# A C compiler and Python's headers, so `make test` builds derpd's optional compiled speed-ups
# (derpd/_speedups.c, stund/_mmsg.c; see setup.py) and CI tests them next to the pure path;
# tests/deploy/test_wheel.py builds the release wheel with them (deploy/build-wheel.sh).
# Runs as root on Debian. Idempotent: does nothing (and no apt-get update) when both are there.
set -euo pipefail

py=${PYTHON:-python3}
inc=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
need=()
command -v cc >/dev/null 2>&1 || need+=(gcc)
[ -e "$inc/Python.h" ] || need+=(python3-dev)

if [ "${#need[@]}" -eq 0 ]; then
    echo "c compiler: cc and $inc/Python.h already there"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
echo "c compiler: installing ${need[*]}"
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
command -v cc >/dev/null
[ -e "$inc/Python.h" ]
echo "c compiler: installed ${need[*]}"
