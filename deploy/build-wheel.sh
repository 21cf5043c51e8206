#!/usr/bin/env bash
# Builds derpd's sdist and wheel from this repository into OUTDIR (default: dist/).
#
#   deploy/build-wheel.sh [OUTDIR]          (or: make wheel)
#
# The build tools come from deploy/build-requirements.lock, hash-checked, into a throw-away venv,
# and the build runs without isolation: nothing unpinned is downloaded. The wheel is built from
# the sdist, so a file missing from the sdist fails here. The wheel must hold the three compiled
# extensions (derpd._speedups, derpd._dataplane, stund._mmsg): it needs a C compiler and
# Python's headers (Debian: gcc python3-dev). PYTHON picks the interpreter (default python3).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$repo/dist}")
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$python" -m venv "$work/env"
"$work/env/bin/pip" install --quiet --disable-pip-version-check --require-hashes \
    -r "$repo/deploy/build-requirements.lock"
if ! "$work/env/bin/python" -m build --no-isolation --outdir "$work/dist" "$repo" >"$work/build.log" 2>&1; then
    cat "$work/build.log" >&2
    echo "build-wheel: building the sdist and wheel failed (log above)" >&2
    exit 1
fi
"$work/env/bin/python" - "$work/dist" <<'PY'
import pathlib, sys, zipfile
dist = pathlib.Path(sys.argv[1])
(wheel,) = dist.glob("derpd-*.whl")
names = zipfile.ZipFile(wheel).namelist()
want = ("derpd/_speedups.", "derpd/_dataplane.", "stund/_mmsg.")
lack = [w.rstrip(".") for w in want if not any(n.startswith(w) and n.endswith(".so") for n in names)]
if lack:
    sys.exit(f"build-wheel: {wheel.name} lacks {', '.join(lack)}: install a C compiler and Python's "
             "headers (Debian: gcc python3-dev) and build again")
PY
mkdir -p "$out"
for f in "$work"/dist/*; do
    cp "$f" "$out/"
    echo "$out/$(basename "$f")"
done
