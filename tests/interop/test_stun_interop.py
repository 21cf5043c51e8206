"""tailscale.com/net/stun and net/netcheck against our STUN server (stund)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.interop


async def test_stun_ipv4_and_ipv6(start_stun, scenario) -> None:
    port = await start_stun()
    r = await scenario("stun", "--addr", f"127.0.0.1:{port}", "--addr", f"[::1]:{port}")
    v4, v6 = r.data["results"]
    assert v4["family"] == 4 and v4["mapped"] == v4["local"]
    assert v6["family"] == 6 and v6["mapped"] == v6["local"]
    assert v4["response_len"] == 32, "IPv4 clients should get the family-1 (32-byte) answer (spec 14.2)"
    assert v6["response_len"] == 44


async def test_netcheck_reports_udp_address_and_latency(start_stun, scenario, tmp_path) -> None:
    """netcheck measures every region over UDP and learns the address it sent from.

    The map is written by the test; the coordinator-published map is covered by
    test_derpprobe.py once the coordinator can serve one for a given relay.
    """
    port = await start_stun()
    derp_map = {"Regions": {
        "900": {"RegionID": 900, "RegionCode": "ia", "RegionName": "interop A", "Nodes": [
            {"Name": "900a", "RegionID": 900, "HostName": "localhost",
             "IPv4": "127.0.0.1", "IPv6": "::1", "STUNPort": port}]},
        "901": {"RegionID": 901, "RegionCode": "ib", "RegionName": "interop B", "Nodes": [
            {"Name": "901a", "RegionID": 901, "HostName": "localhost",
             "IPv4": "127.0.0.1", "IPv6": "::1", "STUNPort": port}]},
    }}
    map_file = tmp_path / "derpmap.json"
    map_file.write_text(json.dumps(derp_map))
    r = await scenario("netcheck", "--derpmap", f"file://{map_file}", "--want-ipv6")
    assert r.data["udp"] is True
    assert r.data["ipv4"] is True and r.data["ipv6"] is True
    assert r.data["global_v4"] == r.data["local_v4"]
    assert r.data["global_v6"] == r.data["local_v6"]
    assert set(r.data["region_latency_ms"]) == {"900", "901"}
    assert r.data["preferred_derp"] in (900, 901)
