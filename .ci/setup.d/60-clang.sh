#!/usr/bin/env bash
# clang and its compiler-rt, for fuzz/run.sh: the C extensions built with
# -fsanitize=fuzzer-no-link,address so that atheris (libFuzzer) sees the C's coverage.
# Runs as root on Debian. Idempotent: does nothing (and no apt-get update) when clang is there.
set -euo pipefail

have_clang() {
    local cc
    cc=$(command -v clang || ls /usr/bin/clang-[0-9]* 2>/dev/null | sort -V | tail -1 || true)
    [ -n "$cc" ] && echo 'int main(void){return 0;}' | "$cc" -x c -fsanitize=fuzzer-no-link,address -o /dev/null - 2>/dev/null
}

if have_clang; then
    echo "clang: already there"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Debian 12 names the version: clang-14 with libclang-rt-14-dev (the sanitizer runtimes)
ver=$(apt-cache policy clang | sed -n 's/^ *Candidate: *1:\([0-9]*\).*/\1/p')
ver=${ver:-14}
echo "clang: installing clang-$ver libclang-rt-$ver-dev"
apt-get install -y -qq --no-install-recommends "clang-$ver" "libclang-rt-$ver-dev" >/dev/null
have_clang
echo "clang: installed clang-$ver"
