"""Fixtures for the coordinator: a real server on 127.0.0.1 port 0 with a controllable prober."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
import trio

from derpd.coordinator.config import CoordinatorConfig, parse_config
from derpd.coordinator.httpclient import Response, request
from derpd.coordinator.server import RunningCoordinator, serve_coordinator
from derpd.coordinator.state import ProbeResult, ProbeTarget

TOKEN = "test-token-0123456789abcdef"

# Loopback only: these nodes are never dialled (the fake prober answers for them).
CONFIG_TEXT = """
[coordinator]
probe_interval = 5
node_ttl = 30
min_heartbeat_interval = 1
omit_default_regions = true
allow_loopback_nodes = true

[[regions]]
id = 900
code = "home"
name = "Home"

[[regions.nodes]]
name = "900a"
hostname = "localhost"
ipv4 = "127.0.0.1"
derp_port = 1

[[regions.nodes]]
name = "900b"
hostname = "localhost"
ipv4 = "127.0.0.1"
derp_port = 2

[[regions]]
id = 901
code = "edge"
name = "Edge"
"""


class FakeProbe:
    """A probe whose answer per node name the test sets; unknown nodes are healthy."""

    def __init__(self) -> None:
        self.down: dict[str, str] = {}
        self.calls: list[str] = []

    async def __call__(self, target: ProbeTarget) -> ProbeResult:
        node = target.node
        self.calls.append(node.name)
        if node.name in self.down:
            return ProbeResult(time.time(), {"stun": 0.001}, {"derp": self.down[node.name]},
                               classes={"derp": "refused"})
        return ProbeResult(time.time(), {"https": 0.002, "derp": 0.003, "stun": 0.001})


def make_config(**overrides: Any) -> CoordinatorConfig:
    return replace(parse_config(CONFIG_TEXT, "test.toml"), token=TOKEN, **overrides)


@pytest.fixture
def fake_probe() -> FakeProbe:
    return FakeProbe()


@pytest.fixture
async def coordinator(nursery: trio.Nursery, fake_probe: FakeProbe) -> AsyncIterator[RunningCoordinator]:
    with trio.fail_after(10):
        running: RunningCoordinator = await nursery.start(
            lambda task_status: serve_coordinator(make_config(), listen="127.0.0.1:0", probe=fake_probe,
                                                  probing=False, task_status=task_status))
    yield running


async def http(url: str, method: str = "GET", body: bytes = b"", **headers: str) -> Response:
    with trio.fail_after(10):
        return await request(url, method, body=body, headers={k.replace("_", "-"): v for k, v in headers.items()})


async def register(base: str, doc: dict[str, Any], token: str = TOKEN) -> Response:
    return await http(base + "/v1/nodes", "POST", json.dumps(doc).encode(), Authorization=f"Bearer {token}")


def node_names(doc: dict[str, Any]) -> list[str]:
    return [n["Name"] for r in doc["Regions"].values() for n in r["Nodes"]]
