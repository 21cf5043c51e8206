"""The relay over real sockets: routing, PeerGone, pings, duplicates, mesh frames, timeouts, and
every bad input of the issue.  Each bad input closes only the offender, counts a metric, and
leaves other clients untouched."""

from __future__ import annotations

import trio
import trio.testing

from derpd import client as derp_client
from derpd.keys import NodePrivate
from derpd.protocol.frames import FrameType, PeerGoneReason, encode_frame
from derpd.protocol.handshake import NEED_DATA, ClientHandshake, ServerKeyReceived
from derpd.protocol.messages import (
    ClientInfo,
    PeerGone,
    PeerPresent,
    RecvPacket,
    encode_send_packet,
)

from .conftest import (
    assert_relay_still_serves,
    http,
    raw_connect,
    read_until_closed,
    recv_skipping_keepalives,
    start_relay,
)

DISCO = b"TS\xf0\x9f\x92\xac" + bytes(56)
UPGRADE = b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n"


async def raw_login(relay, key: NodePrivate | None = None, *, info: ClientInfo | None = None,
                    request: bytes = UPGRADE):
    """Log in by hand with ``request``; returns the raw stream, positioned after ServerInfo."""
    key = key or NodePrivate.generate()
    stream = await raw_connect(relay)
    await stream.send_all(request)
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(4096)
    head, rest = head.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 101 "), head
    hs = ClientHandshake(key, info or ClientInfo(can_ack_pings=True))
    if rest:
        hs.receive_data(rest)
    await drive_login(stream, hs)
    return stream


async def drive_login(stream: trio.abc.Stream, hs: ClientHandshake) -> None:
    """Run the client side of the login on ``stream`` until ServerInfo arrived."""
    while True:
        ev = hs.next_event()
        if ev is NEED_DATA:
            hs.receive_data(await stream.receive_some(4096))
        elif isinstance(ev, ServerKeyReceived):
            await stream.send_all(hs.client_info_frame(ev.key))
        else:
            return


# ----------------------------------------------------------------------------- routing


async def test_relay_plain_fast_start_and_websocket(relay):
    a, b = NodePrivate.generate(), NodePrivate.generate()
    ws_url = relay.url.replace("http://", "ws://") + "/derp"
    with trio.fail_after(10):
        async with (
            derp_client.connect(relay.derp_url, a) as ca,
            derp_client.connect(relay.derp_url, b, server_key=relay.public_key) as cb,
        ):
            assert ca.server_key == relay.public_key
            await ca.send(b.public, b"x" * 65536)
            ev = await recv_skipping_keepalives(cb)
            assert ev == RecvPacket(a.public, b"x" * 65536)
            await cb.send(b.public, b"to myself")  # sending to your own key loops back
            assert (await recv_skipping_keepalives(cb)).data == b"to myself"
        async with derp_client.connect(ws_url, a) as ca, derp_client.connect(relay.derp_url, b) as cb:
            await cb.send(a.public, b"over websocket")
            assert await recv_skipping_keepalives(ca) == RecvPacket(b.public, b"over websocket")
            await ca.send(b.public, b"back")
            assert await recv_skipping_keepalives(cb) == RecvPacket(a.public, b"back")
    assert relay.server.stats.websocket_accepts == 1


async def test_packets_keep_order_and_content(relay):
    a, b = NodePrivate.generate(), NodePrivate.generate()
    with trio.fail_after(10):
        async with derp_client.connect(relay.derp_url, a) as ca, derp_client.connect(relay.derp_url, b) as cb:
            for i in range(20):  # within the 32-packet queue: no drops allowed
                await ca.send(b.public, i.to_bytes(2, "big") * 100)
            for i in range(20):
                ev = await recv_skipping_keepalives(cb)
                assert ev.data == i.to_bytes(2, "big") * 100
    assert relay.server.stats.packets_sent >= 20


async def test_frames_stay_whole_when_the_receivers_socket_fills(relay):
    """Big packets to a receiver that is not reading: the relay's writes (direct from the
    sender's reader, or by the receiver's writer) end part-way through frames; what arrives
    must still be whole frames, in order, each one of the packets sent."""
    a, b = NodePrivate.generate(), NodePrivate.generate()
    with trio.fail_after(30):
        async with derp_client.connect(relay.derp_url, a) as ca, derp_client.connect(relay.derp_url, b) as cb:
            sent = [i.to_bytes(4, "big") * 15_000 for i in range(200)]  # 60 KB each, 12 MB in all
            for i in range(0, len(sent), 10):
                await ca.send_many([(b.public, p) for p in sent[i : i + 10]])
            await ca.send(b.public, b"end")
            got = []
            while True:
                ev = await recv_skipping_keepalives(cb)
                if ev.data == b"end":
                    break
                got.append(ev.data)
    assert got and all(p in sent for p in got)
    assert [sent.index(p) for p in got] == sorted(sent.index(p) for p in got)


async def test_ring_of_300_clients(relay):
    keys = [NodePrivate.generate() for _ in range(300)]
    with trio.fail_after(60):
        clients: list[derp_client.DerpClient] = []
        async with trio.open_nursery() as outer:

            async def hold(i: int, ready: trio.Event, done: trio.Event) -> None:
                async with derp_client.connect(relay.derp_url, keys[i]) as c:
                    clients.append(c)
                    ready.set()
                    await done.wait()

            done = trio.Event()
            for i in range(300):
                ready = trio.Event()
                outer.start_soon(hold, i, ready, done)
                await ready.wait()
            assert relay.server.stats.current_connections == 300
            by_key = {c.public_key: c for c in clients}
            for i, k in enumerate(keys):
                await by_key[k.public].send(keys[(i + 1) % 300].public, f"from {i}".encode())
            for i, k in enumerate(keys):
                ev = await recv_skipping_keepalives(by_key[k.public])
                assert ev == RecvPacket(keys[i - 1].public, f"from {(i - 1) % 300}".encode())
            done.set()


# ----------------------------------------------------------------------------- PeerGone


async def test_peer_gone_disconnected_goes_to_receivers_only(relay):
    a, b, c = NodePrivate.generate(), NodePrivate.generate(), NodePrivate.generate()
    with trio.fail_after(10):
        async with derp_client.connect(relay.derp_url, b) as cb, derp_client.connect(relay.derp_url, c) as cc:
            async with derp_client.connect(relay.derp_url, a) as ca:
                await ca.send(b.public, b"hi")
                assert (await recv_skipping_keepalives(cb)).data == b"hi"
            assert await recv_skipping_keepalives(cb) == PeerGone(a.public, PeerGoneReason.DISCONNECTED)
            # c never received from a: it gets nothing, so its first event is our own packet.
            await cb.send(c.public, b"marker")
            assert (await recv_skipping_keepalives(cc)).data == b"marker"
    assert relay.server.stats.peer_gone_sent["disconnected"] == 1


async def test_not_here_for_disco_to_unknown_key_is_rate_limited(relay):
    a, nobody = NodePrivate.generate(), NodePrivate.generate()
    with trio.fail_after(10):
        async with derp_client.connect(relay.derp_url, a) as ca:
            await ca.send(nobody.public, b"not disco")
            await ca.send_many([(nobody.public, DISCO)] * 10)
            await ca.ping()  # everything before the Pong has been handled
            got = []
            while ca._events.statistics().current_buffer_used:
                got.append(await ca.recv())
    not_here = [e for e in got if isinstance(e, PeerGone)]
    assert not_here and all(e == PeerGone(nobody.public, PeerGoneReason.NOT_HERE) for e in not_here)
    assert len(not_here) <= 4  # burst 3 (+1 if a second passed)
    stats = relay.server.stats
    assert stats.dropped_packets["unknown_dest", "disco"] == 10
    assert stats.dropped_packets["unknown_dest", "other"] == 1


# ----------------------------------------------------------------------------- frames


async def test_ping_pong_note_preferred_and_unknown_frames(relay):
    a = NodePrivate.generate()
    with trio.fail_after(10):
        async with derp_client.connect(relay.derp_url, a) as ca:
            await ca.note_preferred(True)
            await ca.send_raw(encode_frame(0x0B, b"junk") + encode_frame(FrameType.PONG, bytes(8))
                              + encode_frame(0xFF, bytes(100)))
            assert await ca.ping() >= 0
            assert relay.server.stats.current_home_connections == 1
            assert relay.server.stats.unknown_frames >= 2
            await ca.note_preferred(False)
            await ca.ping()
            assert relay.server.stats.current_home_connections == 0
    stats = relay.server.stats
    assert stats.got_ping == 2 and stats.sent_pong == 2


async def test_mesh_frames_without_mesh_key_close_the_connection(relay):
    for frame in (encode_frame(FrameType.WATCH_CONNS), encode_frame(FrameType.CLOSE_PEER, bytes(32)),
                  encode_frame(FrameType.FORWARD_PACKET, bytes(64) + b"p")):
        with trio.fail_after(10):
            stream = await raw_login(relay)
            await stream.send_all(frame)
            await read_until_closed(stream)
            await stream.aclose()
    assert relay.server.stats.connection_errors["mesh_only_frame"] == 3
    with trio.fail_after(10):
        await assert_relay_still_serves(relay)


async def test_mesh_peer_watch_forward_and_close(nursery):
    mesh_key = bytes(range(32))
    relay = await start_relay(nursery, mesh_key=mesh_key)
    a, b = NodePrivate.generate(), NodePrivate.generate()
    remote = NodePrivate.generate()
    with trio.fail_after(10):
        async with derp_client.connect(relay.derp_url, a) as ca:
            async with derp_client.connect(relay.derp_url, NodePrivate.generate(), mesh_key=mesh_key) as watcher:
                await watcher.watch_conns()
                await watcher.ping()  # the flood is queued before the Pong
                flood = {}
                while watcher._events.statistics().current_buffer_used:
                    ev = await watcher.recv()
                    flood[ev.peer] = ev
                assert set(flood) == {a.public, watcher.public_key}  # every local key, the watcher too
                assert flood[a.public].ip == "127.0.0.1" and flood[a.public].flags == 0x01
                assert flood[watcher.public_key].flags == 0x02  # IsMeshPeer
                async with derp_client.connect(relay.derp_url, b) as cb:
                    ev = await recv_skipping_keepalives(watcher)  # the stream: b arrived
                    assert isinstance(ev, PeerPresent) and ev.peer == b.public
                    await watcher.forward_packet(remote.public, b.public, b"forwarded")
                    assert await recv_skipping_keepalives(cb) == RecvPacket(remote.public, b"forwarded")
                    await watcher.close_peer(b.public)
                    with trio.fail_after(5):
                        while True:
                            try:
                                await cb.recv()
                            except (trio.EndOfChannel, trio.BrokenResourceError):
                                break
                ev = await recv_skipping_keepalives(watcher)
                assert ev == PeerGone(b.public, PeerGoneReason.DISCONNECTED)
            # A wrong mesh key makes an ordinary client, not an error (P-7).
            async with derp_client.connect(relay.derp_url, NodePrivate.generate(), mesh_key=bytes(31) + b"\x01") as w:
                await w.send(a.public, b"ordinary")
                assert (await recv_skipping_keepalives(ca)).data == b"ordinary"
    assert relay.server.stats.packets_forwarded_in == 1


async def test_duplicate_key_newest_receives_then_last_writer(relay):
    a, b = NodePrivate.generate(), NodePrivate.generate()
    with trio.fail_after(10):
        async with derp_client.connect(relay.derp_url, a) as ca, derp_client.connect(relay.derp_url, b) as old:
            async with derp_client.connect(relay.derp_url, b) as new:
                assert relay.server.stats.dup_client_conns == 1
                await ca.send(b.public, b"one")
                assert (await recv_skipping_keepalives(new)).data == b"one"
                await old.ping()  # any frame makes the old one active again
                await ca.send(b.public, b"two")
                assert (await recv_skipping_keepalives(old)).data == b"two"
            await ca.send(b.public, b"three")
            assert (await recv_skipping_keepalives(old)).data == b"three"
            # closing one duplicate sends no PeerGone: the next event a sees is b's packet
            await old.send(a.public, b"ok")
            assert (await recv_skipping_keepalives(ca)).data == b"ok"


# ----------------------------------------------------------------------------- HTTP


async def test_upgrade_101_exact_and_server_key_follows(relay):
    with trio.fail_after(10):
        stream = await raw_connect(relay)
        await stream.send_all(UPGRADE)
        got = b""
        while len(got) < 200:
            got += await stream.receive_some(4096)
    assert got.startswith(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Version: 2\r\n"
        b"Derp-Public-Key: " + relay.public_key.hex().encode() + b"\r\n\r\n\x01\x00\x00\x00\x28DERP"
    )


async def test_fast_start_gets_no_http_response(relay):
    key = NodePrivate.generate()
    hs = ClientHandshake(key, ClientInfo(), server_key=relay.public_key)
    req = UPGRADE.replace(b"\r\n\r\n", b"\r\nDerp-Fast-Start: 1\r\n\r\n") + hs.client_info_frame()
    with trio.fail_after(10):
        stream = await raw_connect(relay)
        await stream.send_all(req)
        first = await stream.receive_some(5)
    assert first[:1] == b"\x01"  # straight to ServerKey


async def test_status_lines_carry_reason_phrases_and_204_no_content_length(relay):
    r = await http(relay, b"GET /generate_204 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head = r.split(b"\r\n\r\n", 1)[0].lower()
    assert r.startswith(b"HTTP/1.1 204 No Content\r\n") and b"content-length" not in head
    r = await http(relay, b"GET /derp/probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert r.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 0" in r.lower()
    r = await http(relay, b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert r.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    r = await http(relay, b"POST /derp/probe HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    assert r.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")


async def test_plain_endpoints(relay):
    r = await http(relay, b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert r.startswith(b"HTTP/1.1 426 ") and r.endswith(b"DERP requires connection upgrade\n")
    for path in (b"/derp/probe", b"/derp/latency-check"):
        r = await http(relay, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert r.startswith(b"HTTP/1.1 200 ") and b"access-control-allow-origin: *" in r.lower()
        r = await http(relay, b"HEAD " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert r.startswith(b"HTTP/1.1 200 ")
        r = await http(relay, b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        assert r.startswith(b"HTTP/1.1 405 ") and r.endswith(b"bogus probe method\n")
    r = await http(relay, b"GET /generate_204 HTTP/1.1\r\nHost: x\r\nX-Tailscale-Challenge: ts_1.2.3.4\r\n"
                          b"Connection: close\r\n\r\n")
    assert r.startswith(b"HTTP/1.1 204 ") and b"x-tailscale-response: response ts_1.2.3.4" in r.lower()
    r = await http(relay, b"GET /generate_204 HTTP/1.1\r\nHost: x\r\nX-Tailscale-Challenge: bad challenge!\r\n"
                          b"Connection: close\r\n\r\n")
    assert r.startswith(b"HTTP/1.1 204 ") and b"x-tailscale-response" not in r.lower()
    r = await http(relay, b"GET /robots.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert r.endswith(b"User-agent: *\nDisallow: /\n") and b"x-frame-options: deny" in r.lower()
    r = await http(relay, b"GET /anything HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert r.startswith(b"HTTP/1.1 200 ") and b"DERP" in r
    r = await http(relay, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert r.startswith(b"HTTP/1.1 200 ") and b"derp_packets_dropped_total" in r
    # keep-alive: two requests on one connection
    r = await http(relay, b"GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\nGET /robots.txt HTTP/1.1\r\nHost: x\r\n"
                          b"Connection: close\r\n\r\n")
    assert r.count(b"HTTP/1.1 200 ") == 2


async def test_metrics_refused_to_non_loopback():
    from derpd.relay.http_front import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("192.0.2.1") and not is_loopback("2001:db8::1")


async def test_home_redirect_and_blank(nursery):
    red = await start_relay(nursery, home="https://example.com/")
    r = await http(red, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert r.startswith(b"HTTP/1.1 302 ") and b"location: https://example.com/" in r.lower()
    blank = await start_relay(nursery, home="blank")
    r = await http(blank, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert r.startswith(b"HTTP/1.1 200 ") and r.endswith(b"\r\n\r\n")


async def test_websocket_wrong_subprotocol_closes_1008(relay):
    r = await http(relay, b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                          b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          b"Sec-WebSocket-Protocol: notderp\r\n\r\n")
    assert r.startswith(b"HTTP/1.1 101 ")
    assert b"\x88" in r and (1008).to_bytes(2, "big") in r  # a Close frame with status 1008
    assert relay.server.stats.handshake_failures["websocket_subprotocol"] == 1


# ----------------------------------------------------------------------------- bad input


async def test_huge_frame_length_closes_only_offender(relay):
    a, b = NodePrivate.generate(), NodePrivate.generate()
    with trio.fail_after(10):
        async with derp_client.connect(relay.derp_url, a) as ca, derp_client.connect(relay.derp_url, b) as cb:
            stream = await raw_login(relay)
            await stream.send_all(b"\x04\xff\xff\xff\xf0")
            await read_until_closed(stream)
            stream2 = await raw_login(relay)
            await stream2.send_all(encode_frame(FrameType.SEND_PACKET, bytes(32) + bytes(65537)))
            await read_until_closed(stream2)
            await ca.send(b.public, b"unaffected")
            assert (await recv_skipping_keepalives(cb)).data == b"unaffected"
    assert relay.server.stats.connection_errors["frame_too_large"] == 2


async def test_bad_ping_sizes_close(relay):
    for size in (7, 1001):
        with trio.fail_after(10):
            stream = await raw_login(relay)
            await stream.send_all(encode_frame(FrameType.PING, bytes(size)))
            await read_until_closed(stream)
    stats = relay.server.stats
    assert stats.connection_errors["bad_ping"] == 1 and stats.connection_errors["frame_too_large"] == 1
    with trio.fail_after(10):
        await assert_relay_still_serves(relay)


async def test_bad_client_info_and_send_before_login(relay):
    server_key = relay.public_key
    key = NodePrivate.generate()
    bad_box = encode_frame(FrameType.CLIENT_INFO, key.public.raw + bytes(24) + bytes(40))
    zero_key = encode_frame(FrameType.CLIENT_INFO, bytes(32) + key.box(server_key).seal(b"{}"))
    send_first = encode_send_packet(key.public, b"too early")
    small_order = encode_frame(FrameType.CLIENT_INFO, b"\x01" + bytes(31) + bytes(24) + bytes(40))
    for frame, reason in ((bad_box, "box_open_failed"), (zero_key, "zero_key"), (send_first, "bad_frame_type"),
                          (small_order, "small_order_key")):
        with trio.fail_after(10):
            stream = await raw_connect(relay)
            await stream.send_all(UPGRADE + frame)
            got = await read_until_closed(stream)
            assert got.startswith(b"HTTP/1.1 101 ") and b"\x03" not in got[got.index(b"DERP\xf0"):][40:41]
            assert relay.server.stats.handshake_failures[reason] == 1
    with trio.fail_after(10):
        await assert_relay_still_serves(relay)


async def test_garbage_and_tls_bytes_on_plain_port(relay):
    tls_hello = bytes.fromhex("16030100f4010000f00303") + bytes(200)
    for junk in (b"\x00\x01garbage\r\n\r\n", tls_hello):
        r = await http(relay, junk)
        assert r == b"" or r.startswith(b"HTTP/1.1 400 ")
    assert relay.server.stats.handshake_failures["bad_http"] == 2
    with trio.fail_after(10):
        await assert_relay_still_serves(relay)


async def test_slowloris_head_and_silent_login_time_out(nursery):
    relay = await start_relay(nursery, http_timeout=0.5, login_timeout=0.5)
    with trio.fail_after(10):
        slow = await raw_connect(relay)
        await slow.send_all(b"GET /derp HTTP/1.1\r\nHost: x\r\n")  # never finishes the head
        silent = await raw_connect(relay)
        await silent.send_all(UPGRADE)  # upgrades, then never sends ClientInfo
        await assert_relay_still_serves(relay)
        assert await read_until_closed(slow) == b""
        got = await read_until_closed(silent)
        assert got.startswith(b"HTTP/1.1 101 ")
    stats = relay.server.stats
    assert stats.handshake_failures["http_timeout"] == 1 and stats.handshake_failures["login_timeout"] == 1


async def test_login_request_arriving_after_the_accept_skips_h11(nursery, monkeypatch):
    """Across a network the request lands after the connection is accepted: the front door
    waits for it once and still reads it with the strict login reader, not h11; a connection
    that never sends a byte is closed at --http-timeout and counted once."""
    from derpd.relay import http_front

    relay = await start_relay(nursery, http_timeout=0.5)
    seen = []
    strict = http_front.read_plain_derp_request
    monkeypatch.setattr(http_front, "read_plain_derp_request", lambda data: seen.append(strict(data)) or seen[-1])
    with trio.fail_after(10):
        stream = await raw_connect(relay)
        await trio.testing.wait_all_tasks_blocked()  # accepted, found nothing, waiting for the socket
        assert seen == []
        await stream.send_all(UPGRADE)
        got = b""
        while b"\r\n\r\n" not in got or len(got.partition(b"\r\n\r\n")[2]) < 5 + 8 + 32:
            got += await stream.receive_some(4096)
        assert got.startswith(b"HTTP/1.1 101 ")
        assert got.partition(b"\r\n\r\n")[2][0] == FrameType.SERVER_KEY
        assert len(seen) == 1 and seen[0] is not None
        silent = await raw_connect(relay)
        assert await read_until_closed(silent) == b""
    assert relay.server.stats.handshake_failures["http_timeout"] == 1


async def test_a_derp_session_keeps_no_http_state(nursery):
    """What the front door needed to read the request (h11's connection, the request) is not
    kept for the DERP session, on h11's path (a Content-Length leaves a request to it) as on
    the strict reader's."""
    import gc

    import h11

    def live_h11() -> int:
        gc.collect()
        return sum(isinstance(o, h11.Connection) for o in gc.get_objects())

    relay = await start_relay(nursery)
    before = live_h11()
    streams = []
    with trio.fail_after(20):
        for request in (UPGRADE, UPGRADE.replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\nX-Pad: " + b"p" * 8000 + b"\r\n\r\n")):
            for _ in range(5):
                streams.append(await raw_login(relay, request=request))
        assert relay.server.stats.current_connections == 10  # registered before ServerInfo
        assert live_h11() <= before
    for stream in streams:
        await stream.aclose()


async def test_receiver_that_never_reads(nursery):
    """The sender is never blocked, the stuck receiver's queue drops the oldest and its
    connection ends on the write deadline; memory stays bounded by the queue depth."""
    relay = await start_relay(nursery, write_timeout=0.5)
    sender, stuck, other = NodePrivate.generate(), NodePrivate.generate(), NodePrivate.generate()
    with trio.fail_after(30):
        stuck_stream = await raw_login(relay, stuck)  # logs in, then never reads again
        conn = relay.server.registry.active[stuck.public.raw]
        async with derp_client.connect(relay.derp_url, sender) as cs, derp_client.connect(relay.derp_url, other) as co:
            packet = bytes(1200)
            for _ in range(100):
                await cs.send_many([(stuck.public, packet)] * 50)  # 6 MB: far beyond any socket buffer
                assert conn.counters()["queued"] <= relay.server.settings.queue_depth
                if stuck.public.raw not in relay.server.registry.active:
                    break
            await cs.send(other.public, b"sender was never blocked")
            assert (await recv_skipping_keepalives(co)).data == b"sender was never blocked"
            while stuck.public.raw in relay.server.registry.active:  # the write deadline ends it
                await cs.ping()
        await stuck_stream.aclose()
    stats = relay.server.stats
    assert stats.dropped_packets["queue_head", "other"] > 0
    assert stats.write_timeouts == 1


# ----------------------------------------------------------------------------- keepalive


async def test_keepalive_every_60s_with_jitter(autojump_clock):
    from derpd.relay.server import RelayServer
    from derpd.settings import RelaySettings

    server = RelayServer(RelaySettings(addr="127.0.0.1:0"))
    key = NodePrivate.generate()
    client_side, server_side = trio.testing.memory_stream_pair()
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.run_keepalives)
            nursery.start_soon(server.serve_derp, server_side, ("192.0.2.1", 1234), b"")
            hs = ClientHandshake(key, ClientInfo())
            await drive_login(client_side, hs)
            start = trio.current_time()
            interval = server.registry.active[key.public.raw].keepalive_interval
            stamps = []
            while len(stamps) < 4:
                hs.decoder.receive_data(await client_side.receive_some(4096))
                for ftype, _ in hs.decoder.frames():
                    assert ftype == FrameType.KEEP_ALIVE
                    stamps.append(trio.current_time() - start)
            nursery.cancel_scope.cancel()
    assert 60 <= interval < 65  # 60 s plus a per-connection jitter under 5 s
    assert interval <= stamps[0] <= interval + 1  # the ticker runs every second
    for earlier, later in zip(stamps, stamps[1:]):
        assert interval - 1 <= later - earlier <= interval + 1
