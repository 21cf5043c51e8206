"""RawSocketIO (derpd/transport/raw_socket.py) keeps a trio SocketStream's semantics: every
byte in order through full socket buffers, EOF as b"", errors as trio's exceptions."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from derpd.transport.raw_socket import RawSocketIO, raw_io_for


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        accepted: list[trio.SocketStream] = []

        async def accept() -> None:
            accepted.append(await listeners[0].accept())

        nursery.start_soon(accept)
        client = await trio.open_tcp_stream("127.0.0.1", port)
    await listeners[0].aclose()
    return client, accepted[0]


async def test_bytes_arrive_in_order_through_full_buffers():
    with trio.fail_after(20):
        a, b = await tcp_pair()
        a.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        ra, rb = RawSocketIO(a), RawSocketIO(b)
        chunks = [bytes([i]) * (100_000 + i) for i in range(20)]
        want = b"".join(chunks)
        got = bytearray()

        async def send() -> None:
            for c in chunks:
                await ra.send_all(c)  # partial writes: waits for writability
            await a.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while True:
                data = await rb.receive_some(65536)
                if not data:
                    break
                got += data
        assert bytes(got) == want
        await a.aclose()
        await b.aclose()


async def test_closed_stream_and_reset_peer_raise_trio_errors():
    with trio.fail_after(10):
        a, b = await tcp_pair()
        ra = RawSocketIO(a)
        # The peer resets the connection: the next write or read fails as BrokenResourceError.
        b.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        await b.aclose()
        with pytest.raises(trio.BrokenResourceError):
            for _ in range(100):
                await ra.send_all(b"x" * 65536)
                await trio.lowlevel.checkpoint()
        await a.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await ra.receive_some(10)
        with pytest.raises(trio.ClosedResourceError):
            await ra.send_all(b"x")


async def test_only_plain_socket_streams_get_raw_io():
    with trio.fail_after(10):
        a, b = await tcp_pair()
        assert isinstance(raw_io_for(a), RawSocketIO)
        left, _right = trio.testing.memory_stream_pair()
        assert raw_io_for(left) is None
        await a.aclose()
        await b.aclose()
