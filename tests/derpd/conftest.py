"""Fixtures for relay tests: a real relay on 127.0.0.1 port 0, and helpers to talk to it."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from derpd import client as derp_client
from derpd.keys import NodePrivate
from derpd.protocol.messages import KeepAlive, RecvPacket
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


async def http(relay: RunningRelay, request: bytes) -> bytes:
    """Send raw request bytes to the relay port; returns everything until it closes."""
    with trio.fail_after(10):
        stream = await raw_connect(relay)
        await stream.send_all(request)
        return await read_until_closed(stream)


async def assert_relay_still_serves(relay: RunningRelay) -> None:
    """Two fresh clients can still exchange a packet."""
    a, b = NodePrivate.generate(), NodePrivate.generate()
    async with derp_client.connect(relay.derp_url, a) as ca, derp_client.connect(relay.derp_url, b) as cb:
        await ca.send(b.public, b"still here")
        ev = await recv_skipping_keepalives(cb)
        assert ev.data == b"still here" and ev.src == a.public


def replace_settings(relay: RunningRelay, **changes: object) -> None:
    relay.server.settings = dataclasses.replace(relay.server.settings, **changes)  # type: ignore[arg-type]


@asynccontextmanager
async def held_clients(url: str, keys: list[NodePrivate]) -> AsyncIterator[dict]:
    """Log every key in to ``url`` at once; yields {public key: client} while they stay connected."""
    clients: dict = {}
    done = trio.Event()
    all_in = trio.Event()

    async def hold(k: NodePrivate) -> None:
        async with derp_client.connect(url, k) as c:
            clients[k.public] = c
            if len(clients) == len(keys):
                all_in.set()
            await done.wait()

    async with trio.open_nursery() as nursery:
        for k in keys:
            nursery.start_soon(hold, k)
        await all_in.wait()
        try:
            yield clients
        finally:
            done.set()


async def relay_in_a_ring(keys: list[NodePrivate], clients: dict, tag: bytes = b"") -> None:  # noqa: ANN001
    """Every client sends to the next one; each retries until its packet arrives (across
    --workers, the mesh between the workers learns new keys asynchronously).  Skips PeerGone."""
    for i, k in enumerate(keys):
        dst = keys[(i + 1) % len(keys)]
        got = None
        while got is None:
            await clients[k.public].send(dst.public, tag + b"%d" % i)
            with trio.move_on_after(0.5):
                got = await recv_skipping_keepalives(clients[dst.public])
                while not isinstance(got, RecvPacket):  # PeerGone of clients on a worker that died
                    got = await recv_skipping_keepalives(clients[dst.public])
        assert got == RecvPacket(k.public, tag + b"%d" % i)
