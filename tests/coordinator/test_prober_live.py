"""The real prober against our own relay and STUN server on 127.0.0.1: a node killed mid-run
leaves the map after the next probe round and comes back once restarted."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from derpd.coordinator.config import parse_config
from derpd.coordinator.server import RunningCoordinator, serve_coordinator
from derpd.keys import NodePrivate
from derpd.relay.listener import RunningRelay, serve_relay
from derpd.settings import RelaySettings
from stund.server import serve_stun

from .conftest import http, node_names


def _relay_tls_works() -> bool:
    try:
        from derpd.relay.tls import make_meta_cert
        make_meta_cert(NodePrivate.generate().public)
    except ValueError:
        return False
    return True


# cryptography refuses the 71-character meta-certificate CN ("derpkey" + 64 hex) unless the
# relay builds the name without length validation; until derpd/relay/tls.py does, no TLS relay
# can start, so these tests are reported as xfail (not skipped, not passed).
pytestmark = pytest.mark.xfail(not _relay_tls_works(), strict=True,
                               reason="derpd/relay/tls.py: meta-cert CN longer than 64 characters is rejected")


async def _start_relay(nursery: trio.Nursery, certdir: Path, key: NodePrivate, port: int = 0
                       ) -> tuple[trio.CancelScope, RunningRelay]:
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[RunningRelay] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await serve_relay(RelaySettings(addr=f"127.0.0.1:{port}", private_key=key, certmode="manual",
                                            certdir=certdir, hostname="127.0.0.1"), task_status=task_status)

    relay: RunningRelay = await nursery.start(run)
    return scope, relay


async def test_dead_node_leaves_map_and_returns(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        key = NodePrivate.generate()
        relay_scope, relay = await _start_relay(nursery, tmp_path, key)
        assert relay.cert_pin
        stun_bound = await nursery.start(serve_stun, [("127.0.0.1", 0)])
        stun_port = stun_bound[0][1]
        text = f"""
[coordinator]
probe_interval = 10
probe_timeout = 5
[[regions]]
id = 900
code = "dev"
[[regions.nodes]]
name = "900a"
hostname = "127.0.0.1"
ipv4 = "127.0.0.1"
derp_port = {relay.port}
stun_port = {stun_port}
cert_name = "{relay.cert_pin}"
[[regions.nodes]]
name = "900b"
hostname = "127.0.0.1"
ipv4 = "127.0.0.1"
derp_port = {relay.port}
stun_port = {stun_port}
insecure_for_tests = true
"""
        config = replace(parse_config(text, "live.toml"))
        coord: RunningCoordinator = await nursery.start(
            lambda task_status: serve_coordinator(config, listen="127.0.0.1:0", probing=False,
                                                  task_status=task_status))
        await coord.prober.run_round()
        status = json.loads((await http(coord.url + "/status.json")).body)
        nodes = {n["name"]: n for n in status["regions"][0]["nodes"]}
        for name in ("900a", "900b"):
            assert nodes[name]["status"] == "up", nodes[name]["last_error"]
            assert set(nodes[name]["latency_ms"]) == {"https", "derp", "stun"}

        # Kill the relay: the next two rounds mark both nodes down; the region keeps them.
        relay_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        await coord.prober.run_round()
        await coord.prober.run_round()
        status = json.loads((await http(coord.url + "/status.json")).body)
        assert [n["status"] for n in status["regions"][0]["nodes"]] == ["down", "down"]
        assert "https" in status["regions"][0]["nodes"][0]["last_error"]
        metrics = (await http(coord.url + "/metrics")).body.decode()
        assert 'derpd_coordinator_probe_success{node="900a",probe="https",region="900"} 0.0' in metrics
        assert 'derpd_coordinator_probe_success{node="900a",probe="stun",region="900"} 1.0' in metrics

        # With keep_region_when_down off the region leaves the map.
        coord.state.reload(replace(config, keep_region_when_down=False))
        await coord.prober.run_round()
        await coord.prober.run_round()
        assert json.loads((await http(coord.url + "/derpmap/default")).body)["Regions"] == {}

        # Restart on the same port with the same cert: back after two rounds.
        relay_scope, relay2 = await _start_relay(nursery, tmp_path, key, relay.port)
        assert relay2.cert_pin == relay.cert_pin
        await coord.prober.run_round()
        await coord.prober.run_round()
        doc = json.loads((await http(coord.url + "/derpmap/default")).body)
        assert node_names(doc) == ["900a", "900b"]
        relay_scope.cancel()


async def test_pin_mismatch_is_down(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        _, relay = await _start_relay(nursery, tmp_path, NodePrivate.generate())
        text = f"""
[[regions]]
id = 900
code = "dev"
[[regions.nodes]]
name = "900a"
hostname = "127.0.0.1"
derp_port = {relay.port}
stun_port = -1
cert_name = "sha256-raw:{'0' * 64}"
"""
        coord: RunningCoordinator = await nursery.start(
            lambda task_status: serve_coordinator(parse_config(text, "pin.toml"), listen="127.0.0.1:0",
                                                  probing=False, task_status=task_status))
        await coord.prober.run_round()
        await coord.prober.run_round()
        node = json.loads((await http(coord.url + "/status.json")).body)["regions"][0]["nodes"][0]
    assert node["status"] == "down"
    assert "pin_mismatch" in node["last_error"]
    assert node["latency_ms"] == {}
