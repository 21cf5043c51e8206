#!/usr/bin/env bash
# Coverage-guided fuzzing that reaches the C: builds the three extensions with clang
# (-fsanitize=fuzzer-no-link,address) into a copy of the tree, so that libFuzzer (through
# atheris) sees the C's edges and AddressSanitizer checks its memory, then runs the targets
# that drive the C -- fuzz/engine.py (derpd._dataplane.Engine over socketpairs) and
# fuzz/stun.py (stund._mmsg's answer against stund.binding) -- for SECONDS each, starting
# from fuzz/corpus/<target> (copied: the repository's corpus is not changed).  Prints the
# coverage each reached (libFuzzer's "cov:" figure); fails on a crash or a sanitizer report.
#
#   fuzz/run.sh [SECONDS] [TARGET...]      (needs the venv with atheris, and clang:
#                                           .ci/setup.d/60-clang.sh)
#   FUZZ_MERGE=1 fuzz/run.sh ...           also merges what the run found into fuzz/corpus/<target>
#                                           (libFuzzer's -merge=1: only inputs with new coverage)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
py=${PYTHON:-$root/.venv/bin/python}
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(engine stun)
cc=${FUZZ_CC:-$(command -v clang || ls /usr/bin/clang-[0-9]* 2>/dev/null | sort -V | tail -1)}
[ -n "$cc" ] || { echo "fuzz: no clang: run .ci/setup.d/60-clang.sh" >&2; exit 2; }
atheris_dir=$("$py" -c 'import atheris; print(atheris.path())' 2>/dev/null) || {
    echo "fuzz: atheris is not installed in $py (pip install -e '.[test]'; atheris supports CPython 3.11)" >&2
    exit 2
}
work=$(mktemp -d "${TMPDIR:-/tmp}/derpd-fuzz.XXXXXX")
[ "${FUZZ_KEEP:-0}" = 1 ] || trap 'rm -rf "$work"' EXIT

tar -C "$root" --exclude=.git --exclude=.venv --exclude='*.so' --exclude=build --exclude='__pycache__' \
    --exclude=.hypothesis --exclude=.pytest_cache -cf - . | tar -C "$work" -xf -
"$py" .ci/cbuild.py "$work" --cc "$cc" \
    --cflags="-O1 -g -fno-omit-frame-pointer -fsanitize=fuzzer-no-link,address" >/dev/null

rc=0
for t in "${targets[@]}"; do
    mkdir -p "$work/corpus-$t" "$work/out-$t"
    cp "$root/fuzz/corpus/$t"/* "$work/corpus-$t/"
    set +e
    (
        cd "$work/out-$t"
        export LD_PRELOAD="$atheris_dir/asan_with_fuzzer.so"
        export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1"
        "$py" "$work/fuzz/$t.py" -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 \
            -artifact_prefix="$work/out-$t/" "$work/corpus-$t"
    ) >"$work/out-$t/log" 2>&1
    status=$?
    set -e
    grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)' "$work/out-$t/log" | sed "s/^/fuzz $t: /" || true
    if [ $status -ne 0 ] || ls "$work/out-$t"/crash-* "$work/out-$t"/leak-* "$work/out-$t"/timeout-* >/dev/null 2>&1; then
        echo "fuzz $t: FINDING (exit $status)"
        grep -v '^WARNING: Failed to find function' "$work/out-$t/log" | tail -60
        for f in "$work/out-$t"/crash-* "$work/out-$t"/timeout-*; do
            [ -e "$f" ] && { echo "input $(basename "$f"):"; od -An -tx1 "$f" | head -20; }
        done
        rc=1
    elif [ "${FUZZ_MERGE:-0}" = 1 ]; then
        # libFuzzer's merge runs the target again as a command (argv[0]): make the copy one
        sed -i "1i #!$py" "$work/fuzz/$t.py"
        chmod +x "$work/fuzz/$t.py"
        (
            cd "$work/out-$t"
            export LD_PRELOAD="$atheris_dir/asan_with_fuzzer.so"
            export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1"
            "$py" "$work/fuzz/$t.py" -merge=1 "$root/fuzz/corpus/$t" "$work/corpus-$t"
        ) >"$work/out-$t/merge.log" 2>&1 || { tail -20 "$work/out-$t/merge.log"; rc=1; }
        grep -E 'MERGE-OUTER: [0-9]+ new files' "$work/out-$t/merge.log" | sed "s/^/fuzz $t: /" || true
    fi
done
exit $rc
