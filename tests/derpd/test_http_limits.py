"""HTTP edges of the relay port over real sockets: the 16 KiB head limit however the bytes
arrive, Content-Length with Transfer-Encoding refused, and the write deadline on responses."""

from __future__ import annotations

import socket

import trio

from .conftest import assert_relay_still_serves, http, raw_connect, read_until_closed, start_relay


async def test_head_over_16k_refused_even_in_one_write(nursery):
    relay = await start_relay(nursery)
    stats = relay.server.stats
    # 20 KiB of headers arriving at once: a complete head that h11 alone would accept.
    big = b"GET /derp/probe HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 20000 + b"\r\n\r\n"
    r = await http(relay, big)
    assert r.startswith(b"HTTP/1.1 400 ")
    # ... and one that trickles in past the limit without ever ending.
    with trio.fail_after(10):
        stream = await raw_connect(relay)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(40):
                await stream.send_all(b"X-Pad: " + b"b" * 1000 + b"\r\n")
        except trio.BrokenResourceError:
            pass
        assert (await read_until_closed(stream)).startswith(b"HTTP/1.1 400 ")
    assert stats.handshake_failures["head_too_large"] == 2
    # A head just under the limit is fine.
    ok = b"GET /derp/probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: " + b"c" * 15000 + b"\r\n\r\n"
    assert (await http(relay, ok)).startswith(b"HTTP/1.1 200 ")
    await assert_relay_still_serves(relay)


async def test_content_length_with_transfer_encoding_refused(nursery):
    relay = await start_relay(nursery)
    r = await http(relay, b"POST /derp/probe HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.startswith(b"HTTP/1.1 400 ") and r.count(b"HTTP/1.1") == 1
    assert relay.server.stats.handshake_failures["ambiguous_length"] == 1


async def test_response_write_deadline(nursery):
    """A client that pipelines requests and never reads is closed at the write deadline."""
    relay = await start_relay(nursery, http_write_timeout=0.5)
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", relay.port))
    stream = trio.SocketStream(sock)
    stats = relay.server.stats
    with trio.fail_after(20):
        # 100 pipelined /metrics (tens of KiB each): megabytes the client never reads.
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 100)
        while stats.handshake_failures["http_write_timeout"] == 0:
            await trio.sleep(0.05)
    await trio.aclose_forcefully(stream)
    await assert_relay_still_serves(relay)


async def test_login_byte_budget_counts_websocket_framing(nursery):
    """Before its login a WebSocket client may send at most 512 KiB on the wire, however it
    frames them: a ClientInfo dribbled one byte per message is cut off, counted."""
    from wsproto import ConnectionType
    from wsproto.connection import Connection
    from wsproto.events import BytesMessage

    from derpd.protocol.frames import FrameType, encode_header
    from derpd.relay.server import LOGIN_BYTE_BUDGET

    relay = await start_relay(nursery)
    ws = Connection(ConnectionType.CLIENT)
    one = ws.send(BytesMessage(data=b"x"))
    flood = ws.send(BytesMessage(data=encode_header(FrameType.CLIENT_INFO, 200_000)))
    flood += one * (LOGIN_BYTE_BUDGET // len(one) + 1000)
    with trio.fail_after(30):
        stream = await raw_connect(relay)
        await stream.send_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                              b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                              b"Sec-WebSocket-Protocol: derp\r\n\r\n")
        try:
            await stream.send_all(flood)
        except trio.BrokenResourceError:
            pass
        await read_until_closed(stream)
    assert relay.server.stats.handshake_failures["login_too_large"] == 1
    await assert_relay_still_serves(relay)
