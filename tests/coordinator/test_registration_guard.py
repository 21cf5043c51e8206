"""Registrations that must not change anything: a name held by another key (hijack), an
InsecureForTests node, bodies that are slow, cut short or malformed.  Each refusal is counted."""

from __future__ import annotations

import json
from dataclasses import replace

import trio
import trio.testing

from derpd.coordinator.server import RunningCoordinator
from derpd.keys import NodePrivate

from .conftest import TOKEN, http, node_names, register

EDGE = {"Name": "901a", "RegionID": 901, "RegionCode": "edge", "HostName": "localhost", "IPv4": "127.0.0.1",
        "DERPPort": 3}


async def metric(coordinator: RunningCoordinator, result: str) -> float:
    text = (await http(coordinator.url + "/metrics")).body.decode()
    line = f'derpd_coordinator_registrations_total{{result="{result}"}} '
    return float(next(x for x in text.splitlines() if x.startswith(line)).split()[-1])


async def test_another_key_cannot_take_over_a_node_until_it_expires(coordinator: RunningCoordinator) -> None:
    owner, thief = str(NodePrivate.generate().public), str(NodePrivate.generate().public)
    with trio.fail_after(10):
        assert (await register(coordinator.url, {**EDGE, "PublicKey": owner})).status == 200
        before = await http(coordinator.url + "/derpmap/default")
        for body in ({**EDGE, "PublicKey": thief, "HostName": "evil.example"}, {**EDGE, "HostName": "evil.example"}):
            resp = await register(coordinator.url, body)
            assert resp.status == 409
            doc = json.loads(resp.body)
            assert doc["field"] == "PublicKey" and "expires" in doc["error"]
        after = await http(coordinator.url + "/derpmap/default")
        assert after.body == before.body
        assert coordinator.state.entries["901a"].public_key == owner
        assert await metric(coordinator, "conflict") == 2
        # once the owner's registration has expired, the name is free again
        coordinator.state.expire(trio.current_time() + coordinator.state.config.node_ttl + 1)
        assert (await register(coordinator.url, {**EDGE, "PublicKey": thief})).status == 200
        assert coordinator.state.entries["901a"].public_key == thief


async def test_insecure_for_tests_is_never_accepted(coordinator: RunningCoordinator) -> None:
    with trio.fail_after(10):
        resp = await register(coordinator.url, {**EDGE, "InsecureForTests": True})
        assert resp.status == 400 and json.loads(resp.body)["field"] == "InsecureForTests"
        doc = json.loads((await http(coordinator.url + "/derpmap/default")).body)
    assert "901a" not in node_names(doc)


async def test_changed_entry_is_not_rate_limited_like_a_heartbeat(coordinator: RunningCoordinator) -> None:
    """A new pin right after a heartbeat is taken at once; a repeat of the same entry is a 429."""
    pin = "sha256-raw:" + "1" * 64
    coordinator.state.reload(replace(coordinator.state.config, min_heartbeat_interval=30.0))
    with trio.fail_after(10):
        assert (await register(coordinator.url, EDGE)).status == 200
        assert (await register(coordinator.url, EDGE)).status == 429
        assert (await register(coordinator.url, {**EDGE, "CertName": pin})).status == 200
        doc = json.loads((await http(coordinator.url + "/derpmap/default")).body)
        assert doc["Regions"]["901"]["Nodes"][0]["CertName"] == pin
        # but a registrant cannot churn the map: a few changes back to back, then 429
        statuses = [(await register(coordinator.url, {**EDGE, "DERPPort": 10 + i})).status for i in range(5)]
    assert statuses == [200, 200, 429, 429, 429]


async def _raw(coordinator: RunningCoordinator, data: bytes) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", coordinator.port)
    await stream.send_all(data)
    return stream


HEAD = (b"POST /v1/nodes HTTP/1.1\r\nHost: c\r\nAuthorization: Bearer " + TOKEN.encode() +
        b"\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n")


async def test_slow_body_gets_408_and_changes_nothing(coordinator: RunningCoordinator) -> None:
    coordinator.state.reload(replace(coordinator.state.config, body_timeout=0.3))
    before = coordinator.state.published.etag
    with trio.fail_after(10):
        stream = await _raw(coordinator, HEAD + b'{"Name": "901a", ')
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            answer += chunk
        await stream.aclose()
    assert answer.startswith(b"HTTP/1.1 408")
    assert b'"error": "the body did not arrive within 0.3 s"' in answer
    assert coordinator.state.published.etag == before
    assert await metric(coordinator, "slow_body") == 1


async def test_truncated_body_changes_nothing(coordinator: RunningCoordinator) -> None:
    before = coordinator.state.published.etag
    with trio.fail_after(10):
        stream = await _raw(coordinator, HEAD + json.dumps(EDGE).encode()[:40])
        await stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert await metric(coordinator, "truncated") == 1
    assert coordinator.state.published.etag == before and "901a" not in coordinator.state.entries


async def test_malformed_and_large_bodies_are_json_errors(coordinator: RunningCoordinator) -> None:
    with trio.fail_after(10):
        for body, status in ((b"[1, 2", 400), (b'"x"', 400), (b"{}", 400), (b"x" * 20000, 413)):
            resp = await http(coordinator.url + "/v1/nodes", "POST", body, Authorization=f"Bearer {TOKEN}")
            assert resp.status == status and "error" in json.loads(resp.body)
        assert await metric(coordinator, "bad_request") == 3
        assert await metric(coordinator, "too_large") == 1
