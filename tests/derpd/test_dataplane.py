"""The compiled packet path (derpd/_dataplane.c, derpd/relay/dataplane.py) and the Python one
give the same bytes on the wire.  CI runs this file on both paths (``DERPD_PURE=1`` too); the
first test checks which path each run actually took."""

from __future__ import annotations

import os
import random

import pytest
import trio

from derpd import client as derp_client
from derpd.accel import dataplane
from derpd.keys import NodePrivate
from derpd.protocol.frames import CLIENT_READ_LIMITS, FrameDecoder, FrameType, encode_frame
from derpd.protocol.messages import DISCO_MAGIC, PeerGone, Pong, RecvPacket, parse_server_frame

from .conftest import recv_skipping_keepalives, start_relay
from .test_relay import raw_login

PURE = os.environ.get("DERPD_PURE", "") not in ("", "0")


async def test_plain_clients_take_the_path_this_run_asked_for(relay):
    a, b = NodePrivate.generate(), NodePrivate.generate()
    engine = relay.server.dataplane.engine
    assert (engine is None) == (PURE or dataplane is None)
    with trio.fail_after(10):
        async with derp_client.connect(relay.derp_url, a) as ca, derp_client.connect(relay.derp_url, b) as cb:
            await ca.send(b.public, b"hello")
            assert await recv_skipping_keepalives(cb) == RecvPacket(a.public, b"hello")
            await cb.send(a.public, b"hello back")
            assert await recv_skipping_keepalives(ca) == RecvPacket(b.public, b"hello back")
            if engine is not None:
                assert engine.count() == 2
                conn = relay.server.registry.active[a.public.raw]
                assert conn.engine_slot >= 0
    if engine is not None:
        with trio.fail_after(10):
            while engine.count():  # both connections leave the engine when they close
                await trio.sleep(0.01)


class _Corked(trio.abc.Stream):
    """A TCP stream whose writes wait in a buffer while ``corked``: several TLS records of
    one client leave in one segment, as a fast client's often do."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner, self.corked, self.held = inner, False, b""

    async def send_all(self, data) -> None:
        if self.corked:
            self.held += bytes(data)
        else:
            await self.inner.send_all(data)

    async def uncork(self) -> None:
        self.corked, held, self.held = False, self.held, b""
        await self.inner.send_all(held)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_fast_start_tls_client_that_sends_at_once_is_relayed(nursery, tmp_path):
    """A TLS client that knows the relay's key (from the meta-certificate) sends its request,
    ClientInfo and a burst of packets in its first flight.  The front door reads at most
    16 KiB of it, so TLS records the session has already received are left in the SSLObject
    when the data plane takes the session over: they are relayed at once, not after some
    other client's traffic wakes the relay (a lone sender used to stall for good)."""
    import ssl

    from derpd.protocol.handshake import ClientHandshake
    from derpd.protocol.messages import ClientInfo

    relay = await start_relay(nursery, certmode="manual", certdir=tmp_path, hostname="127.0.0.1")
    a, b = NodePrivate.generate(), NodePrivate.generate()
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # a test of the relay, not of TLS
    burst = [b"first flight %d " % i + bytes(1200) for i in range(40)]  # about 50 KB: past 16 KiB
    with trio.fail_after(10):
        async with derp_client.connect(relay.derp_url, b, cert_pin=relay.cert_pin) as cb:
            corked = _Corked(await trio.open_tcp_stream("127.0.0.1", relay.port))
            tls = trio.SSLStream(corked, ctx, server_hostname="127.0.0.1")
            await tls.do_handshake()
            corked.corked = True
            await tls.send_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n"
                               b"Derp-Fast-Start: 1\r\n\r\n")
            await tls.send_all(ClientHandshake(a, ClientInfo()).client_info_frame(relay.server.settings.private_key.public))
            for payload in burst:  # a TLS record each
                await tls.send_all(encode_frame(FrameType.SEND_PACKET, b.public.raw + payload))
            await corked.uncork()
            for payload in burst:
                assert await recv_skipping_keepalives(cb) == RecvPacket(a.public, payload)
            await trio.aclose_forcefully(tls)


async def test_a_mixed_stream_dribbled_in_odd_pieces(nursery):
    """Packets, a Ping, an unknown frame type, a disco packet for an absent key and NotePreferred,
    cut at random places (single bytes included): every packet arrives once, in order, and the
    sender gets its Pong and its PeerGone(NotHere) -- whichever path reads the socket."""
    relay = await start_relay(nursery)
    a, b = NodePrivate.generate(), NodePrivate.generate()
    absent = NodePrivate.generate().public
    rng = random.Random(15)
    with trio.fail_after(20):
        async with derp_client.connect(relay.derp_url, b) as cb:
            stream = await raw_login(relay, a)
            wire = bytearray()
            sent = []
            for i in range(60):
                body = b"p%03d" % i + bytes(rng.randrange(0, 1400))
                sent.append(body)
                wire += encode_frame(FrameType.SEND_PACKET, b.public.raw + body)
                if i == 10:
                    wire += encode_frame(FrameType.PING, b"12345678")
                if i == 20:
                    wire += encode_frame(0x7F, b"unknown frame type, skipped")
                if i == 30:
                    wire += encode_frame(FrameType.SEND_PACKET, absent.raw + DISCO_MAGIC + bytes(60))
                if i == 40:
                    wire += encode_frame(FrameType.NOTE_PREFERRED, b"\x01")
            pos = 0
            while pos < len(wire):
                n = rng.choice([1, 2, 5, 37, 700, 4096])
                await stream.send_all(bytes(wire[pos : pos + n]))
                pos += n
            got = []
            while len(got) < len(sent):
                ev = await recv_skipping_keepalives(cb)
                assert isinstance(ev, RecvPacket) and ev.src == a.public
                got.append(ev.data)
            assert got == sent
            # a's side: a Pong and a PeerGone(NotHere), in that order
            dec = FrameDecoder(CLIENT_READ_LIMITS)
            seen: list = []
            while len(seen) < 2:
                dec.receive_data(await stream.receive_some(4096))
                for ftype, payload in dec.frames():
                    ev = parse_server_frame(ftype, payload)
                    if isinstance(ev, (Pong, PeerGone)):
                        seen.append(ev)
            assert isinstance(seen[0], Pong) and seen[0].data == b"12345678"
            assert isinstance(seen[1], PeerGone) and seen[1].peer == absent
            stats = relay.server.stats
            assert stats.packets_received == len(sent) + 1  # + the one for the absent key
            assert stats.packets_sent == len(sent)
            assert stats.unknown_frames == 1 and stats.got_ping == 1 and stats.sent_pong == 1
            assert stats.current_home_connections == 1
            await stream.aclose()


async def test_a_websocket_receiver_and_a_plain_sender(nursery):
    """Across the two paths: a plain sender (engine) to a WebSocket receiver (Python writer)
    and back; many packets in one burst arrive whole and in order."""
    relay = await start_relay(nursery)
    a, b = NodePrivate.generate(), NodePrivate.generate()
    ws_url = relay.url.replace("http://", "ws://") + "/derp"
    with trio.fail_after(20):
        async with derp_client.connect(relay.derp_url, a) as ca, derp_client.connect(ws_url, b) as cb:
            for i in range(20):
                await ca.send(b.public, b"to-ws %d" % i)
            for i in range(20):
                assert await recv_skipping_keepalives(cb) == RecvPacket(a.public, b"to-ws %d" % i)
            for i in range(20):
                await cb.send(a.public, b"to-plain %d" % i)
            for i in range(20):
                assert await recv_skipping_keepalives(ca) == RecvPacket(b.public, b"to-plain %d" % i)


async def test_tls_clients_take_the_compiled_path_too(nursery, tmp_path):
    """A TLS session is taken over after the login: packets, a Ping and an unknown frame in
    many small TLS records, a burst of 30 packets the other way, and a KeepAlive-free close."""
    relay = await start_relay(nursery, certmode="manual", certdir=tmp_path, hostname="127.0.0.1")
    engine = relay.server.dataplane.engine
    a, b = NodePrivate.generate(), NodePrivate.generate()
    with trio.fail_after(20):
        async with (
            derp_client.connect(relay.derp_url, a, cert_pin=relay.cert_pin) as ca,
            derp_client.connect(relay.derp_url, b, cert_pin=relay.cert_pin) as cb,
        ):
            await ca.send_raw(encode_frame(FrameType.SEND_PACKET, b.public.raw + b"one")
                              + encode_frame(0x7F, b"skipped") + encode_frame(FrameType.PING, b"abcdefgh"))
            for i in range(50):  # one TLS record each
                await ca.send(b.public, b"tls %d" % i)
            assert await recv_skipping_keepalives(cb) == RecvPacket(a.public, b"one")
            for i in range(50):
                assert await recv_skipping_keepalives(cb) == RecvPacket(a.public, b"tls %d" % i)
            assert await recv_skipping_keepalives(ca) == Pong(b"abcdefgh")
            await cb.send_many([(a.public, b"back %d" % i + bytes(1000)) for i in range(30)])
            for i in range(30):
                assert await recv_skipping_keepalives(ca) == RecvPacket(b.public, b"back %d" % i + bytes(1000))
            if engine is not None:
                assert all(relay.server.registry.active[k.public.raw].engine_slot >= 0 for k in (a, b))
        stats = relay.server.stats
        assert stats.unknown_frames == 1 and stats.sent_pong == 1 and stats.packets_sent == 81


async def test_a_failure_while_serving_one_client_closes_that_client_only(nursery, monkeypatch):
    """An exception raised while a sender's packet is routed (here: the PeerGone bookkeeping
    fails for one sender) closes that sender alone and is counted; the other clients go on.
    The same policy on both paths: the engine's poll() (``where="dataplane"``) and the Python
    connection's tasks (``where="connection"``, derpd.relay.listener)."""
    from derpd.relay.registry import Registry

    a, b, c = NodePrivate.generate(), NodePrivate.generate(), NodePrivate.generate()
    real = Registry.watch_peer_gone

    def failing(self, receiver, src):
        if src == a.public.raw:
            raise LookupError("injected failure")
        real(self, receiver, src)

    monkeypatch.setattr(Registry, "watch_peer_gone", failing)
    relay = await start_relay(nursery)
    with trio.fail_after(20):
        async with derp_client.connect(relay.derp_url, b) as cb, derp_client.connect(relay.derp_url, c) as cc:
            stream = await raw_login(relay, a)
            await stream.send_all(encode_frame(FrameType.SEND_PACKET, b.public.raw + b"from a"))
            while await stream.receive_some(65536):  # the relay closes a
                pass
            await cc.send(b.public, b"from c")
            assert await recv_skipping_keepalives(cb) == RecvPacket(c.public, b"from c")
            await cb.send(c.public, b"from b")
            assert await recv_skipping_keepalives(cc) == RecvPacket(b.public, b"from b")
    where = "connection" if relay.server.dataplane.engine is None else "dataplane"
    assert relay.server.stats.internal_errors == {"connection": 0, "dataplane": 0, where: 1}


async def test_an_exception_out_of_poll_that_no_connection_caused_is_counted_and_the_loop_goes_on():
    """The poll loop's failure policy (derpd/relay/dataplane.py), with a stand-in engine whose
    poll() fails once outside any connection (as the engine's counter flush can): counted,
    logged, and the next poll()'s events are still delivered.  Runs on both paths."""
    import socket

    from derpd.metrics import RelayStats
    from derpd.relay.dataplane import DataPlane

    class Conn:
        def __init__(self) -> None:
            self.closed: list[str] = []
            self.event = trio.Event()

        def close(self, reason: str) -> None:
            self.closed.append(reason)
            self.event.set()

    conn = Conn()
    a, b = socket.socketpair()

    class Engine:
        calls = 0

        def fileno(self) -> int:
            return a.fileno()

        def backlogged(self) -> bool:
            return False

        def poll(self, passthrough):
            Engine.calls += 1
            if Engine.calls == 1:
                raise MemoryError("injected")
            a.recv(100)  # consumed: the descriptor is quiet again
            return [(conn, 2, "read_error")]

    stats = RelayStats()
    dp = DataPlane({}, print, print, stats, send_limit=65536, depth=4, recv_size=65536, write_timeout=0,
                   passthrough=lambda: False)
    dp.engine = Engine()
    with a, b:
        b.send(b"x")
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(dp.run)
                await conn.event.wait()
                nursery.cancel_scope.cancel()
    assert stats.internal_errors["dataplane"] == 1 and conn.closed == ["read_error"] and Engine.calls == 2


async def test_the_engine_write_deadline_runs_on_trios_clock(autojump_clock):
    """The engine reads the relay's clock (trio's), so a MockClock drives its write timeout as it
    drives the Python writer's: a client that reads nothing is closed once its writes have waited
    write_timeout seconds of trio time (here 30 s, passed in no time)."""
    import socket

    from derpd.metrics import RelayStats
    from derpd.relay.dataplane import DataPlane

    if dataplane is None:
        pytest.skip("the compiled data plane is not built (DERPD_PURE=1 or no compiler)")

    class Conn:
        def __init__(self) -> None:
            self.public = NodePrivate.generate().public
            self.key = self.public.raw
            self.saw_src: set[bytes] = set()
            self.closed: list[str] = []
            self.event = trio.Event()

        def engine_handoff(self, data: bytes, eof: bool) -> None:
            raise AssertionError("nothing is sent to the relay here")

        def close(self, reason: str) -> None:
            self.closed.append(reason)
            self.event.set()

    stats = RelayStats()
    dp = DataPlane({}, print, print, stats, send_limit=65536, depth=4, recv_size=65536, write_timeout=30.0,
                   passthrough=lambda: False)
    engine, conn = dp.engine, Conn()
    ours, peer = socket.socketpair()
    with ours, peer:
        ours.setblocking(False)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slot = engine.add(ours.fileno(), conn, conn.key, conn.saw_src)
        engine.resume(slot, b"")
        start = trio.current_time()
        while not engine.pending(slot):  # the client reads nothing: the engine's writes wait
            engine.enqueue(slot, encode_frame(FrameType.RECV_PACKET, bytes(32) + bytes(60000)), False)
        with trio.fail_after(300):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(dp.run)
                await conn.event.wait()
                nursery.cancel_scope.cancel()
        waited = trio.current_time() - start
        engine.remove(slot)
    assert conn.closed == ["write_timeout"] and stats.write_timeouts == 1
    assert 30.0 <= waited <= 30.5  # the deadline, checked every 0.5 s of trio time


async def test_a_receiver_that_never_reads_is_closed_on_trios_clock(nursery, autojump_clock):
    """Both paths measure the write deadline on trio's clock: with a MockClock, a client that
    reads nothing is closed on its write deadline (30 s of trio time, passed in no time), and
    not before."""
    relay = await start_relay(nursery, write_timeout=30.0)
    sender, stuck = NodePrivate.generate(), NodePrivate.generate()
    with trio.fail_after(600):
        stuck_stream = await raw_login(relay, stuck)  # logs in, then never reads again
        async with derp_client.connect(relay.derp_url, sender) as cs:
            start = trio.current_time()
            for _ in range(100):  # 6 MB: far beyond any socket buffer
                await cs.send_many([(stuck.public, bytes(1200))] * 50)
            while stuck.public.raw in relay.server.registry.active:
                await trio.sleep(1)
            waited = trio.current_time() - start
        await stuck_stream.aclose()
    assert relay.server.stats.write_timeouts == 1
    assert waited >= 30.0
