"""A relay's "Draining" announcement on a real coordinator (127.0.0.1, port 0): the node
leaves the map at once, or its region is published ``NoMeasureNoHome`` when it is the
last healthy node there; it comes back after two good probe rounds; the announcements
are counted and survive a coordinator restart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio
import yaml

from derpd.coordinator.persist import StateStore
from derpd.coordinator.registration import parse_registration
from derpd.coordinator.server import RunningCoordinator
from derpd.coordinator.state import CoordinatorState

from .conftest import FakeProbe, http, make_config, node_names, register

EDGE_A = {"Name": "901a", "RegionID": 901, "RegionCode": "edge", "HostName": "localhost", "IPv4": "127.0.0.1",
          "DERPPort": 3}
EDGE_B = {**EDGE_A, "Name": "901b", "DERPPort": 4}


async def published(coordinator: RunningCoordinator) -> dict[str, Any]:
    return json.loads((await http(coordinator.url + "/derpmap/default")).body)  # type: ignore[no-any-return]


async def test_draining_node_leaves_its_region_at_once(coordinator: RunningCoordinator,
                                                       fake_probe: FakeProbe) -> None:
    with trio.fail_after(10):
        for doc in (EDGE_A, EDGE_B):
            assert (await register(coordinator.url, doc)).status == 200
        assert node_names(await published(coordinator))[-2:] == ["901a", "901b"]
        resp = await register(coordinator.url, {**EDGE_A, "Draining": True})
        assert resp.status == 200, resp.body
        assert json.loads(resp.body)["draining"] is True
        doc = await published(coordinator)
        assert [n["Name"] for n in doc["Regions"]["901"]["Nodes"]] == ["901b"]
        assert "NoMeasureNoHome" not in doc["Regions"]["901"]
        status = json.loads((await http(coordinator.url + "/status.json")).body)
        a = next(n for r in status["regions"] for n in r["nodes"] if n["name"] == "901a")
        assert (a["draining"], a["published"]) == (True, False)
        html = (await http(coordinator.url + "/status")).body.decode()
        assert "draining for maintenance" in html
        # its heartbeats while it drains keep it out
        coordinator.state.entries["901a"].last_seen -= 5
        assert (await register(coordinator.url, {**EDGE_A, "Draining": True})).status == 200
        assert [n["Name"] for n in (await published(coordinator))["Regions"]["901"]["Nodes"]] == ["901b"]
        # the relay is back (a registration without Draining): published after two good rounds
        coordinator.state.entries["901a"].last_seen -= 5
        resp = await register(coordinator.url, EDGE_A)
        assert resp.status == 200 and "draining" not in json.loads(resp.body)
        assert coordinator.state.entries["901a"].status == "down"
        assert [n["Name"] for n in (await published(coordinator))["Regions"]["901"]["Nodes"]] == ["901b"]
        await coordinator.prober.run_round()
        assert [n["Name"] for n in (await published(coordinator))["Regions"]["901"]["Nodes"]] == ["901b"]
        await coordinator.prober.run_round()
        assert [n["Name"] for n in (await published(coordinator))["Regions"]["901"]["Nodes"]] == ["901a", "901b"]
        metrics = (await http(coordinator.url + "/metrics")).body.decode()
    assert 'derpd_coordinator_registrations_total{result="draining"} 2.0' in metrics


async def test_last_healthy_node_keeps_its_region_without_homes(coordinator: RunningCoordinator,
                                                                fake_probe: FakeProbe) -> None:
    with trio.fail_after(10):
        assert (await register(coordinator.url, EDGE_A)).status == 200
        before = await published(coordinator)
        assert "NoMeasureNoHome" not in before["Regions"]["901"]
        assert (await register(coordinator.url, {**EDGE_A, "Draining": True})).status == 200
        doc = await published(coordinator)
        region = doc["Regions"]["901"]
        assert region["NoMeasureNoHome"] is True  # tailcfg.DERPRegion's field, omitempty
        assert list(region) == ["RegionID", "RegionCode", "RegionName", "NoMeasureNoHome", "Nodes"]
        assert [n["Name"] for n in region["Nodes"]] == ["901a"]  # peers homed there stay reachable
        assert "NoMeasureNoHome" not in doc["Regions"]["900"]
        # headscale's derp.paths YAML: lower-cased Go field names
        y = yaml.safe_load((await http(coordinator.url + "/derpmap/default.yaml")).body)
        assert y["regions"][901]["nomeasurenohome"] is True
        assert "nomeasurenohome" not in y["regions"][900]
        # the relay stops; its probes fail: the region still has no homes
        fake_probe.down["901a"] = "connection refused"
        await coordinator.prober.run_round()
        await coordinator.prober.run_round()
        region = (await published(coordinator))["Regions"]["901"]
        assert region["NoMeasureNoHome"] is True and [n["Name"] for n in region["Nodes"]] == ["901a"]
        # back, and healthy twice: a home again
        fake_probe.down.clear()
        coordinator.state.entries["901a"].last_seen -= 5
        assert (await register(coordinator.url, EDGE_A)).status == 200
        await coordinator.prober.run_round()
        await coordinator.prober.run_round()
        assert coordinator.state.entries["901a"].status == "up"
        assert "NoMeasureNoHome" not in (await published(coordinator))["Regions"]["901"]


async def test_static_region_node_draining_with_a_down_neighbour(coordinator: RunningCoordinator,
                                                                 fake_probe: FakeProbe) -> None:
    """A registered node draining in a region whose other node is down is its last healthy
    one: the region keeps it, without homes."""
    with trio.fail_after(10):
        doc = {"Name": "900r", "RegionID": 900, "HostName": "localhost", "IPv4": "127.0.0.1", "DERPPort": 5}
        assert (await register(coordinator.url, doc)).status == 200
        fake_probe.down.update({"900a": "x", "900b": "y"})
        await coordinator.prober.run_round()
        await coordinator.prober.run_round()
        assert (await published(coordinator))["Regions"]["900"]["Nodes"] == [
            {"Name": "900r", "RegionID": 900, "HostName": "localhost", "IPv4": "127.0.0.1", "DERPPort": 5}]
        coordinator.state.entries["900r"].last_seen -= 5
        assert (await register(coordinator.url, {**doc, "Draining": True})).status == 200
        region = (await published(coordinator))["Regions"]["900"]
        assert region["NoMeasureNoHome"] is True and [n["Name"] for n in region["Nodes"]] == ["900r"]


async def test_bad_draining_value_is_refused_and_counted(coordinator: RunningCoordinator) -> None:
    with trio.fail_after(10):
        resp = await register(coordinator.url, {**EDGE_A, "Draining": "yes"})
        assert resp.status == 400
        assert json.loads(resp.body) == {"error": "must be true or false", "field": "Draining"}
        assert "901" not in (await published(coordinator))["Regions"]


def test_draining_survives_a_coordinator_restart(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    store.check()
    state = CoordinatorState(make_config(), store=store, wall=lambda: 1000.0)
    state.register(parse_registration(json.dumps(EDGE_A).encode()), 0.0, "127.0.0.1")
    state.register(parse_registration(json.dumps({**EDGE_A, "Draining": True}).encode()), 2.0, "127.0.0.1")
    assert state.published.dmap.to_json()["Regions"]["901"]["NoMeasureNoHome"] is True
    again = CoordinatorState(make_config(), store=StateStore(tmp_path / "state"), wall=lambda: 1000.0)
    assert again.entries["901a"].draining
    assert again.published.json == state.published.json
