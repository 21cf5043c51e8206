"""derpd meshed with Tailscale's own derper (tailscale.com/cmd/derper, the pinned module).

One derper and one derpd relay, both TLS for ``localhost`` from the test CA, share a mesh
key and name each other in their mesh lists:

* derper ``--mesh-with localhost:<derpd port>``: the pinned derper builds the URL
  ``"https://" + host + "/derp"`` from each entry (cmd/derper/mesh.go), so a port in the
  entry is dialled and sent in the URL; without one it would be 443.  It trusts our
  certificate through ``SSL_CERT_FILE``.
* derpd ``run_mesh(..., [MeshTarget("localhost:<derper port>", dial="127.0.0.1")])``.

Then derpinterop ``meshpair`` puts a derphttp client on each relay: packets cross both
ways (derper -> derpd and derpd -> derper as ForwardPacket) with the sender's key as
source, and PeerGone(Disconnected) for a client that leaves reaches its peer on the other
relay.  derper's STUN server is off (``-stun=false``): nothing here needs it, and it would
be one more port to find.
"""

from __future__ import annotations

import functools
import json
import socket
import ssl
from pathlib import Path

import pytest
import trio

from .interop_harness import MESH_KEY, clean_env, wait_for_registries, watcher_keys, write_mesh_key

pytestmark = pytest.mark.interop

BIND_TRIES = 5


def unused_tcp_port() -> int:
    """A port the kernel just gave out and took back: derper cannot bind port 0 and report
    it, so it gets one of these, and a lost race (another bind in between) is retried."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_derper_meshed_with(relay, *, go_tools, test_ca, nursery: trio.Nursery, tmp_path: Path):
    """Start derper meshed with ``relay`` (derpd) both ways; return (derper port, derper key).

    Ready means: derper's mesh client logged in to derpd and subscribed (WatchConns), and
    derpd's link to derper is up, which also proves derper listens on its port.
    """
    from derpd.keys import NodePrivate
    from derpd.mesh import MeshTarget, run_mesh

    derper_key = NodePrivate.generate()
    config = tmp_path / "derper.key"  # spec 1.3; we write it so that we know derper's key
    config.write_text(json.dumps({"PrivateKey": str(derper_key)}, indent="\t"))
    psk = write_mesh_key(tmp_path / "mesh.key")
    env = clean_env() | {"SSL_CERT_FILE": str(test_ca.ca_file)}
    client_ctx = ssl.create_default_context(cafile=str(test_ca.ca_file))
    registry = relay.server.registry

    for attempt in range(BIND_TRIES):
        port = unused_tcp_port()
        log_path = tmp_path / f"derper-{attempt}.log"
        argv = [go_tools.derper, "-a", f"127.0.0.1:{port}", "-http-port", "-1", "-stun=false",
                "-c", str(config), "-certmode", "manual", "-certdir", str(test_ca.certdir),
                "-hostname", "localhost", "-mesh-psk-file", str(psk),
                "-mesh-with", f"localhost:{relay.port}"]
        with log_path.open("wb") as log:
            proc = await nursery.start(functools.partial(
                trio.run_process, argv, stdout=log, stderr=log, env=env, check=False))
        mesh_scope = trio.CancelScope()  # derpd's link to this derper; cancelled on a retry
        links = []

        async def mesh(task_status: trio.TaskStatus[list] = trio.TASK_STATUS_IGNORED,
                       scope: trio.CancelScope = mesh_scope, port: int = port) -> None:
            with scope:
                await run_mesh(relay.server, [MeshTarget(f"localhost:{port}", dial="127.0.0.1")], MESH_KEY,
                               ssl_context=client_ctx, task_status=task_status)

        outcome = {}
        with trio.fail_after(20):
            async with trio.open_nursery() as race:

                async def exited() -> None:
                    outcome["exit"] = await proc.wait()
                    race.cancel_scope.cancel()

                async def ready() -> None:
                    # 1. derper is up and its mesh client is subscribed to derpd.
                    await wait_for_registries([registry], lambda: derper_key.public.raw in registry.active)
                    # 2. Only now mesh derpd to derper (derper binds its port after
                    # starting its mesh client).  When our link subscribes, derper floods a
                    # PeerPresent for each of its clients, our link included, which
                    # changes derpd's registry and re-checks the condition.
                    links.extend(await nursery.start(mesh))
                    await wait_for_registries([registry], lambda: bool(links) and all(
                        link.connected for link in links) and derper_key.public.raw in watcher_keys(relay))
                    outcome["ready"] = True
                    race.cancel_scope.cancel()

                race.start_soon(exited)
                race.start_soon(ready)
        if outcome.get("ready"):
            return port, derper_key.public
        mesh_scope.cancel()
        text = log_path.read_text(errors="replace")
        if "address already in use" not in text:
            pytest.fail(f"derper exited ({outcome.get('exit')}) before meshing:\n{' '.join(argv)}\n{text[-3000:]}",
                        pytrace=False)
    pytest.fail(f"derper could not bind a free port in {BIND_TRIES} tries", pytrace=False)


async def test_derpd_and_derper_mesh_both_ways(start_relay, go_tools, test_ca, nursery, tmp_path,
                                               scenario) -> None:
    relay = await start_relay(tls="ca", mesh_key=MESH_KEY)
    derper_port, derper_key = await start_derper_meshed_with(
        relay, go_tools=go_tools, test_ca=test_ca, nursery=nursery, tmp_path=tmp_path)
    stats = relay.server.stats
    out_before, in_before = stats.packets_forwarded_out, stats.packets_forwarded_in

    r = await scenario("meshpair", "--url-a", f"https://localhost:{derper_port}",
                       "--url-b", f"https://localhost:{relay.port}", "--ca", str(test_ca.ca_file),
                       "--pairs", "2", "--packets", "100", "--timeout", "40s", timeout=60,
                       expect_ok=False)
    drops = {f"{reason}/{kind}": n for (reason, kind), n in stats.dropped_packets.items() if n}
    explain = (f"{r.explain()}\nderpd: forwarded out {stats.packets_forwarded_out - out_before}, "
               f"in {stats.packets_forwarded_in - in_before}, drops {drops}\nderper log (tail):\n"
               + "\n".join(p.read_text(errors="replace")[-2000:] for p in sorted(tmp_path.glob("derper-*.log"))))
    assert r.returncode == 0 and r.data["ok"] is True, explain
    print(json.dumps(r.data, sort_keys=True))  # the figures, for `pytest -rP`
    assert r.data["received"] == 2 * 2 * 100, r.explain()
    assert r.data["peer_gone_disconnected"] == {"A_left": 1, "B_left": 1}, r.explain()
    # Every packet from a client on derpd crossed to derper as our ForwardPacket, and
    # every packet from derper's clients came in as its ForwardPacket (plus the
    # reachability probes, at least one per direction per pair).
    sent_each_way = 2 * 100
    assert stats.packets_forwarded_out - out_before >= sent_each_way + 2, r.explain()
    assert stats.packets_forwarded_in - in_before >= sent_each_way + 2, r.explain()
    assert derper_key.raw in relay.server.registry.active, "derper's mesh client is still connected"


async def test_go_clients_across_two_derpd_nodes(start_meshed_relays, test_ca, scenario) -> None:
    """The same meshpair scenario on a derpd-only region: the baseline for the derper test."""
    relays = await start_meshed_relays(2)
    r = await scenario("meshpair", "--url-a", f"https://localhost:{relays[0].port}",
                       "--url-b", f"https://localhost:{relays[1].port}", "--ca", str(test_ca.ca_file),
                       "--pairs", "2", "--packets", "100", "--timeout", "40s", timeout=60)
    print(json.dumps(r.data, sort_keys=True))  # the figures, for `pytest -rP`
    assert r.data["received"] == 2 * 2 * 100, r.explain()
    assert r.data["peer_gone_disconnected"] == {"A_left": 1, "B_left": 1}, r.explain()
