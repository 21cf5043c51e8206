"""Restart: SIGTERM derpd in the middle of a 50 MB transfer, start it again on the same
port with the same key; both nodes are back "via DERP" within RECONNECT_BOUND seconds
and a new transfer succeeds."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from .tailnet_harness import BLOB_SIZE, PORTS, REGION_CODE, Transfer

pytestmark = [pytest.mark.interop, pytest.mark.slow]

RECONNECT_BOUND = 30.0  # seconds from the new relay listening to a pong via DERP both ways


def test_relay_restart_mid_transfer(make_tailnet, blob: tuple[Path, str]) -> None:
    net = make_tailnet("restart")
    a, b = net.two_nodes()
    net.serve_file(blob[0])
    relay = next(p for p in net.procs if p.name == "relay")

    halfway = threading.Event()
    interrupted: dict[str, Transfer | BaseException] = {}

    def fetch() -> None:
        try:
            interrupted["result"] = a.fetch(b.ip(), PORTS["blob"], timeout=120, progress=halfway,
                                            progress_at=BLOB_SIZE // 4)
        except BaseException as exc:  # reported below
            interrupted["result"] = exc

    worker = threading.Thread(target=fetch)
    worker.start()
    try:
        assert halfway.wait(60), f"the first transfer did not reach {BLOB_SIZE // 4} bytes\n{net.tails()}"
        code = net.stop(relay)  # SIGTERM: a Restarting frame to each client, 1 s to drain, exit 0
        assert code == 0, f"derpd exited {code} on SIGTERM\n{relay.tail()}"
        t_restart = time.monotonic()
        net.start_relay()
        t_listening = time.monotonic()
        pongs = [a.ping(b.ip(), count=12, timeout=70), b.ping(a.ip(), count=12, timeout=70)]
        back = time.monotonic() - t_listening
    finally:
        worker.join(130)
    print(f"restart: listening again after {t_listening - t_restart:.2f} s, both nodes via DERP "
          f"{back:.2f} s later ({pongs[0].line}; {pongs[1].line})")
    first = interrupted.get("result")
    intact = isinstance(first, Transfer) and first.nbytes == BLOB_SIZE and first.sha256 == blob[1]
    print(f"the interrupted transfer {'completed intact' if intact else 'did not complete'}: {first!r}")
    if isinstance(first, Transfer) and first.nbytes == BLOB_SIZE:
        assert intact, "the interrupted transfer delivered 50 MB with the wrong sha256"
    for pong in pongs:
        assert pong.via == f"DERP({REGION_CODE})", pong.line
    assert back < RECONNECT_BOUND, f"reconnecting took {back:.1f} s"

    t = net.transfer(a, b, blob)
    print(f"after the restart: 50 MB in {t.seconds:.2f} s, {t.mbit_s:.1f} Mbit/s")
    assert t.nbytes == BLOB_SIZE
