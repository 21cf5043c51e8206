"""Logins per second through ``--verify-client-url``: derpd runs as its own process and asks an
admission controller in this process (the tests' headscale stand-in, with keep-alive, answering
``{"Allow":true}``) about
every login; this process also logs fresh keys in, ``--concurrency`` at a time.

Usage:  python bench/admission.py [--seconds 5] [--concurrency 16] [--json FILE]

Every key is new, so no login is served from the decision cache: each costs one controller
request.  Printed: logins/s, the relay's CPU seconds per 1,000 logins, and how many TCP
connections the controller accepted for how many requests (1 per request without pooling).
Everything is on 127.0.0.1 and bounded by --seconds plus a hard timeout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import trio

import benchlib

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from derpd import client as derp_client  # noqa: E402
from derpd.keys import NodePrivate  # noqa: E402
from derpd.protocol.errors import RemoteProtocolError  # noqa: E402
from tests.admission.fake_headscale import FakeHeadscale  # noqa: E402  (answers like headscale's /verify)

async def run(seconds: float, concurrency: int) -> dict:
    controller = FakeHeadscale(allow_all=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.serve)
        port = benchlib.free_port()
        cmd = [*benchlib.derpd_command(), "serve", "--dev", "-a", f"127.0.0.1:{port}", "--stun-port", "-1",
               "--verify-client-url", f"http://127.0.0.1:{controller.port}/verify"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            await trio.to_thread.run_sync(benchlib.wait_listening, port, proc)
            url = f"http://127.0.0.1:{port}/derp"
            logins = 0
            failures = 0

            async def worker(deadline: float) -> None:
                nonlocal logins, failures
                while trio.current_time() < deadline:
                    try:
                        async with derp_client.connect(url, NodePrivate.generate()) as c:
                            await c.ping()
                        logins += 1
                    except (derp_client.DerpClientError, RemoteProtocolError, trio.BrokenResourceError, OSError):
                        failures += 1

            with trio.fail_after(seconds + 60):
                cpu0 = benchlib.cpu_seconds(proc.pid)
                start = trio.current_time()
                async with trio.open_nursery() as n:
                    for _ in range(concurrency):
                        n.start_soon(worker, start + seconds)
                elapsed = trio.current_time() - start
                cpu = benchlib.cpu_seconds(proc.pid) - cpu0
        finally:
            proc.kill()
            proc.wait(10)
        nursery.cancel_scope.cancel()
    return {
        "logins": logins, "failures": failures, "seconds": round(elapsed, 2),
        "logins_per_s": round(logins / elapsed, 1),
        "relay_cpu_s_per_1000_logins": round(1000 * cpu / max(logins, 1), 3),
        "controller_connections": controller.connections, "controller_requests": len(controller.seen),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    result = trio.run(run, args.seconds, args.concurrency)
    print(f"logins/s {result['logins_per_s']}  ({result['logins']} in {result['seconds']}s, "
          f"{result['failures']} failed)  relay CPU {result['relay_cpu_s_per_1000_logins']} s per 1,000 logins  "
          f"controller: {result['controller_requests']} requests on {result['controller_connections']} connections")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
