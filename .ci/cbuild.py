"""Builds derpd's three C extensions with a chosen compiler and flags, outside setuptools.

    python .ci/cbuild.py DEST [--cc clang] [--cflags "..."] [--ldflags "..."]

writes DEST/derpd/_speedups*.so, DEST/derpd/_dataplane*.so and DEST/stund/_mmsg*.so (the names
this Python imports).  DEST is usually a copy of the source tree (.ci/sanitize.sh, fuzz/run.sh),
or the tree itself ("." for a quick rebuild in place).  Fails on the first compiler error.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import sysconfig

SOURCES = {"derpd/_speedups": "derpd/_speedups.c", "derpd/_dataplane": "derpd/_dataplane.c",
           "stund/_mmsg": "stund/_mmsg.c"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dest")
    ap.add_argument("--cc", default=os.environ.get("CC", "cc"))
    ap.add_argument("--cflags", default="-O2 -g")
    ap.add_argument("--ldflags", default="")
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    include = sysconfig.get_paths()["include"]
    for mod, src in SOURCES.items():
        out = os.path.join(args.dest, mod + suffix)
        cmd = [args.cc, "-shared", "-fPIC", "-Wall", "-Werror", "-I" + include, *shlex.split(args.cflags),
               os.path.join(root, src), "-o", out, *shlex.split(args.ldflags)]
        print("cbuild:", " ".join(cmd), flush=True)
        if subprocess.call(cmd) != 0:
            print(f"cbuild: {src} did not compile", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
