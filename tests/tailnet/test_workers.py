"""``derpd serve --workers 2``: both tailscaled connect to the same port, wherever the
kernel places them (one worker or two, meshed over loopback), and transfer.  The parent
serves the sum of its workers' metrics on --metrics-addr, re-scraped every 2 s."""

from __future__ import annotations

from pathlib import Path

import pytest

from .tailnet_harness import BLOB_SIZE

pytestmark = [pytest.mark.interop, pytest.mark.slow]

METRICS = "127.0.0.1:9100"  # the parent serves the sum of the workers' metrics here


def test_two_workers_one_port(make_tailnet, blob: tuple[Path, str]) -> None:
    net = make_tailnet("workers")
    a, b = net.two_nodes(relay_args=["--workers", "2", "--metrics-addr", METRICS])
    net.pings_via_derp(a, b)
    t = net.transfer(a, b, blob)
    m = net.metrics_when(lambda m: m.get("derp_bytes_received_total", 0.0) >= BLOB_SIZE,
                         url=f"http://{METRICS}/metrics")
    between = m["derp_bytes_forwarded_out_total"]
    print(f"50 MB through 2 workers: {t.seconds:.2f} s, {t.mbit_s:.1f} Mbit/s; the nodes were on "
          f"{'two workers' if between > 1e6 else 'one worker'} ({between / 1e6:.1f} MB forwarded between them)")
    assert m["derp_current_home_connections"] == 2, m
