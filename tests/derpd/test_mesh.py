"""A three-node region on loopback: forwarding both ways, a node killed and restarted, a client
moving between nodes, and ClosePeer from the admin command's code path."""

from __future__ import annotations

from dataclasses import dataclass

import trio

from derpd import client as derp_client
from derpd.keys import NodePrivate
from derpd.mesh import MeshTarget, close_peer, parse_mesh_with, run_mesh
from derpd.protocol.frames import PeerGoneReason
from derpd.protocol.messages import PeerGone, RecvPacket
from derpd.relay.listener import RunningRelay, serve_relay
from derpd.settings import RelaySettings

from .conftest import recv_skipping_keepalives

MESH_KEY = bytes(range(100, 132))


@dataclass
class Node:
    running: RunningRelay
    scope: trio.CancelScope

    @property
    def url(self) -> str:
        return self.running.derp_url


async def start_node(nursery: trio.Nursery, key: NodePrivate, port: int, peers: list[int]) -> Node:
    """A relay plus its mesh links, in a cancel scope that kills both at once."""

    async def node(task_status: trio.TaskStatus[Node]) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                settings = RelaySettings(addr=f"127.0.0.1:{port}", private_key=key, mesh_key=MESH_KEY)
                running = await inner.start(serve_relay, settings)
                targets = [MeshTarget(f"127.0.0.1:{p}") for p in peers]
                await inner.start(run_mesh, running.server, targets, MESH_KEY)
                task_status.started(Node(running, scope))

    return await nursery.start(node)


async def wait_until(nodes: list[Node], condition) -> None:
    """Wait, without polling, until ``condition()`` holds after some registry change.  The
    change events are taken before each check, so a change racing the check is not missed."""
    while True:
        events = [n.running.server.registry.change_event() for n in nodes]
        if condition():
            return
        async with trio.open_nursery() as nursery:
            for ev in events:
                async def one(ev=ev) -> None:
                    await ev.wait()
                    nursery.cancel_scope.cancel()
                nursery.start_soon(one)


async def wait_mesh(nodes: list[Node], keys: list[NodePrivate]) -> None:
    """Until every node knows every key (locally or through a mesh peer)."""
    await wait_until(nodes, lambda: all(
        k.public.raw in n.running.server.registry.active or k.public.raw in n.running.server.registry.forwarders
        for n in nodes for k in keys))


async def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = trio.socket.socket()
        await s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


async def test_three_node_region_forwards_heals_and_follows_moves(nursery):
    ports = await free_ports(3)
    node_keys = [NodePrivate.generate() for _ in ports]
    nodes = [await start_node(nursery, node_keys[i], ports[i], [p for p in ports if p != ports[i]])
             for i in range(3)]
    a, b, c = (NodePrivate.generate() for _ in range(3))
    with trio.fail_after(30):
        async with (
            derp_client.connect(nodes[0].url, a) as ca,
            derp_client.connect(nodes[1].url, b) as cb,
        ):
            await wait_mesh(nodes, [a, b])
            # both directions across nodes, with the original source key
            await ca.send(b.public, b"1 to 2")
            assert await recv_skipping_keepalives(cb) == RecvPacket(a.public, b"1 to 2")
            await cb.send(a.public, b"2 to 1")
            assert await recv_skipping_keepalives(ca) == RecvPacket(b.public, b"2 to 1")
            assert nodes[0].running.server.stats.packets_forwarded_out >= 1
            assert nodes[1].running.server.stats.packets_forwarded_in >= 1

            # c lives on node 3; then node 3 dies: a (who received from c) gets PeerGone.
            async with derp_client.connect(nodes[2].url, c) as cc:
                await wait_mesh(nodes, [c])
                await cc.send(a.public, b"from 3")
                assert (await recv_skipping_keepalives(ca)).data == b"from 3"
                nodes[2].scope.cancel()
                assert await recv_skipping_keepalives(ca) == PeerGone(c.public, PeerGoneReason.DISCONNECTED)
            # the survivors keep relaying
            await ca.send(b.public, b"still meshed")
            assert (await recv_skipping_keepalives(cb)).data == b"still meshed"

            # restart node 3 on its port: the region heals without touching the others
            nodes[2] = await start_node(nursery, node_keys[2], ports[2], ports[:2])
            async with derp_client.connect(nodes[2].url, c) as cc:
                await wait_mesh(nodes, [a, b, c])
                await cc.send(b.public, b"healed")
                assert (await recv_skipping_keepalives(cb)).data == b"healed"
                await cb.send(c.public, b"and back")
                assert (await recv_skipping_keepalives(cc)).data == b"and back"

                # b moves from node 2 to node 1 and keeps receiving from c (on node 3)
                async with derp_client.connect(nodes[0].url, b) as cb2:
                    reg0 = nodes[0].running.server.registry
                    await wait_until(nodes, lambda: len(reg0.connections(b.public.raw)) == 1)
                    await cb.aclose()
                    await wait_until(nodes, lambda: b.public.raw not in nodes[1].running.server.registry.active)
                    # node 3 forwards to the route it learned first (as derper's multiForwarder):
                    # wait until node 2's PeerGone has removed the old route, leaving node 1's.
                    fwds3 = nodes[2].running.server.registry.forwarders
                    await wait_until(nodes, lambda: [f.target.host for f in fwds3.get(b.public.raw, ())]
                                     == [f"127.0.0.1:{ports[0]}"])
                    await wait_mesh(nodes, [b])
                    await cc.send(b.public, b"after the move")
                    got = await recv_skipping_keepalives(cb2)
                    assert got == RecvPacket(c.public, b"after the move")


async def test_close_peer_and_self_in_mesh_list(nursery):
    ports = await free_ports(1)
    key = NodePrivate.generate()
    node = await start_node(nursery, key, ports[0], [ports[0]])  # itself: skipped after login
    victim = NodePrivate.generate()
    with trio.fail_after(10):
        assert node.running.server.mesh_peers_configured == 1
        async with derp_client.connect(node.url, victim) as cv:
            await close_peer(node.url, victim.public, MESH_KEY)
            closed = False
            try:
                while True:
                    await cv.recv()
            except (trio.EndOfChannel, trio.BrokenResourceError):
                closed = True
            assert closed
    assert node.running.server.mesh_peers_connected == 0  # never meshed with itself


def test_parse_mesh_with():
    assert parse_mesh_with("a.example.com, b.example.com/10.0.0.2 ,") == [
        MeshTarget("a.example.com"), MeshTarget("b.example.com", "10.0.0.2")]


async def test_congested_mesh_link_pushes_back_on_the_sender(nursery):
    """A backed-up mesh link makes the sender's reader wait for it (as derper's reader waits on
    its mesh write) instead of dropping packets."""
    import trio.testing

    from .conftest import start_relay

    relay = await start_relay(nursery)
    remote = NodePrivate.generate()

    class SlowLink:
        def __init__(self) -> None:
            self.got: list[bytes] = []
            self.congested = False
            self.two = trio.Event()
            self.released = trio.Event()
            self.waits = 0

        def forward(self, src: bytes, dst: bytes, packet: bytes) -> bool:
            self.got.append(packet)
            self.congested = len(self.got) >= 2
            if len(self.got) == 2:
                self.two.set()
            return True

        async def wait_drained(self) -> None:
            self.waits += 1
            await self.released.wait()
            self.congested = False

    link = SlowLink()
    relay.server.registry.add_forwarder(remote.public.raw, link)
    with trio.fail_after(10):
        async with derp_client.connect(relay.derp_url, NodePrivate.generate()) as c:
            await c.send_many([(remote.public, b"p1"), (remote.public, b"p2"), (remote.public, b"p3")])
            await link.two.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert link.got == [b"p1", b"p2"] and link.waits == 1  # the reader waits on the link
            link.released.set()
            await c.ping()  # read after the third packet
            assert link.got == [b"p1", b"p2", b"p3"]
    assert relay.server.stats.dropped_packets["queue_head", "other"] == 0
