"""Tailscale's derpprobe (cmd/derpprobe, same pinned module) against derpd and stund.

The map comes from derpd's coordinator: one region with one node (spec 17.5), HostName
``localhost`` (derpprobe's mesh probe needs a DNS name for SNI), TLS from the test CA
passed through ``SSL_CERT_FILE``, and STUN on 127.0.0.1 and ::1.  Every probe must
report ``good``.  A two-node region (mesh probes between nodes) waits for relay meshing.
"""

from __future__ import annotations

import json
import re

import pytest

from .interop_harness import run_go

pytestmark = pytest.mark.interop

RESULT_LINE = re.compile(r"\b(good|bad): (\S+): (.*)$")


async def test_derpprobe_once_all_good(start_relay, start_stun, start_coordinator, go_tools,
                                       test_ca) -> None:
    relay = await start_relay(tls="ca")
    stun_port = await start_stun()
    map_url = await start_coordinator([{"id": 900, "code": "interop", "name": "interop", "nodes": [
        {"name": "900a", "hostname": "localhost", "ipv4": "127.0.0.1", "ipv6": "::1",
         "derp_port": relay.port, "stun_port": stun_port}]}])

    argv = [go_tools.derpprobe, f"-derp-map={map_url}", "-once", "-spread=false"]
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
