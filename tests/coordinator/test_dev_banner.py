"""`derpd dev`'s banner as a real process: it says where derpprobe comes from (the Tailscale
release tests/interop pins), and its `derpd check` line works as printed."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import trio

from derpd.devregion import DERPPROBE_MODULE

GO_MOD = Path(__file__).resolve().parents[1] / "interop" / "go.mod"


def test_derpprobe_comes_from_the_pinned_tailscale_release() -> None:
    pinned = re.search(r"(?m)^\s*tailscale\.com (v\S+)$", GO_MOD.read_text())
    assert pinned, GO_MOD.read_text()
    assert DERPPROBE_MODULE == f"tailscale.com/cmd/derpprobe@{pinned.group(1)}"


async def test_the_banner_s_lines_work_as_printed(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            proc = await nursery.start(lambda task_status: trio.run_process(
                [sys.executable, "-m", "derpd", "dev", "--dir", str(tmp_path), "--derp-port", "0",
                 "--stun-port", "0", "--map-port", "0"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False, task_status=task_status))
            out = b""
            while b"headscale config" not in out:
                chunk = await proc.stdout.receive_some(65536)
                assert chunk, (out + await proc.stderr.receive_some(65536)).decode()
                out += chunk
            banner = out.decode()
            assert f"(install: go install {DERPPROBE_MODULE})" in banner, banner
            line = next(ln for ln in banner.splitlines() if ln.strip().startswith("derpd check "))
            words = shlex.split(line)
            result = await trio.run_process([sys.executable, "-m", *words, "-n", "20"], capture_stdout=True,
                                            capture_stderr=True, check=False)
            proc.send_signal(signal.SIGINT)
            await proc.wait()
    assert result.returncode == 0 and b"delivered 20/20" in result.stdout, result.stdout + result.stderr
