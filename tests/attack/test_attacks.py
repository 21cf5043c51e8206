"""Attacks against a relay process on loopback.  After each one, honest clients still relay,
the relay's descriptors return to their baseline and its RSS stays within bounds.  Each test
prints its before/after figures (run with ``-s`` to see them)."""

from __future__ import annotations

import os
import random

import pytest
import trio

from derpd import client as derp_client
from derpd.keys import NodePrivate
from derpd.protocol.frames import SERVER_READ_LIMITS, FrameType, encode_frame, encode_header
from derpd.protocol.errors import RemoteProtocolError
from derpd.protocol.handshake import ClientHandshake
from derpd.protocol.messages import ClientInfo, KeepAlive

from .relay_process import RelayProcess, Usage, raise_open_files_limit, start_relay_process

FD_SLACK = 3  # the relay may hold a listener-side socket or two in passing
RSS_BOUND_KIB = 96 * 1024  # growth allowed over the baseline after an attack (allocator caches)
UPGRADE = b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n"


async def honest_pair_relays(url: str, **kw: object) -> None:
    a, b = NodePrivate.generate(), NodePrivate.generate()
    async with derp_client.connect(url, a, **kw) as ca, derp_client.connect(url, b, **kw) as cb:  # type: ignore[arg-type]
        for i in range(3):
            await ca.send(b.public, b"honest %d" % i)
            while isinstance(ev := await cb.recv(), KeepAlive):
                pass
            assert ev.data == b"honest %d" % i


async def settle(relay: RelayProcess, before: Usage, what: str) -> Usage:
    """Wait for the descriptors to come back, check RSS and relaying, print the figures."""
    await relay.wait_fds_at_most(before.fds + FD_SLACK)
    await honest_pair_relays(relay.derp_url)
    after = relay.usage()
    print(f"\n[attack] {what}: before {before}; after {after}")
    assert after.rss_kib - before.rss_kib < RSS_BOUND_KIB, (before, after)
    return after


async def connect_many(port: int, n: int, send: bytes, *, parallel: int = 200) -> list[trio.SocketStream]:
    streams: list[trio.SocketStream] = []
    sem = trio.Semaphore(parallel)

    async def one() -> None:
        async with sem:
            s = await trio.open_tcp_stream("127.0.0.1", port)
            if send:
                await s.send_all(send)
            streams.append(s)

    async with trio.open_nursery() as n_:
        for _ in range(n):
            n_.start_soon(one)
    return streams


async def test_slowloris_2000(relay_proc):
    before = relay_proc.usage()
    with trio.fail_after(60):
        # 2,000 connections that send half a request head and then nothing.
        streams = await connect_many(relay_proc.port, 2000, b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgr")
        while relay_proc.usage().fds < before.fds + 2000:  # the relay holds them all...
            await trio.sleep(0.05)
        held = relay_proc.usage()
        await honest_pair_relays(relay_proc.derp_url)  # ...and still serves honest clients
        for s in streams:
            await trio.aclose_forcefully(s)
        await settle(relay_proc, before, f"2000 slowloris (while held: {held})")


async def test_5000_dropped_mid_handshake(relay_proc):
    before = relay_proc.usage()
    server_key = NodePrivate.generate()  # wrong on purpose: a half-done login
    partial_info = ClientHandshake(NodePrivate.generate(), ClientInfo(),
                                   server_key=server_key.public).client_info_frame()[:40]
    kinds = [b"", UPGRADE, UPGRADE + partial_info, b"GET /derp HTTP/1.1\r\n"]
    with trio.fail_after(60):
        sem = trio.Semaphore(200)

        async def one(i: int) -> None:
            async with sem:
                s = await trio.open_tcp_stream("127.0.0.1", relay_proc.port)
                data = kinds[i % len(kinds)]
                if data:
                    await s.send_all(data)
                if i % 4 in (1, 2) and (i // 4) % 2:
                    await s.receive_some(64)  # the 101 and ServerKey arrive, then we vanish
                await trio.aclose_forcefully(s)

        async with trio.open_nursery() as n:
            for i in range(5000):
                n.start_soon(one, i)
        await settle(relay_proc, before, "5000 connections dropped mid-handshake")
    m = await relay_proc.metrics()
    assert m["derp_accepts_total"] >= 2500


async def test_flood_to_a_receiver_that_never_reads(relay_proc):
    before = relay_proc.usage()
    m0 = await relay_proc.metrics()
    flooder, sleeper = NodePrivate.generate(), NodePrivate.generate()
    with trio.fail_after(60):
        async with derp_client.connect(relay_proc.derp_url, flooder) as cf:
            # A raw login for the sleeper: it never reads after ServerInfo.
            s = await trio.open_tcp_stream("127.0.0.1", relay_proc.port)
            hs = ClientHandshake(sleeper, ClientInfo())
            await s.send_all(UPGRADE)
            got = b""
            while b"\r\n\r\n" not in got or len(got) < got.index(b"\r\n\r\n") + 4 + 45:
                got += await s.receive_some(4096)
            hs.receive_data(got[got.index(b"\r\n\r\n") + 4:])
            hs.next_event()
            await s.send_all(hs.client_info_frame())
            await cf.ping()
            packet = bytes(1200)
            for _ in range(100):  # 100 x 200 packets of 1.2 kB = 24 MB at a reader that sleeps
                await cf.send_many([(sleeper.public, packet)] * 200)
            await honest_pair_relays(relay_proc.derp_url)
            await cf.ping()  # the flooder itself is still served
            m = await relay_proc.metrics()
            dropped = sum(v - m0.get(k, 0) for k, v in m.items() if k.startswith("derp_packets_dropped_total"))
            assert dropped > 0  # every packet that did not fit is counted
            assert relay_proc.usage().rss_kib - before.rss_kib < RSS_BOUND_KIB
            await trio.aclose_forcefully(s)
        await settle(relay_proc, before, f"flood of 20000 packets to a sleeping receiver ({int(dropped)} dropped)")


@pytest.mark.parametrize("frame", [encode_frame(FrameType.WATCH_CONNS),
                                   encode_frame(FrameType.CLOSE_PEER, bytes(32))], ids=["watch_conns", "close_peer"])
async def test_mesh_frames_from_non_mesh_clients(relay_proc, frame):
    before = relay_proc.usage()
    m0 = await relay_proc.metrics()
    victim = NodePrivate.generate()
    with trio.fail_after(60):
        async with derp_client.connect(relay_proc.derp_url, victim) as cv:
            sem = trio.Semaphore(100)

            async def one() -> None:
                async with sem:
                    try:
                        async with derp_client.connect(relay_proc.derp_url, NodePrivate.generate()) as c:
                            target = victim.public.raw if frame[0] == FrameType.CLOSE_PEER else b""
                            await c.send_raw(encode_frame(frame[0], target))
                            while True:  # the relay closes us
                                await c.recv()
                    except (trio.EndOfChannel, trio.BrokenResourceError, RemoteProtocolError, OSError):
                        pass  # closed by the relay, as it should

            async with trio.open_nursery() as n:
                for _ in range(300):
                    n.start_soon(one)
            assert await cv.ping() >= 0  # ClosePeer from strangers did not close the victim
        m = await relay_proc.metrics()
        key = 'derp_connection_errors_total{reason="mesh_only_frame"}'
        assert m[key] - m0.get(key, 0) == 300
        await settle(relay_proc, before, f"300 non-mesh {'ClosePeer' if frame[0] == 0x11 else 'WatchConns'}")


async def logged_in_raw(port: int, key: NodePrivate | None = None) -> trio.SocketStream:
    s = await trio.open_tcp_stream("127.0.0.1", port)
    hs = ClientHandshake(key or NodePrivate.generate(), ClientInfo())
    await s.send_all(UPGRADE)
    got = b""
    while b"\r\n\r\n" not in got or len(got) < got.index(b"\r\n\r\n") + 4 + 45:
        got += await s.receive_some(4096)
    hs.receive_data(got[got.index(b"\r\n\r\n") + 4:])
    hs.next_event()
    await s.send_all(hs.client_info_frame())
    return s


async def closed_by_relay(s: trio.SocketStream, within: float = 5) -> bool:
    try:
        with trio.move_on_after(within):
            while await s.receive_some(65536):
                pass
            return True
    except trio.BrokenResourceError:
        return True
    return False


async def test_oversized_and_truncated_frames_of_every_type(relay_proc):
    before = relay_proc.usage()
    m0 = await relay_proc.metrics()
    types = list(range(0x00, 0x17)) + [0x7F, 0xFF]
    with trio.fail_after(60):
        async def oversized(t: int) -> None:
            s = await logged_in_raw(relay_proc.port)
            await s.send_all(encode_header(t, 0xFFFFFFFF) + os.urandom(1024))
            if t in SERVER_READ_LIMITS:  # known to the server: closed at the header
                assert await closed_by_relay(s), hex(t)
            else:  # unknown: skipped by streaming, the connection lives; we hang up
                await s.send_all(os.urandom(4096))
            await trio.aclose_forcefully(s)

        async def truncated(t: int) -> None:
            s = await logged_in_raw(relay_proc.port)
            await s.send_all(encode_header(t, 100) + os.urandom(10))
            await s.send_eof()
            assert await closed_by_relay(s), hex(t)
            await trio.aclose_forcefully(s)

        async def before_login(t: int) -> None:
            s = await trio.open_tcp_stream("127.0.0.1", relay_proc.port)
            await s.send_all(UPGRADE + encode_header(t, random.choice([0, 10, 1 << 20, 0xFFFFFFFF])) + bytes(10))
            # The first frame must be ClientInfo (spec 5.11): any other type ends the login at once,
            # as soon as its type byte arrives.
            assert await closed_by_relay(s, 5), hex(t)
            await trio.aclose_forcefully(s)

        async with trio.open_nursery() as n:
            for t in types:
                n.start_soon(oversized, t)
                n.start_soon(truncated, t)
                n.start_soon(before_login, t)
        await settle(relay_proc, before, f"oversized, truncated and pre-login frames of {len(types)} types")
    m = await relay_proc.metrics()
    grew = {k: v - m0.get(k, 0) for k, v in m.items()
            if k.startswith(("derp_connection_errors_total", "derp_handshake_failures_total")) and v != m0.get(k, 0)}
    # Every oversized known frame, plus truncated ones whose claimed 100 bytes are over their limit.
    over_limit = sum(1 for limit in SERVER_READ_LIMITS.values() if limit < 100)
    assert grew.get('derp_connection_errors_total{reason="frame_too_large"}', 0) == len(SERVER_READ_LIMITS) + over_limit
    # (an oversized unknown frame cut short by our hang-up counts as truncated too)
    assert grew.get('derp_connection_errors_total{reason="truncated_frame"}', 0) >= len(types) - over_limit


async def test_tls_handshake_with_garbage(nursery, tmp_path):
    from derpd.relay.tls import generate_self_signed_ip_cert

    raise_open_files_limit(4096)
    generate_self_signed_ip_cert("127.0.0.1", tmp_path / "127.0.0.1.crt", tmp_path / "127.0.0.1.key")
    relay = await start_relay_process(nursery, "--certmode", "manual", "--certdir", str(tmp_path),
                                      "--hostname", "127.0.0.1", "--http-port", "-1")
    before = relay.usage()
    hello_start = bytes.fromhex("16030100c8010000c40303") + os.urandom(32)  # a ClientHello cut short
    with trio.fail_after(60):
        async def one(i: int) -> None:
            s = await trio.open_tcp_stream("127.0.0.1", relay.port)
            match i % 4:
                case 0:
                    await s.send_all(os.urandom(512))  # not TLS at all
                case 1:
                    await s.send_all(hello_start)  # truncated ClientHello, then hang up
                case 2:
                    await s.send_all(b"\x16\x03\x01\xff\xff" + os.urandom(2000))  # bogus record length
                case 3:
                    await s.send_all(UPGRADE)  # plain HTTP on the TLS port
            with trio.move_on_after(2):
                try:
                    await s.receive_some(4096)
                except trio.BrokenResourceError:
                    pass
            await trio.aclose_forcefully(s)

        async with trio.open_nursery() as n:
            for i in range(400):
                n.start_soon(one, i)
        await relay.wait_fds_at_most(before.fds + FD_SLACK)
        await honest_pair_relays(relay.derp_url, insecure=True)
        after = relay.usage()
        print(f"\n[attack] 400 garbage TLS handshakes: before {before}; after {after}")
        assert after.rss_kib - before.rss_kib < RSS_BOUND_KIB
        m = await relay.metrics()
    assert m['derp_handshake_failures_total{reason="tls"}'] >= 300
