"""Tailscale's derpprobe (cmd/derpprobe, same pinned module) against a two-node derpd region.

The map comes from derpd's coordinator: one region with two nodes (spec 17.5), both with
HostName ``localhost`` (derpprobe's mesh probe needs a DNS name for SNI) and their own
DERPPort and STUNPort, TLS from the test CA passed through ``SSL_CERT_FILE``.  The two
relays are meshed (``run_mesh``, same mesh key), so the cross-node probes
``derp/<code>/900a/900b/mesh`` and ``900b/900a`` go through ForwardPacket.  Every probe must
report ``good``, run once as an ordinary client and once with ``-mesh-psk-file`` (derpprobe's
clients then log in as mesh peers, spec 6.1).
"""

from __future__ import annotations

import json
import re

import pytest

from .interop_harness import run_go, write_mesh_key

pytestmark = pytest.mark.interop

RESULT_LINE = re.compile(r"\b(good|bad): (\S+): (.*)$")
NODES = ("900a", "900b")


@pytest.fixture
async def two_node_region(start_meshed_relays, start_stun, start_coordinator):
    """Two meshed TLS relays, STUN for each, and the coordinator's map of them."""
    relays = await start_meshed_relays(len(NODES))
    stun_ports = [await start_stun() for _ in NODES]
    map_url = await start_coordinator([{"id": 900, "code": "interop", "name": "interop", "nodes": [
        {"name": name, "hostname": "localhost", "ipv4": "127.0.0.1", "ipv6": "::1",
         "derp_port": relay.port, "stun_port": stun_port}
        for name, relay, stun_port in zip(NODES, relays, stun_ports, strict=True)]}])
    return map_url, relays


@pytest.mark.parametrize("as_mesh_peer", [False, True], ids=["client", "mesh-psk"])
async def test_derpprobe_two_node_region_all_good(two_node_region, go_tools, test_ca, tmp_path,
                                                  as_mesh_peer) -> None:
    map_url, relays = two_node_region
    argv = [go_tools.derpprobe, f"-derp-map={map_url}", "-once", "-spread=false"]
    if as_mesh_peer:
        argv.append(f"-mesh-psk-file={write_mesh_key(tmp_path / 'mesh.key')}")
    forwarded_before = [r.server.stats.packets_forwarded_out for r in relays]

    code, out, err = await run_go(argv, env={"SSL_CERT_FILE": str(test_ca.ca_file)})

    results = {m.group(2): (m.group(1), m.group(3))
               for m in map(RESULT_LINE.search, (out + err).splitlines()) if m}
    explain = f"`{' '.join(argv)}` exited {code}; results {json.dumps(results, indent=1)}\n{err[-3000:]}"
    bad = {name: detail for name, (status, detail) in results.items() if status != "good"}
    assert not bad, explain
    assert code == 0, explain
    assert set(results) == {
        "derpmap-probe",
        *(f"derp/interop/{n}/{probe}" for n in NODES for probe in ("tls", "udp", "udp6")),
        *(f"derp/interop/{a}/{b}/mesh" for a in NODES for b in NODES),
    }, explain
    # The cross-node probes really crossed the mesh: each node forwarded one packet.
    forwarded = [r.server.stats.packets_forwarded_out - before
                 for r, before in zip(relays, forwarded_before, strict=True)]
    assert forwarded == [1, 1], f"packets forwarded out per node {forwarded}\n{explain}"
