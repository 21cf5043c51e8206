"""One version string: `derpd --version`, `derpd serve -version` (derper's flag) and
`derpd serve --version` print the same line. Real processes."""

from __future__ import annotations

import subprocess
import sys

from derpd import __version__


def _out(*argv: str) -> str:
    r = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return r.stdout


def test_one_version_string() -> None:
    lines = {_out("derpd", "--version"), _out("derpd", "serve", "-version"), _out("derpd", "serve", "--version")}
    assert lines == {f"derpd {__version__}\n"}

