"""ClosePeer and shutdown take effect whenever they arrive after a login, including the moment
between registration (when watchers hear PeerPresent) and the start of the connection's tasks
(while ServerInfo is being written).  Raced against fresh logins many times."""

from __future__ import annotations

import trio

from derpd import client as derp_client
from derpd.keys import NodePrivate, NodePublic
from derpd.protocol.errors import RemoteProtocolError
from derpd.protocol.messages import Health, KeepAlive, PeerPresent, Restarting

from .conftest import assert_relay_still_serves, start_relay

MESH_KEY = bytes(range(32))
ROUNDS = 30


async def closed_within(c: derp_client.DerpClient, seconds: float) -> bool:
    with trio.move_on_after(seconds):
        try:
            while True:
                await c.recv()
        except (trio.EndOfChannel, trio.BrokenResourceError, RemoteProtocolError, OSError):
            return True
    return False


class CloseOnPresent:
    """A watcher that closes every key the moment it registers: the earliest a mesh peer's
    ClosePeer can possibly arrive (before the new connection's tasks have started)."""

    key = bytes(32)
    public = NodePublic(bytes(32))
    remote_ip, remote_port, present_flags, is_dup = "192.0.2.1", 1, 0, False

    def __init__(self, server) -> None:
        self.server = server
        self.saw_src: set[bytes] = set()

    def send_control(self, frame: bytes) -> None:
        self.server.close_peer(NodePublic(frame[5:37]))

    def enqueue(self, frame: bytes, disco: bool) -> bool:
        return False


async def test_close_peer_at_registration_always_closes(nursery):
    relay = await start_relay(nursery)
    relay.server.registry.watchers.add(CloseOnPresent(relay.server))
    closed = 0
    with trio.fail_after(60):
        for _ in range(ROUNDS):
            try:
                async with derp_client.connect(relay.derp_url, NodePrivate.generate()) as c:
                    closed += await closed_within(c, 5)
            except (RemoteProtocolError, trio.BrokenResourceError, OSError):
                closed += 1  # closed before ServerInfo was read: closed too
    assert closed == ROUNDS
    assert relay.server.stats.current_connections == 0


async def test_close_peer_from_a_mesh_peer_races_fresh_logins(nursery):
    """Over real sockets: a mesh peer watching connections sends ClosePeer the moment it hears
    PeerPresent for a fresh login; every one of those logins ends."""
    relay = await start_relay(nursery, mesh_key=MESH_KEY)
    closed = 0
    with trio.fail_after(90):
        async with derp_client.connect(relay.derp_url, NodePrivate.generate(), mesh_key=MESH_KEY) as mesh:
            await mesh.watch_conns()

            async def closer() -> None:
                while True:
                    ev = await mesh.recv()
                    if isinstance(ev, PeerPresent) and ev.peer != mesh.public_key:
                        await mesh.close_peer(ev.peer)

            async with trio.open_nursery() as n:
                n.start_soon(closer)
                for _ in range(ROUNDS):
                    try:
                        async with derp_client.connect(relay.derp_url, NodePrivate.generate()) as c:
                            closed += await closed_within(c, 5)
                    except (RemoteProtocolError, trio.BrokenResourceError, OSError):
                        closed += 1
                n.cancel_scope.cancel()
    assert closed == ROUNDS
    await assert_relay_still_serves(relay)


async def test_logins_that_finish_during_shutdown_are_told_to_reconnect(nursery):
    """Shutdown begins while logins are in flight: every client that completes its login
    gets Restarting before the relay closes it, however late it finished."""
    told = logged_in = 0
    with trio.fail_after(90):
        for _ in range(5):
            async with trio.open_nursery() as inner:
                relay = await start_relay(inner)
                registered = 0

                class ShutDownAtTenth(CloseOnPresent):
                    def send_control(self, frame: bytes) -> None:
                        nonlocal registered
                        registered += 1
                        if registered == 10:
                            relay.shutdown(1.0)

                relay.server.registry.watchers.add(ShutDownAtTenth(relay.server))

                async def client() -> None:
                    nonlocal told, logged_in
                    try:
                        async with derp_client.connect(relay.derp_url, NodePrivate.generate()) as c:
                            logged_in += 1
                            while not isinstance(ev := await c.recv(), Restarting):
                                assert isinstance(ev, KeepAlive | PeerPresent | Health)  # Health: "restarting"
                            told += 1
                    except (RemoteProtocolError, trio.BrokenResourceError, trio.EndOfChannel, OSError,
                            derp_client.DerpClientError):
                        pass

                async with trio.open_nursery() as clients:
                    for _ in range(40):
                        clients.start_soon(client)
    print(f"\n[shutdown race] {logged_in} logins completed around 5 shutdowns, {told} told to reconnect")
    assert logged_in >= 50 and told == logged_in
