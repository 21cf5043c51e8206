"""The ``derpd serve`` options of admission and rate limiting fail early with a useful message."""

from __future__ import annotations

import subprocess
import sys


def test_bad_files_and_urls_stop_serve_before_listening(tmp_path):
    bad = tmp_path / "allow"
    bad.write_text("nodekey:xyz\n")
    for args, words in (
        (["--allow-keys", str(tmp_path / "missing")], "--allow-keys"),
        (["--allow-keys", str(bad)], "line 1"),
        (["--rate-config", str(tmp_path / "missing.json")], "--rate-config"),
        (["--verify-client-url", "ftp://x"], "http://"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "derpd", "serve", "--dev", "-a", "127.0.0.1:0", "--stun-port", "-1", *args],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )
        assert result.returncode == 2, result.stderr
        assert words in result.stderr
