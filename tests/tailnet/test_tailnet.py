"""Two tailscaled joined by headscale, every packet through one derpd relay.

One tailnet for the module (starting it takes seconds): derpd (TLS, test CA), the
coordinator serving its map, headscale reading the map with ``derp.urls``, nodes a and b
with ``TS_DEBUG_ALWAYS_USE_DERP=1``.  (test_mesh.py has headscale read the map through
``derp.paths`` instead.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .tailnet_harness import BLOB_SIZE, REGION_CODE, REGION_ID

pytestmark = [pytest.mark.interop, pytest.mark.slow]

VIA_DERP = f"DERP({REGION_CODE})"


@pytest.fixture(scope="module")
def tailnet(two_node_tailnet):
    return two_node_tailnet


def test_ping_answers_via_our_region(tailnet) -> None:
    net, a, b = tailnet
    pongs = net.pings_via_derp(a, b)
    assert [p.via for p in pongs] == [VIA_DERP, VIA_DERP]


def test_status_lists_both_nodes_with_our_region_home(tailnet) -> None:
    net, a, b = tailnet
    a.ping(b.ip())  # both homes are known to the peer once a disco ping went through
    for me, peer in ((a, b), (b, a)):
        st = me.status()
        assert st["BackendState"] == "Running", st["BackendState"]
        assert st["Self"]["HostName"] == me.name
        assert st["Self"]["Relay"] == REGION_CODE, json.dumps(st["Self"])
        peers = {p["HostName"]: p for p in st["Peer"].values()}
        assert set(peers) == {peer.name}, list(peers)
        assert peers[peer.name]["Relay"] == REGION_CODE, json.dumps(peers[peer.name])
        assert peers[peer.name]["CurAddr"] == "", "a direct path exists, so not everything goes through DERP"


def test_netcheck_reports_our_region_with_a_latency(tailnet) -> None:
    net, a, b = tailnet
    out = a.cli("netcheck", "--format=json", timeout=60).stdout
    report = json.loads(out[out.index("{"):])
    print(json.dumps({k: report.get(k) for k in ("UDP", "PreferredDERP", "RegionLatency")}))
    assert report["PreferredDERP"] == REGION_ID, out
    latency_ns = report["RegionLatency"][str(REGION_ID)]
    assert 0 < latency_ns < 5e9, out


def test_metrics_count_the_packets(tailnet) -> None:
    net, a, b = tailnet
    before = net.metrics()
    a.ping(b.ip())
    b.ping(a.ip())
    after = net.metrics()

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    print({n: grew(n) for n in ("derp_packets_received_total", "derp_packets_sent_total")})
    assert after["derp_current_connections"] >= 2, after
    assert after["derp_current_home_connections"] == 2, after
    assert grew("derp_packets_received_total") >= 4, (before, after)  # a ping and a pong each way at least
    assert grew("derp_packets_sent_total") >= 4, (before, after)


def test_50mb_through_the_relay(tailnet, blob: tuple[Path, str]) -> None:
    net, a, b = tailnet
    before = net.metrics()
    t = net.transfer(a, b, blob)
    after = net.metrics()
    relayed = after["derp_bytes_received_total"] - before["derp_bytes_received_total"]
    print(f"50 MB b -> a: {t.seconds:.2f} s, {t.mbit_s:.1f} Mbit/s, relay received {relayed / 1e6:.1f} MB")
    assert t.nbytes == BLOB_SIZE
    assert relayed >= BLOB_SIZE, "the data did not go through derpd"
