"""The real prober against real relays on 127.0.0.1: admission (a fail-closed --verify-client-url
relay stays up; a mesh key gets the DERP probe through), a relay that is not the registered key,
addresses the prober may be aimed at, and rounds bounded in time and concurrency."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio
import trio.testing

from derpd.admission import VerifyClientURL
from derpd.coordinator.config import parse_config
from derpd.coordinator.prober import ADMISSION_NOTE
from derpd.coordinator.registration import parse_registration
from derpd.coordinator.server import RunningCoordinator, serve_coordinator
from derpd.keys import NodePrivate
from derpd.relay.listener import RunningRelay, serve_relay
from derpd.settings import RelaySettings

from .conftest import TOKEN, http, node_names, register

MESH_KEY = bytes(range(1, 33))


async def start_relay(nursery: trio.Nursery, certdir: Path, **overrides: Any) -> RunningRelay:
    settings = RelaySettings(addr="127.0.0.1:0", private_key=NodePrivate.generate(), certmode="manual",
                             certdir=certdir, hostname="127.0.0.1", **overrides)
    return await nursery.start(serve_relay, settings)


async def start_coordinator(nursery: trio.Nursery, text: str, tmp_path: Path,
                            loopback: bool = True) -> RunningCoordinator:
    """A coordinator whose registered relays may be on loopback (``loopback``), as these are."""
    config = replace(parse_config(text, "live.toml", base_dir=tmp_path), token=TOKEN, allow_loopback_nodes=loopback)
    return await nursery.start(lambda task_status: serve_coordinator(
        config, listen="127.0.0.1:0", probing=False, task_status=task_status))


def node_toml(relay: RunningRelay) -> str:
    return f"""
[[regions.nodes]]
name = "900a"
hostname = "127.0.0.1"
ipv4 = "127.0.0.1"
derp_port = {relay.port}
stun_port = -1
cert_name = "{relay.cert_pin}"
"""


async def node_status(coord: RunningCoordinator, name: str) -> dict[str, Any]:
    doc = json.loads((await http(coord.url + "/status.json")).body)
    return next(n for r in doc["regions"] for n in r["nodes"] if n["name"] == name)


async def test_fail_closed_verify_client_url_relay_stays_up(nursery: trio.Nursery, tmp_path: Path) -> None:
    """headscale's /verify unreachable and fail-closed: every client login is refused, but the
    node stays in the map; with the region's mesh key the DERP probe gets through."""
    with trio.fail_after(30):
        relay = await start_relay(nursery, tmp_path / "certs", mesh_key=MESH_KEY)
        closed = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        verify_port = closed.socket.getsockname()[1]
        await closed.aclose()  # nothing answers there: fail-closed refuses everyone
        relay.server.admission_checks.append(
            VerifyClientURL(f"http://127.0.0.1:{verify_port}/verify", fail_open=False).check)
        coord = await start_coordinator(nursery, '[[regions]]\nid = 900\ncode = "dev"\n' + node_toml(relay),
                                        tmp_path)
        for _ in range(3):
            await coord.prober.run_round()
        node = await node_status(coord, "900a")
        assert node["status"] == "up" and node["published"]
        assert node["note"] == ADMISSION_NOTE
        assert set(node["latency_ms"]) == {"https"}
        page = (await http(coord.url + "/status")).body.decode()
        assert ADMISSION_NOTE in page
        assert sum(relay.server.stats.admission_refused.values())  # the relay did refuse the probe

        # A wrong key for every region, the right one for region 900: the region's key wins.
        (tmp_path / "wrong.key").write_text("ab" * 32)
        (tmp_path / "mesh.key").write_text(MESH_KEY.hex() + "\n")
        coord.state.reload(replace(parse_config(
            '[coordinator]\nmesh_key_file = "wrong.key"\n[[regions]]\nid = 900\ncode = "dev"\n'
            'mesh_key_file = "mesh.key"\n' + node_toml(relay), "live.toml", base_dir=tmp_path), token=TOKEN))
        await coord.prober.run_round()
        node = await node_status(coord, "900a")
        assert node["status"] == "up" and node["note"] == ""
        assert set(node["latency_ms"]) == {"https", "derp"}


async def test_relay_with_another_key_is_down_at_once(nursery: trio.Nursery, tmp_path: Path) -> None:
    """A registration that names someone else's key for a relay it points at is caught by the
    DERP login: the node is down after one round, and the status says key_mismatch."""
    with trio.fail_after(30):
        relay = await start_relay(nursery, tmp_path / "certs")
        coord = await start_coordinator(nursery, '[[regions]]\nid = 900\ncode = "dev"\n', tmp_path)
        good = {"Name": "900y", "RegionID": 900, "HostName": "127.0.0.1", "IPv4": "127.0.0.1",
                "DERPPort": relay.port, "STUNPort": -1, "CertName": relay.cert_pin,
                "PublicKey": str(relay.public_key)}
        assert (await register(coord.url, good)).status == 200
        claimed = str(NodePrivate.generate().public)
        assert (await register(coord.url, {**good, "Name": "900x", "PublicKey": claimed})).status == 200
        await coord.prober.run_round()
        node = await node_status(coord, "900x")
        assert node["status"] == "down" and not node["published"]
        assert "derp: key_mismatch" in node["last_error"]
        assert (await node_status(coord, "900y"))["status"] == "up"
        assert node_names(json.loads((await http(coord.url + "/derpmap/default")).body)) == ["900y"]


async def test_unreachable_registrations_cannot_stretch_a_round(nursery: trio.Nursery, tmp_path: Path) -> None:
    """256 registrations at an address that accepts TCP and then never answers: the round ends at
    its deadline, the healthy node was probed first, and anonymous viewers see failure classes."""
    with trio.fail_after(60):
        relay = await start_relay(nursery, tmp_path / "certs")
        tarpit = trio.socket.socket()
        await tarpit.bind(("127.0.0.1", 0))
        tarpit.listen(1024)  # the kernel completes connections; nobody ever reads them
        tar_port = tarpit.getsockname()[1]
        coord = await start_coordinator(nursery, f"""
[coordinator]
probe_interval = 2
probe_timeout = 1
max_registered_nodes = 300
max_parallel_probes = 16
[[regions]]
id = 900
code = "dev"
{node_toml(relay)}
""", tmp_path)
        now = trio.current_time()
        for i in range(256):
            body = {"Name": f"tar{i}", "RegionID": 900, "HostName": "127.0.0.1", "IPv4": "127.0.0.1",
                    "DERPPort": tar_port, "STUNPort": tar_port, "CertName": relay.cert_pin}
            coord.state.register(parse_registration(json.dumps(body).encode()), now, "127.0.0.1")
        start = trio.current_time()
        await coord.prober.run_round()
        took = trio.current_time() - start
        # 256 / 16 probes of 1 s each would take 16 s; the round deadline is probe_timeout + 0.5 s
        assert took < 5.0, took
        good = await node_status(coord, "900a")
        assert good["status"] == "up" and set(good["latency_ms"]) == {"https", "derp"}
        doc = json.loads((await http(coord.url + "/status.json")).body)
        errors = {n["last_error"] for r in doc["regions"] for n in r["nodes"] if n["last_error"]}
        assert errors and all(":" in e and "Errno" not in e and str(tar_port) not in e for e in errors), errors
        tarpit.close()


async def test_prober_goes_only_where_it_is_allowed(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        coord = await start_coordinator(nursery, '[coordinator]\nprobe_allow = ["10.0.0.0/8"]\n'
                                                 '[[regions]]\nid = 900\ncode = "dev"\n', tmp_path,
                                        loopback=False)
        base = {"Name": "900p", "RegionID": 900, "HostName": "relay.example.net", "DERPPort": 443}
        for field, value in (("IPv4", "192.168.1.10"), ("IPv6", "fd00::1"), ("STUNTestIP", "169.254.169.254"),
                             ("HostName", "172.16.0.1")):
            resp = await register(coord.url, {**base, field: value})
            assert resp.status == 403, (field, resp.body)
            doc = json.loads(resp.body)
            assert doc["field"] == field and "probe_allow" in doc["error"]
        assert (await register(coord.url, {**base, "IPv4": "10.1.2.3"})).status == 200  # probe_allow
        # loopback, and no address at all from loopback, only with allow_loopback_nodes (derpd dev)
        for doc in ({**base, "Name": "900q", "IPv4": "127.0.0.1"}, {**base, "Name": "900t"}):
            resp = await register(coord.url, doc)
            assert resp.status == 403 and "allow_loopback_nodes" in json.loads(resp.body)["error"]
        coord.state.reload(replace(coord.state.config, allow_loopback_nodes=True))
        assert (await register(coord.url, {**base, "Name": "900q", "IPv4": "127.0.0.1"})).status == 200  # dev
        assert (await register(coord.url, {**base, "Name": "900r", "IPv4": "198.51.100.7"})).status == 403
        assert (await register(coord.url, {**base, "Name": "900s", "IPv4": "8.8.8.8"})).status == 200
        targets = {t.node.name: t for t in coord.state.probe_targets()}
        assert targets["900p"].dial == "10.1.2.3" and targets["900q"].dial == "127.0.0.1"
        # no IP advertised: the prober dials where the registration came from, never a DNS name
        assert (await register(coord.url, {**base, "Name": "900t"})).status == 200
        assert coord.state.probe_targets()[-1].node.name == "900t"
        assert {t.node.name: t.dial for t in coord.state.probe_targets()}["900t"] == "127.0.0.1"
        metrics = (await http(coord.url + "/metrics")).body.decode()
    assert 'derpd_coordinator_registrations_total{result="forbidden"} 7.0' in metrics  # 5 + 2 loopback


async def test_probe_latency_measures_the_relay(nursery: trio.Nursery, tmp_path: Path) -> None:
    """What the prober reports is the relay's answer time, not the prober's own set-up (loading
    CA bundles, resending, sleeping): compared with a bare TLS connection and request to the same
    relay, measured alternately with the probes so both see the same machine load."""
    from derpd.coordinator.httpclient import client_ssl_context
    from derpd.coordinator.prober import NodeProber
    from derpd.coordinator.state import ProbeTarget

    with trio.fail_after(60):
        relay = await start_relay(nursery, tmp_path / "certs")
        coord = await start_coordinator(nursery, '[[regions]]\nid = 900\ncode = "dev"\n' + node_toml(relay),
                                        tmp_path)
        node = next(iter(coord.state.published.dmap.nodes()))
        target = ProbeTarget(node, "127.0.0.1", "127.0.0.1", str(relay.public_key))
        prober = NodeProber(timeout=5.0)
        ctx = client_ssl_context(insecure=True)
        best: dict[str, float] = {}
        for _ in range(6):
            start = trio.current_time()
            tls = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", relay.port), ctx,
                                 server_hostname="127.0.0.1", https_compatible=True)
            await tls.send_all(b"GET /derp/probe HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert (await tls.receive_some(4096)).startswith(b"HTTP/1.1 200")
            best["bare"] = min(best.get("bare", 1e9), trio.current_time() - start)
            await trio.aclose_forcefully(tls)
            result = await prober(target)
            assert result.ok, result.failed
            for kind, secs in result.latency.items():
                best[kind] = min(best.get(kind, 1e9), secs)
        await prober.aclose()
    # One TLS request for https; two TLS connections and two logins for DERP.
    assert best["https"] < 3 * best["bare"] + 0.005, best
    assert best["derp"] < 6 * best["bare"] + 0.010, best
