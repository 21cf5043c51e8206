"""Fixtures for relay tests: a real relay on 127.0.0.1 port 0, and helpers to talk to it."""

from __future__ import annotations

import dataclasses

import pytest
import trio

from derpd import client as derp_client
from derpd.keys import NodePrivate
from derpd.protocol.messages import KeepAlive
from derpd.relay.listener import RunningRelay, serve_relay
from derpd.settings import RelaySettings


async def start_relay(nursery: trio.Nursery, **overrides: object) -> RunningRelay:
    settings = RelaySettings(addr="127.0.0.1:0", **overrides)  # type: ignore[arg-type]
    return await nursery.start(serve_relay, settings)


@pytest.fixture
async def relay(nursery: trio.Nursery) -> RunningRelay:
    return await start_relay(nursery)


async def recv_skipping_keepalives(c: derp_client.DerpClient):
    while True:
        ev = await c.recv()
        if not isinstance(ev, KeepAlive):
            return ev


async def raw_connect(relay: RunningRelay) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", relay.port)


async def read_until_closed(stream: trio.abc.Stream, limit: int = 1 << 20) -> bytes:
    """Read until EOF or a reset; returns what arrived."""
    got = bytearray()
    try:
        while len(got) < limit:
            data = await stream.receive_some(65536)
            if not data:
                break
            got += data
    except trio.BrokenResourceError:
        pass
    return bytes(got)


async def assert_relay_still_serves(relay: RunningRelay) -> None:
    """Two fresh clients can still exchange a packet."""
    a, b = NodePrivate.generate(), NodePrivate.generate()
    async with derp_client.connect(relay.derp_url, a) as ca, derp_client.connect(relay.derp_url, b) as cb:
        await ca.send(b.public, b"still here")
        ev = await recv_skipping_keepalives(cb)
        assert ev.data == b"still here" and ev.src == a.public


def replace_settings(relay: RunningRelay, **changes: object) -> None:
    relay.server.settings = dataclasses.replace(relay.server.settings, **changes)  # type: ignore[arg-type]
