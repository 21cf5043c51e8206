"""Packets for a client that is moving (derpd.relay.parking): held while it logs in again, here
or on a mesh peer, and dropped as before when it does not come back."""

from __future__ import annotations

import trio

from derpd import client as derp_client
from derpd.keys import NodePrivate
from derpd.metrics import RelayStats
from derpd.protocol.messages import RecvPacket
from derpd.relay.parking import Parking

from .conftest import recv_skipping_keepalives, start_relay
from .test_mesh import free_ports, start_node, wait_mesh, wait_until

DISCO = b"TS\xf0\x9f\x92\xac" + bytes(56)


async def test_a_client_that_logs_in_again_gets_what_was_sent_meanwhile(nursery):
    relay = await start_relay(nursery)
    registry = relay.server.registry
    a, b = NodePrivate.generate(), NodePrivate.generate()
    with trio.fail_after(10):
        async with derp_client.connect(relay.derp_url, a) as ca:
            async with derp_client.connect(relay.derp_url, b) as cb:
                await ca.send(b.public, b"before")
                assert await recv_skipping_keepalives(cb) == RecvPacket(a.public, b"before")
            while b.public.raw in registry.active:
                await trio.sleep(0.01)
            await ca.send_many([(b.public, b"meanwhile"), (b.public, DISCO)])
            await ca.ping()  # both handled
            assert registry.parking.count == 2
            async with derp_client.connect(relay.derp_url, b) as cb:
                assert await recv_skipping_keepalives(cb) == RecvPacket(a.public, b"meanwhile")
                assert await recv_skipping_keepalives(cb) == RecvPacket(a.public, DISCO)
                await ca.send(b.public, b"after")
                assert await recv_skipping_keepalives(cb) == RecvPacket(a.public, b"after")
    stats = relay.server.stats
    assert registry.parking.delivered == 2 and registry.parking.count == 0
    assert stats.dropped_packets["unknown_dest", "disco"] == stats.dropped_packets["unknown_dest", "other"] == 0


async def test_a_client_moving_to_another_node_gets_what_was_sent_meanwhile(nursery):
    ports = await free_ports(2)
    nodes = [await start_node(nursery, NodePrivate.generate(), ports[i], [ports[1 - i]]) for i in range(2)]
    regs = [n.running.server.registry for n in nodes]
    a, b = NodePrivate.generate(), NodePrivate.generate()
    with trio.fail_after(20):
        async with derp_client.connect(nodes[0].url, a) as ca:
            async with derp_client.connect(nodes[0].url, b) as cb:
                await wait_mesh(nodes, [a, b])
                await ca.send(b.public, b"before")
                assert await recv_skipping_keepalives(cb) == RecvPacket(a.public, b"before")
            await wait_until(nodes, lambda: all(b.public.raw not in r.active and b.public.raw not in r.forwarders
                                                for r in regs))
            await ca.send_many([(b.public, DISCO), (b.public, b"meanwhile")])
            await ca.ping()
            assert regs[0].parking.count == 2
            async with derp_client.connect(nodes[1].url, b) as cb:  # b logs in on the other node
                assert await recv_skipping_keepalives(cb) == RecvPacket(a.public, DISCO)
                assert await recv_skipping_keepalives(cb) == RecvPacket(a.public, b"meanwhile")
    assert regs[0].parking.delivered == 2
    assert nodes[0].running.server.stats.packets_forwarded_out >= 2


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Local:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def enqueue(self, frame: bytes, disco: bool) -> bool:
        self.frames.append(frame)
        return False


class Link:
    def __init__(self) -> None:
        self.got: list[tuple[bytes, bytes, bytes]] = []

    def forward(self, src: bytes, dst: bytes, packet: bytes) -> bool:
        self.got.append((src, dst, packet))
        return True


SRC, DST, OTHER = b"s" * 32, b"d" * 32, b"o" * 32


def test_only_keys_that_left_just_now_are_held_and_what_expires_counts_as_dropped():
    stats, clock = RelayStats(), Clock()
    p = Parking(stats, hold=1.5, clock=clock)
    assert not p.park(SRC, OTHER, b"x", False, False)  # never here: dropped at once by the caller
    p.left(DST)
    assert p.park(SRC, DST, DISCO, True, False) and p.park(SRC, DST, b"y", False, True)
    clock.now += 1.4
    p.expire()
    assert p.count == 2
    clock.now += 0.2
    p.expire()
    assert p.count == 0 and not p.park(SRC, DST, b"z", False, False)
    assert stats.dropped_packets["unknown_dest", "disco"] == 1
    assert stats.dropped_packets["unknown_dest_on_fwd", "other"] == 1


def test_held_packets_go_to_a_mesh_peer_unless_they_came_over_the_mesh():
    p = Parking(RelayStats(), clock=Clock())
    p.left(DST)
    p.park(SRC, DST, b"from a local client", False, False)
    p.park(SRC, DST, b"forwarded to us", False, True)
    link, local = Link(), Local()
    p.arrived_elsewhere(DST, link)
    assert link.got == [(SRC, DST, b"from a local client")]  # never a second mesh hop
    watched: list[bytes] = []
    p.arrived_here(DST, local, watched.append)
    assert local.frames == [bytes([5]) + (32 + 15).to_bytes(4, "big") + SRC + b"forwarded to us"]
    assert watched == [SRC] and p.count == 0 and p.delivered == 2


def test_the_oldest_goes_first_per_key_and_nothing_is_held_past_the_total():
    stats = RelayStats()
    p = Parking(stats, per_key=2, total=3, clock=Clock())
    p.left(DST)
    p.left(OTHER)
    for data in (b"1", b"2", b"3"):
        assert p.park(SRC, DST, data, False, False)
    assert p.park(SRC, OTHER, b"4", False, False)
    assert not p.park(SRC, OTHER, b"5", False, False)  # 3 held in all
    local = Local()
    p.arrived_here(DST, local, lambda src: None)
    assert [f[-1:] for f in local.frames] == [b"2", b"3"]
    assert stats.dropped_packets["unknown_dest", "other"] == 1
    big = Parking(stats, total_bytes=100, clock=Clock())
    big.left(DST)
    assert big.park(SRC, DST, bytes(60), False, False) and not big.park(SRC, DST, bytes(60), False, False)
    big.arrived_here(DST, Local(), lambda src: None)
    assert big.count == big.nbytes == 0 and big.park(SRC, OTHER, bytes(60), False, False) is False
