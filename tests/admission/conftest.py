"""Fixtures: a relay on 127.0.0.1 port 0 and a fake headscale ``/verify``."""

from __future__ import annotations

import pytest
import trio

from derpd import client as derp_client
from derpd.keys import NodePrivate
from derpd.protocol.errors import RemoteProtocolError
from derpd.protocol.messages import KeepAlive
from derpd.relay.listener import RunningRelay, serve_relay
from derpd.settings import RelaySettings

from .fake_headscale import FakeHeadscale


async def start_relay(nursery: trio.Nursery, **overrides: object) -> RunningRelay:
    settings = RelaySettings(addr="127.0.0.1:0", **overrides)  # type: ignore[arg-type]
    return await nursery.start(serve_relay, settings)


@pytest.fixture
async def relay(nursery: trio.Nursery) -> RunningRelay:
    return await start_relay(nursery)


@pytest.fixture
async def headscale(nursery: trio.Nursery) -> FakeHeadscale:
    return await nursery.start(FakeHeadscale().serve)


async def logs_in(relay: RunningRelay, key: NodePrivate, **kw: object) -> bool:
    """True if ``key`` completes the login (ServerInfo arrives and a ping is answered)."""
    try:
        async with derp_client.connect(relay.derp_url, key, **kw) as c:  # type: ignore[arg-type]
            await c.ping()
            return True
    except (derp_client.DerpClientError, RemoteProtocolError, trio.BrokenResourceError, OSError):
        return False


async def recv_data(c: derp_client.DerpClient) -> bytes:
    while True:
        ev = await c.recv()
        if not isinstance(ev, KeepAlive):
            return ev.data
