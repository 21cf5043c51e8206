"""The mesh key's file is named at start, at the default log level: the one given with
--mesh-psk-file, or the one picked up from derper's default path (~/keys/derp-mesh.key), which
an operator may not know is there. Real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

MESH_KEY = "ab" * 32


def _start_lines(tmp_path: Path, *args: str) -> str:
    """Runs `derpd serve` until its start-up lines are out, then stops it; returns its stderr."""
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "derpd", "serve", "-c", str(tmp_path / "derper.key"),
                             "-a", "127.0.0.1:0", "--http-port", "-1", "--stun-port", "-1", *args],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if " relay http://" in line:
                break
    finally:
        proc.terminate()
        proc.wait(30)
    return "".join(lines)


@pytest.mark.skipif(Path("/home/derp/keys/derp-mesh.key").exists(), reason="derper's first default path is taken")
def test_a_mesh_key_from_derper_s_default_path_is_named(tmp_path: Path) -> None:
    key = tmp_path / "home" / "keys" / "derp-mesh.key"
    key.parent.mkdir(parents=True)
    key.write_text(MESH_KEY + "\n")
    out = _start_lines(tmp_path)
    assert f"mesh key from {key} (derper's default path; --mesh-psk-file names another)" in out, out


def test_a_mesh_key_file_given_is_named(tmp_path: Path) -> None:
    key = tmp_path / "mesh.key"
    key.write_text(MESH_KEY)
    out = _start_lines(tmp_path, "--mesh-psk-file", str(key))
    assert f"mesh key from {key}\n" in out, out


@pytest.mark.skipif(Path("/home/derp/keys/derp-mesh.key").exists(), reason="derper's first default path is taken")
def test_no_mesh_key_no_line(tmp_path: Path) -> None:
    out = _start_lines(tmp_path)
    assert " relay http://" in out and "mesh key" not in out, out
