"""Admission: derpd asks headscale's own ``/verify`` about every client (fail-closed).

The tailnet's nodes are registered in headscale, so they are admitted; a client with a
random key is refused and counted.  The coordinator probes the relay all along and its
health view must say "up" for every probe round of the module.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.interop.interop_harness import write_mesh_key

from .tailnet_harness import PORTS

pytestmark = [pytest.mark.interop, pytest.mark.slow]

VERIFY_URL = f"http://127.0.0.1:{PORTS['headscale']}/verify"
REFUSED = 'derp_admission_refused_total{reason="verify_denied"}'


@pytest.fixture(scope="module")
def admitted(new_tailnet):
    net = new_tailnet("admission")
    try:
        # The relay's mesh key, given to the coordinator too: its DERP probe logs in as a
        # mesh peer, which admission lets through (as derpprobe -mesh-psk-file).
        psk = write_mesh_key(net.workdir / "mesh.key")
        a, b = net.two_nodes(relay_args=["--verify-client-url", VERIFY_URL, "--mesh-psk-file", str(psk)],
                             coordinator={"mesh_key_file": str(psk), "history": 1000})  # every round
        yield net, a, b
    finally:
        net.close()


def test_headscale_nodes_are_admitted_and_transfer(admitted, blob: tuple[Path, str]) -> None:
    net, a, b = admitted
    net.pings_via_derp(a, b)
    t = net.transfer(a, b, blob)
    print(f"50 MB with admission on: {t.seconds:.2f} s, {t.mbit_s:.1f} Mbit/s")
    assert net.metrics()["derp_current_home_connections"] == 2


def test_a_random_key_is_refused_and_counted(admitted) -> None:
    net, a, b = admitted
    before = net.metrics().get(REFUSED, 0.0)
    check = net.ns.run([*net.derpd, "check", f"https://localhost:{PORTS['relay']}/derp", "--ca-file",
                        str(net.ca.ca_file), "-n", "1", "--timeout", "10"], timeout=40, check=False)
    print(check.stdout.strip(), check.stderr.strip()[-300:])
    assert check.returncode != 0, check.stdout
    assert net.metrics().get(REFUSED, 0.0) >= before + 1


def test_coordinator_health_view_stays_up(admitted) -> None:
    """Every probe round since the coordinator started (the whole module) was good."""
    net, a, b = admitted
    a.ping(b.ip())
    view = net.status_view()
    nodes = [n for r in view["regions"] for n in r["nodes"]]
    for n in nodes:
        print(f"{n['name']}: {n['status']}, {sum(h['ok'] for h in n['history'])} of {len(n['history'])} probe "
              f"rounds good, latency {n['latency_ms']} ms, last error {n['last_error']}")
    assert nodes, view
    for n in nodes:
        assert n["status"] == "up" and len(n["history"]) >= 3, json.dumps(n)
        assert all(h["ok"] for h in n["history"]) and not n["last_error"], json.dumps(n)
        # "up, DERP probe refused by admission" would be a note; the mesh key lets the probe in.
        assert not n.get("note") and "derp" in n["latency_ms"], f"the DERP probe did not pass: {json.dumps(n)}"
