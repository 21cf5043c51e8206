"""Health frames seen by a real tailscaled: the relay's text appears in `tailscale status --json`
(its Health list, "The relay server #N is reporting an issue: ...") while the problem lasts,
and is gone after it ends.

The problem driven here is the receive rate limit (``--rate-config``): node b serves a file to
node a through the relay, faster than the limit allows.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from .tailnet_harness import Node, make_blob

pytestmark = [pytest.mark.interop, pytest.mark.slow]

RATE = 300_000  # bytes/s per client: the 3 MB file takes about 10 s
FILE_SIZE = 3_000_000


@pytest.fixture(scope="module")
def limited(new_tailnet):
    net = new_tailnet("health")
    try:
        cfg = net.workdir / "rate.json"
        cfg.write_text(json.dumps({"PerClientRateLimitBytesPerSec": RATE, "PerClientRateBurstBytes": RATE}))
        a, b = net.two_nodes(relay_args=["--rate-config", str(cfg)])
        yield net, a, b
    finally:
        net.close()


def relay_warnings(node: Node) -> list[str]:
    return [h for h in node.status().get("Health") or [] if "relay server" in h.lower()]


def test_rate_limited_node_shows_the_relay_text_until_it_stops_sending(limited, tmp_path: Path) -> None:
    net, a, b = limited
    net.pings_via_derp(a, b)
    assert not relay_warnings(b), relay_warnings(b)
    path = tmp_path / "file.bin"
    digest = make_blob(path, FILE_SIZE)
    outcome: dict[str, object] = {}
    done = threading.Event()

    def fetch() -> None:
        try:
            outcome["transfer"] = net.transfer(a, b, (path, digest), timeout=120)
        except BaseException as e:  # noqa: BLE001 - reported below
            outcome["error"] = e
        finally:
            done.set()

    worker = threading.Thread(target=fetch, daemon=True)
    start = time.monotonic()
    worker.start()
    seen = None
    while seen is None and time.monotonic() - start < 120:
        seen = next((w for w in relay_warnings(b) if "--rate-config" in w), None)
        if seen is None:
            done.wait(0.5)
    seen_after = time.monotonic() - start
    worker.join(130)
    assert "error" not in outcome, outcome.get("error")
    transfer = outcome["transfer"]
    ended = time.monotonic()
    print(f"b sees: {seen!r} {seen_after:.1f} s into the transfer ({transfer.seconds:.1f} s, "
          f"{transfer.mbit_s:.2f} Mbit/s)")
    assert seen is not None, f"no relay warning on b during the transfer: {b.status().get('Health')}"
    assert "300 kB/s" in seen
    while relay_warnings(b) and time.monotonic() - ended < 60:
        time.sleep(0.5)
    print(f"gone {time.monotonic() - ended:.1f} s after the transfer ended")
    assert not relay_warnings(b), relay_warnings(b)
    metrics = net.metrics()
    assert metrics["derp_health_frames_total"] >= 2 and metrics["derp_rate_limit_waits_total"] > 0
