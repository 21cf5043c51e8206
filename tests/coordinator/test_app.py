"""The HTTP API on a real hypercorn server (127.0.0.1, port 0) with a controllable prober."""

from __future__ import annotations

import json
from pathlib import Path

import trio
import yaml

from derpd.coordinator.server import RunningCoordinator

from .conftest import TOKEN, FakeProbe, http, node_names, register

EDGE = {"Name": "901a", "RegionID": 901, "RegionCode": "edge", "HostName": "localhost", "IPv4": "127.0.0.1",
        "DERPPort": 3}


async def test_map_json_etag_and_cache(coordinator: RunningCoordinator) -> None:
    resp = await http(coordinator.url + "/derpmap/default")
    assert resp.status == 200
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["cache-control"] == "no-cache"
    doc = json.loads(resp.body)
    assert list(doc["Regions"]) == ["900"]  # 901 has no nodes: left out, never null
    assert doc["omitDefaultRegions"] is True
    assert node_names(doc) == ["900a", "900b"]
    etag = resp.headers["etag"]
    again = await http(coordinator.url + "/derpmap/default", If_None_Match=etag)
    assert again.status == 304 and again.body == b""
    stale = await http(coordinator.url + "/derpmap/default", If_None_Match='"nope"')
    assert stale.status == 200 and stale.body == resp.body


async def test_map_yaml_for_headscale(coordinator: RunningCoordinator) -> None:
    resp = await http(coordinator.url + "/derpmap/default.yaml")
    assert resp.status == 200 and resp.headers["content-type"].startswith("application/yaml")
    doc = yaml.safe_load(resp.body)
    assert [n["hostname"] for n in doc["regions"][900]["nodes"]] == ["localhost", "localhost"]
    assert doc["regions"][900]["nodes"][0]["derpport"] == 1


async def test_registration_adds_node_and_heartbeat_keeps_etag(coordinator: RunningCoordinator) -> None:
    before = (await http(coordinator.url + "/derpmap/default")).headers["etag"]
    resp = await register(coordinator.url, EDGE)
    assert resp.status == 200, resp.body
    assert json.loads(resp.body)["changed"] is True
    doc = json.loads((await http(coordinator.url + "/derpmap/default")).body)
    assert doc["Regions"]["901"]["Nodes"] == [{"Name": "901a", "RegionID": 901, "HostName": "localhost",
                                               "IPv4": "127.0.0.1", "DERPPort": 3}]
    after = (await http(coordinator.url + "/derpmap/default")).headers["etag"]
    assert after != before
    coordinator.state.entries["901a"].last_seen -= 5  # as if the heartbeat interval had passed
    resp = await register(coordinator.url, EDGE)
    assert resp.status == 200 and json.loads(resp.body)["changed"] is False
    assert (await http(coordinator.url + "/derpmap/default")).headers["etag"] == after


async def test_new_region_needs_a_code(coordinator: RunningCoordinator) -> None:
    resp = await register(coordinator.url, {"Name": "950a", "RegionID": 950, "HostName": "localhost"})
    assert resp.status == 400 and json.loads(resp.body)["field"] == "RegionCode"
    resp = await register(coordinator.url, {"Name": "950a", "RegionID": 950, "RegionCode": "new",
                                            "HostName": "localhost"})
    assert resp.status == 200
    doc = json.loads((await http(coordinator.url + "/derpmap/default")).body)
    assert doc["Regions"]["950"]["RegionCode"] == "new"


async def _bad_registrations_change_nothing(coordinator: RunningCoordinator) -> list[tuple[int, dict]]:
    url = coordinator.url
    before = await http(url + "/derpmap/default")
    answers = []
    for resp in [
        await register(url, EDGE, token="wrong-token-wrong-token"),
        await http(url + "/v1/nodes", "POST", json.dumps(EDGE).encode()),
        await register(url, {**EDGE, "DERPPort": 65536}),
        await register(url, {**EDGE, "Extra": 1}),
        await register(url, {**EDGE, "Name": "900a"}),
        await register(url, {**EDGE, "RegionCode": "home"}),
        await http(url + "/v1/nodes", "POST", b"{" * 10, Authorization=f"Bearer {TOKEN}"),
        await http(url + "/v1/nodes", "POST", b"x" * 100_000, Authorization=f"Bearer {TOKEN}"),
    ]:
        answers.append((resp.status, json.loads(resp.body)))
    after = await http(url + "/derpmap/default")
    assert after.body == before.body and after.headers["etag"] == before.headers["etag"]
    return answers


async def test_bad_registrations_get_clear_4xx_and_change_nothing(coordinator: RunningCoordinator) -> None:
    answers = await _bad_registrations_change_nothing(coordinator)
    assert [a[0] for a in answers] == [401, 401, 400, 400, 409, 409, 400, 413]
    assert "Authorization: Bearer" in answers[0][1]["error"]
    assert answers[2][1] == {"error": "must be in 0..65535, 0 meaning 443 (got 65536)", "field": "DERPPort"}
    assert answers[3][1]["field"] == "Extra"
    assert "pick another --node-name" in answers[4][1]["error"]
    assert "not valid JSON" in answers[6][1]["error"]
    assert "larger than" in answers[7][1]["error"]
    metrics = (await http(coordinator.url + "/metrics")).body.decode()
    assert 'derpd_coordinator_registrations_total{result="unauthorized"} 2.0' in metrics
    assert 'derpd_coordinator_registrations_total{result="too_large"} 1.0' in metrics
    assert (await http(coordinator.url + "/healthz")).body == b"ok\n"


async def test_heartbeat_storm_is_throttled(nursery: trio.Nursery, fake_probe: FakeProbe) -> None:
    """Heartbeats faster than min_heartbeat_interval are refused (429 with Retry-After) and never
    duplicate the node.  The interval is 60 s here, so the 50 heartbeats land inside it however
    slow the machine running the test is."""
    from dataclasses import replace

    from derpd.coordinator.server import serve_coordinator

    from .conftest import make_config
    with trio.fail_after(10):
        coordinator = await nursery.start(lambda task_status: serve_coordinator(
            replace(make_config(), min_heartbeat_interval=60.0), listen="127.0.0.1:0", probe=fake_probe,
            probing=False, task_status=task_status))
    assert (await register(coordinator.url, EDGE)).status == 200
    statuses = []
    for _ in range(50):
        statuses.append((await register(coordinator.url, EDGE)).status)
    assert set(statuses) == {429}
    resp = await register(coordinator.url, EDGE)
    assert resp.headers["retry-after"] == "60"
    assert "too fast" in json.loads(resp.body)["error"]
    assert node_names(json.loads((await http(coordinator.url + "/derpmap/default")).body)).count("901a") == 1


async def test_registration_disabled_without_token(nursery: trio.Nursery, fake_probe: FakeProbe) -> None:
    from dataclasses import replace

    from derpd.coordinator.server import serve_coordinator

    from .conftest import make_config
    with trio.fail_after(10):
        running = await nursery.start(lambda task_status: serve_coordinator(
            replace(make_config(), token=None), listen="127.0.0.1:0", probe=fake_probe, probing=False,
            task_status=task_status))
        resp = await register(running.url, EDGE)
    assert resp.status == 403 and "token_file" in json.loads(resp.body)["error"]


async def test_unknown_path_and_method(coordinator: RunningCoordinator) -> None:
    assert (await http(coordinator.url + "/nope")).status == 404
    resp = await http(coordinator.url + "/derpmap/default", "POST", b"{}")
    assert resp.status == 405 and resp.headers["allow"] == "GET, HEAD"


async def test_unhealthy_node_leaves_and_comes_back(coordinator: RunningCoordinator, fake_probe: FakeProbe) -> None:
    url = coordinator.url + "/derpmap/default"
    with trio.fail_after(10):
        fake_probe.down["900b"] = "connection refused"
        await coordinator.prober.run_round()  # one failed probe: no flapping, still published
        assert node_names(json.loads((await http(url)).body)) == ["900a", "900b"]
        await coordinator.prober.run_round()  # two that agree: down
        assert node_names(json.loads((await http(url)).body)) == ["900a"]
        status = json.loads((await http(coordinator.url + "/status.json")).body)
        b = status["regions"][0]["nodes"][1]
        assert (b["name"], b["status"], b["published"]) == ("900b", "down", False)
        assert b["last_error"] == "derp: refused"  # anonymous viewers see the class only
        detailed = json.loads((await http(coordinator.url + "/status.json", Authorization=f"Bearer {TOKEN}")).body)
        assert detailed["regions"][0]["nodes"][1]["last_error"] == "derp: connection refused"
        # every node of the region down: the region keeps its nodes instead of vanishing
        fake_probe.down["900a"] = "timeout"
        await coordinator.prober.run_round()
        await coordinator.prober.run_round()
        assert coordinator.state.entries["900a"].status == "down"
        assert node_names(json.loads((await http(url)).body)) == ["900a", "900b"]
        fake_probe.down.clear()
        await coordinator.prober.run_round()
        assert coordinator.state.entries["900a"].status == "down"  # one good probe is not enough
        await coordinator.prober.run_round()
        assert coordinator.state.entries["900a"].status == "up"
        assert node_names(json.loads((await http(url)).body)) == ["900a", "900b"]
        metrics = (await http(coordinator.url + "/metrics")).body.decode()
    assert 'derpd_coordinator_node_up{node="900b",region="900"} 1.0' in metrics
    assert 'derpd_coordinator_probe_success{node="900a",probe="derp",region="900"} 1.0' in metrics
    assert 'derpd_coordinator_probe_latency_seconds_count{node="900a",probe="https"} 4.0' in metrics
    assert 'derpd_coordinator_probe_last_success_timestamp_seconds{node="900a"}' in metrics


async def test_region_vanishes_when_keep_is_off(coordinator: RunningCoordinator, fake_probe: FakeProbe) -> None:
    from dataclasses import replace
    coordinator.state.reload(replace(coordinator.state.config, keep_region_when_down=False))
    fake_probe.down.update({"900a": "x", "900b": "y"})
    with trio.fail_after(10):
        await coordinator.prober.run_round()
        await coordinator.prober.run_round()
        doc = json.loads((await http(coordinator.url + "/derpmap/default")).body)
    assert doc == {"Regions": {}, "omitDefaultRegions": True}


async def test_registered_node_expires_after_ttl(coordinator: RunningCoordinator) -> None:
    with trio.fail_after(10):
        assert (await register(coordinator.url, EDGE)).status == 200
        state = coordinator.state
        assert state.expire(trio.current_time() + 29) == []
        assert state.expire(trio.current_time() + 31) == ["901a"]
        doc = json.loads((await http(coordinator.url + "/derpmap/default")).body)
    assert "901" not in doc["Regions"] and "901a" not in node_names(doc)


async def test_status_page_shows_down_node(coordinator: RunningCoordinator, fake_probe: FakeProbe) -> None:
    fake_probe.down["900b"] = "TLS handshake failed <script>"
    with trio.fail_after(10):
        await coordinator.prober.run_round()
        await coordinator.prober.run_round()
        resp = await http(coordinator.url + "/status", Authorization=f"Bearer {TOKEN}")
    page = resp.body.decode()
    assert resp.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in resp.headers["content-security-policy"]
    assert 'data-node="900b" data-status="down"' in page
    assert 'data-node="900a" data-status="up"' in page
    assert "TLS handshake failed &lt;script&gt;" in page and "<script" not in page
    assert '<meta http-equiv="refresh"' in page
    assert "http://" not in page and "https://" not in page  # no external assets


async def test_bad_reload_keeps_last_good_map(coordinator: RunningCoordinator, tmp_path: Path) -> None:
    before = await http(coordinator.url + "/derpmap/default")
    bad = tmp_path / "bad.toml"
    bad.write_text('[[regions]]\nid = 900\ncode = "x"\n[[regions.nodes]]\nname = "a"\nhostname = "h"\n'
                   '[[regions.nodes]]\nname = "a"\nhostname = "h"\n')
    assert coordinator_reload(coordinator, bad) is False
    bad.write_text("[[regions]\n")
    assert coordinator_reload(coordinator, bad) is False
    with trio.fail_after(10):
        after = await http(coordinator.url + "/derpmap/default")
    assert after.body == before.body
    good = tmp_path / "good.toml"
    good.write_text('[[regions]]\nid = 7\ncode = "seven"\n[[regions.nodes]]\nname = "7a"\nhostname = "localhost"\n')
    assert coordinator_reload(coordinator, good) is True
    with trio.fail_after(10):
        doc = json.loads((await http(coordinator.url + "/derpmap/default")).body)
    assert node_names(doc) == ["7a"]
    assert coordinator.state.config.token == TOKEN  # kept across a reload without token_file


def coordinator_reload(coordinator: RunningCoordinator, path: Path) -> bool:
    return coordinator.reload_from(path)
