"""The node side of registration against a real coordinator."""

from __future__ import annotations

import json
import logging
from functools import partial

import pytest
import trio

from derpd.coordinator.announce import AnnounceRefused, announce_forever, announce_once, registration_url
from derpd.coordinator.server import RunningCoordinator
from derpd.keys import NodePrivate

from .conftest import TOKEN, http, node_names

NODE = {"Name": "901x", "RegionID": 901, "RegionCode": "edge", "HostName": "localhost", "IPv4": "127.0.0.1",
        "DERPPort": 4, "STUNPort": 5, "PublicKey": str(NodePrivate.generate().public)}


def test_registration_url() -> None:
    assert registration_url("http://c:8080") == "http://c:8080/v1/nodes"
    assert registration_url("http://c:8080/") == "http://c:8080/v1/nodes"
    assert registration_url("http://c:8080/derpmap/default") == "http://c:8080/v1/nodes"


async def test_announce_forever_registers(nursery: trio.Nursery, coordinator: RunningCoordinator) -> None:
    with trio.fail_after(10):
        await nursery.start(partial(announce_forever, coordinator.url, TOKEN, NODE, interval=30))
        doc = json.loads((await http(coordinator.url + "/derpmap/default")).body)
    assert "901x" in node_names(doc)
    entry = coordinator.state.entries["901x"]
    assert entry.public_key == NODE["PublicKey"] and entry.source == "registered"


async def test_wrong_token_is_logged_once_and_changes_nothing(
        nursery: trio.Nursery, coordinator: RunningCoordinator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "derpd.coordinator.announce")
    with trio.fail_after(10):
        with pytest.raises(AnnounceRefused) as info:
            await announce_once(coordinator.url, "wrong-token-wrong-token", NODE)
        assert info.value.status == 401
        await nursery.start(partial(announce_forever, coordinator.url, "wrong-token-wrong-token", NODE,
                                    interval=30))
        doc = json.loads((await http(coordinator.url + "/derpmap/default")).body)
    assert "901x" not in node_names(doc)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "401" in lines[0] and "Authorization: Bearer" in lines[0]


async def test_unreachable_coordinator_does_not_block_start(nursery: trio.Nursery) -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()  # nothing listens there now
    with trio.fail_after(10):
        await nursery.start(partial(announce_forever, f"http://127.0.0.1:{port}", TOKEN, NODE, interval=30))
    nursery.cancel_scope.cancel()
