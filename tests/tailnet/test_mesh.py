"""A two-node derpd region: node a homed on one relay, node b on the other, meshed.

A Tailscale client dials a region's nodes in the order of its map and keeps the first that
accepts the TCP connection.  headscale shuffles the nodes of each region when it loads the
map, so the test loads it once (``auto_update_enabled: false``) and asks headscale's debug
endpoint which relay comes first (F) and second (S).  b joins while F is stopped (it lands
on S), F comes back on the same port with the same key, then a joins (it lands on F).
Every packet between a and b now crosses the mesh.  headscale reads this map from
``derp.paths``: the coordinator's /derpmap/default.yaml, saved while both relays were up.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.interop.interop_harness import write_mesh_key

from .tailnet_harness import BLOB_SIZE, PORTS, REGION_ID

pytestmark = [pytest.mark.interop, pytest.mark.slow]

PORT_1, PORT_2 = PORTS["relay"], PORTS["relay"] + 1
STUN = {PORT_1: PORTS["stun"], PORT_2: PORTS["stun"] + 1}
PEER = {PORT_1: PORT_2, PORT_2: PORT_1}


def test_nodes_on_two_meshed_relays(make_tailnet, blob: tuple[Path, str]) -> None:
    net = make_tailnet("mesh")
    psk = write_mesh_key(net.workdir / "mesh.key")

    def relay(port: int):
        return net.start_relay(f"relay-{port}", port, STUN[port], args=[
            "--mesh-psk-file", str(psk), "--mesh-with", f"localhost:{PEER[port]}", "--mesh-ca-file",
            str(net.ca.ca_file)])

    relays = {port: relay(port) for port in (PORT_1, PORT_2)}
    url = net.start_coordinator([net.map_node(f"{REGION_ID}a", PORT_1, STUN[PORT_1]),
                                 net.map_node(f"{REGION_ID}b", PORT_2, STUN[PORT_2])])
    yaml_map = net.workdir / "derpmap.yaml"
    yaml_map.write_text(net.fetch_url(url + ".yaml"))
    assert f"derpport: {PORT_2}" in yaml_map.read_text()
    authkey = net.start_headscale(derp_paths=[yaml_map], auto_update=False)
    first, second = net.headscale_derp_ports()[REGION_ID]
    print(f"headscale's node order: {first}, {second}")

    net.stop(relays[first])
    b = net.start_node("b", 41642, authkey)
    b.proc.wait_for(r"magicsock: derp-900 connected", 60)
    # The first relay is down, so the second one's only client is b (a relay registers a
    # client before it answers the login that b logged as connected).
    assert net.metrics(second)["derp_current_connections"] == 1, "b is not on the second relay"
    mark = relays[second].mark()
    relays[first] = relay(first)
    relays[second].wait_for(rf"mesh localhost:{first} connected", 30, since=mark)
    relays[first].wait_for(rf"mesh localhost:{second} connected", 30)
    a = net.start_node("a", 41641, authkey)
    a.proc.wait_for(r"magicsock: derp-900 connected", 60)

    net.pings_via_derp(a, b)
    before = {p: net.metrics(p) for p in (first, second)}
    assert before[first]["derp_current_home_connections"] == 1, "a is not homed on the first relay"
    assert before[second]["derp_current_home_connections"] == 1, "b is not homed on the second relay"
    t = net.transfer(a, b, blob)
    after = {p: net.metrics(p) for p in (first, second)}

    def grew(port: int, name: str) -> float:
        return after[port][name] - before[port][name]

    print(f"50 MB b -> a across the mesh: {t.seconds:.2f} s, {t.mbit_s:.1f} Mbit/s; b's relay forwarded out "
          f"{grew(second, 'derp_bytes_forwarded_out_total') / 1e6:.1f} MB, a's relay forwarded in "
          f"{grew(first, 'derp_bytes_forwarded_in_total') / 1e6:.1f} MB")
    assert grew(second, "derp_bytes_forwarded_out_total") >= BLOB_SIZE
    assert grew(first, "derp_bytes_forwarded_in_total") >= BLOB_SIZE
    assert grew(first, "derp_packets_forwarded_out_total") > 0  # a's ACKs went the other way
