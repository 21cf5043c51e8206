"""``--verify-clients``: derpd asks the local tailscaled, over its LocalAPI socket
(``--socket``), whether a client's node key belongs to the tailnet, as derper does.

Node a's tailscaled is the relay's "local" tailscaled: a and b are in its netmap, so both
are admitted (a refusal while a's netmap is still catching up is cached for 5 s and the
node retries); a random key is refused (``verify_denied``: tailscaled answers 404).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.interop.interop_harness import write_mesh_key

from .tailnet_harness import PORTS

pytestmark = [pytest.mark.interop, pytest.mark.slow]

REFUSED = 'derp_admission_refused_total{reason="verify_denied"}'


def test_verify_clients_asks_a_real_tailscaled(make_tailnet, blob: tuple[Path, str]) -> None:
    net = make_tailnet("verify-clients")
    socket = net.workdir / "node-a" / "tailscaled.sock"  # where start_node("a") puts it
    psk = write_mesh_key(net.workdir / "mesh.key")  # the coordinator's probe logs in as a mesh peer
    a, b = net.two_nodes(relay_args=["--verify-clients", "--socket", str(socket), "--mesh-psk-file", str(psk)],
                         coordinator={"mesh_key_file": str(psk)})
    net.pings_via_derp(a, b)
    t = net.transfer(a, b, blob)
    print(f"50 MB with --verify-clients: {t.seconds:.2f} s, {t.mbit_s:.1f} Mbit/s")
    before = net.metrics()
    check = net.ns.run([*net.derpd, "check", f"https://localhost:{PORTS['relay']}/derp", "--ca-file",
                        str(net.ca.ca_file), "-n", "1", "--timeout", "10"], timeout=40, check=False)
    print(check.stdout.strip(), check.stderr.strip()[-300:])
    after = net.metrics()
    assert check.returncode != 0, check.stdout
    assert after.get(REFUSED, 0.0) >= before.get(REFUSED, 0.0) + 1, {k: v for k, v in after.items() if "admission" in k}
    assert after["derp_current_home_connections"] == 2
