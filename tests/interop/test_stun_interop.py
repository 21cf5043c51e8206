"""tailscale.com/net/stun and net/netcheck against our STUN server (stund)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.interop


async def test_stun_ipv4_and_ipv6(start_stun, scenario) -> None:
    port = await start_stun()
    r = await scenario("stun", "--addr", f"127.0.0.1:{port}", "--addr", f"[::1]:{port}")
    v4, v6 = r.data["results"]
    assert v4["family"] == 4 and v4["mapped"] == v4["local"]
    assert v6["family"] == 6 and v6["mapped"] == v6["local"]
    # XOR-MAPPED-ADDRESS (family 1 for IPv4, spec 14.2) plus the FINGERPRINT the request carried
    assert v4["response_len"] == 40
    assert v6["response_len"] == 52


async def test_netcheck_against_coordinator_map(start_stun, start_coordinator, scenario) -> None:
    """netcheck, fed the coordinator's map, measures every region over UDP (IPv4 and
    IPv6), learns the exact address it sent from, and picks one of our regions as home."""
    port = await start_stun()
    node = {"hostname": "localhost", "ipv4": "127.0.0.1", "ipv6": "::1", "stun_port": port}
    map_url = await start_coordinator([
        {"id": 900, "code": "ia", "name": "interop A", "nodes": [{"name": "900a", **node}]},
        {"id": 901, "code": "ib", "name": "interop B", "nodes": [{"name": "901a", **node}]},
    ])
    r = await scenario("netcheck", "--derpmap", map_url, "--want-ipv6")
    assert r.data["udp"] is True
    assert r.data["ipv4"] is True and r.data["ipv6"] is True
    assert r.data["global_v4"] == r.data["local_v4"]
    assert r.data["global_v6"] == r.data["local_v6"]
    latency = r.data["region_latency_ms"]
    assert set(latency) == {"900", "901"}, "a latency for every region of the map"
    assert all(ms > 0 for ms in latency.values()), latency
    # The home region netcheck picks is one of ours, and the fastest one (the scenario
    # also checks this on netcheck's own durations, before rounding to JSON).
    home = r.data["preferred_derp"]
    assert home in (900, 901), f"netcheck chose home region {home}, not one of ours"
    assert latency[str(home)] == min(latency.values()), latency
