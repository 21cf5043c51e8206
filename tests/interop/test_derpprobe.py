"""Tailscale's derpprobe (cmd/derpprobe, same pinned module) against derpd and stund.

One region with one node (spec 17.5): HostName ``localhost`` (derpprobe's mesh probe
needs a DNS name for SNI), TLS from the test CA passed through ``SSL_CERT_FILE``, and
STUN on 127.0.0.1 and ::1.  Every probe must report ``good``.  The map is written by
the test; mesh probes between two nodes wait for relay meshing.
"""

from __future__ import annotations

import json
import re

import pytest

from interop_harness import run_go

pytestmark = pytest.mark.interop

RESULT_LINE = re.compile(r"\b(good|bad): (\S+): (.*)$")


async def test_derpprobe_once_all_good(start_relay, start_stun, go_tools, test_ca, tmp_path) -> None:
    relay = await start_relay(tls="ca")
    stun_port = await start_stun()
    derp_map = {"Regions": {"900": {
        "RegionID": 900, "RegionCode": "interop", "RegionName": "interop",
        "Nodes": [{"Name": "900a", "RegionID": 900, "HostName": "localhost",
                   "IPv4": "127.0.0.1", "IPv6": "::1",
                   "DERPPort": relay.port, "STUNPort": stun_port}]}}}
    map_file = tmp_path / "derpmap.json"
    map_file.write_text(json.dumps(derp_map))

    argv = [go_tools.derpprobe, f"-derp-map=file://{map_file}", "-once", "-spread=false"]
    code, out, err = await run_go(argv, env={"SSL_CERT_FILE": str(test_ca.ca_file)})
    results = {m.group(2): (m.group(1), m.group(3))
               for m in map(RESULT_LINE.search, (out + err).splitlines()) if m}
    explain = f"`{' '.join(argv)}` exited {code}; results {json.dumps(results, indent=1)}\n{err[-3000:]}"
    bad = {name: detail for name, (status, detail) in results.items() if status != "good"}
    assert not bad, explain
    assert code == 0, explain
    assert set(results) == {
        "derpmap-probe",
        "derp/interop/900a/tls",
        "derp/interop/900a/udp",
        "derp/interop/900a/udp6",
        "derp/interop/900a/900a/mesh",
    }, explain
