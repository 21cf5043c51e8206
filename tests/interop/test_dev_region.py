"""`derpd dev` (the README's main job) as a real process, probed by Tailscale's derpprobe with
the exact command line it prints: every probe must be good, then Ctrl-C stops it cleanly."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys

import pytest
import trio

from .interop_harness import run_go

pytestmark = pytest.mark.interop


async def test_derpprobe_against_derpd_dev(go_tools, tmp_path, nursery) -> None:
    proc = await nursery.start(lambda task_status: trio.run_process(
        [sys.executable, "-m", "derpd", "dev", "--dir", str(tmp_path), "--derp-port", "0", "--stun-port", "0",
         "--map-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False, task_status=task_status))
    banner = b""
    with trio.fail_after(30):
        while b"derpprobe -derp-map=" not in banner or not banner.endswith(b"\n"):
            chunk = await proc.stdout.receive_some(4096)
            assert chunk, f"derpd dev exited early:\n{banner.decode()}"
            banner += chunk
    text = banner.decode()
    line = next(ln for ln in text.splitlines() if "derpprobe -derp-map=" in ln).strip()
    words = shlex.split(line)
    env = dict(w.split("=", 1) for w in words if re.match(r"^[A-Z_]+=", w))
    argv = [go_tools.derpprobe] + [w for w in words if not re.match(r"^[A-Z_]+=", w)][1:]
    code, out, err = await run_go(argv, env=env)
    results = re.findall(r"\b(good|bad): (\S+):", out + err)
    assert results and all(status == "good" for status, _ in results), f"{text}\n{out}\n{err[-3000:]}"
    assert code == 0
    names = {name for _, name in results}
    assert {"derpmap-probe", "derp/dev/900a/tls", "derp/dev/900a/udp", "derp/dev/900a/900a/mesh"} <= names, names
    proc.send_signal(signal.SIGINT)
    with trio.fail_after(15):
        rest = b""
        while chunk := await proc.stdout.receive_some(4096):
            rest += chunk
        assert await proc.wait() == 0, rest.decode()
    assert b"stopped" in rest
