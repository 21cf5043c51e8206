"""``WebSocketStream``: DERP over WebSocket as a plain ``trio.abc.Stream``.

The relay never knows it talks WebSocket.  Binary messages are concatenated into one byte
stream in both directions (P-5): a message may hold several frames or part of one.  Each
``send_all`` becomes one binary message.  Pings are answered; a close (any code) reads as
EOF; a text message is a protocol error and closes with 1003 (spec 9.5).
"""

from __future__ import annotations

import operator

import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import RemoteProtocolError as WSRemoteProtocolError

RECV_SIZE = 256 * 1024
EVENTS_PER_TURN = 32  # WebSocket messages parsed before the reader lets every other task run (~1 ms of wsproto)
# Go's WebSocket library (used by derper and Tailscale clients) refuses messages over 32 KiB,
# so a write larger than this is split into several binary messages.
MAX_MESSAGE = 32768


class WebSocketStream(trio.abc.Stream):
    def __init__(self, transport: trio.abc.Stream, *, client: bool = False, initial: bytes = b"") -> None:
        self._transport = transport
        self._ws = Connection(ConnectionType.CLIENT if client else ConnectionType.SERVER)
        self._send_lock = trio.StrictFIFOLock()
        self._pending = bytearray()
        self._eof = False
        self._closed = False
        self._sending = False
        self._receiving = False
        self._more = False  # wsproto may hold complete messages not parsed yet
        self.wire_bytes_received = len(initial)  # for the relay's pre-login byte budget
        if initial:
            self._ws.receive_data(initial)

    @property
    def transport_stream(self) -> trio.abc.Stream:
        """The stream under the WebSocket framing (as trio's SSLStream names it)."""
        return self._transport

    async def _send_raw(self, data: bytes) -> None:
        async with self._send_lock:
            await self._transport.send_all(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this WebSocket")
        self._sending = True
        try:
            if self._closed:
                raise trio.ClosedResourceError("the WebSocket was closed")
            await trio.lowlevel.checkpoint()
            if self._ws.state is not ConnectionState.OPEN:
                raise trio.BrokenResourceError("the WebSocket is closing")
            view = memoryview(data)
            out = b"".join(
                self._ws.send(BytesMessage(data=bytes(view[i : i + MAX_MESSAGE])))
                for i in range(0, len(view), MAX_MESSAGE)
            )
            if out:
                await self._send_raw(out)
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this WebSocket")
        if self._closed:
            raise trio.ClosedResourceError("the WebSocket was closed")
        await self._transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this WebSocket")
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be at least 1")
        self._receiving = True
        try:
            if self._closed:
                raise trio.ClosedResourceError("the WebSocket was closed")
            await trio.lowlevel.checkpoint()
            while not self._pending and not self._eof:
                await self._pump()
            limit = max_bytes or len(self._pending) or 1
            out = bytes(self._pending[:limit])
            del self._pending[:limit]
            return out
        finally:
            self._receiving = False

    async def _pump(self) -> None:
        """Parse at most ``EVENTS_PER_TURN`` messages, else read the transport once.  A flood of
        tiny messages thus costs one bounded slice of work per turn, however much one read
        brought in."""
        try:
            parsed = 0
            self._more = False
            for event in self._ws.events():
                parsed += 1
                if parsed >= EVENTS_PER_TURN:
                    self._more = True
                match event:
                    case BytesMessage(data=data):
                        self._pending += data
                    case Ping():
                        await self._send_quietly(self._ws.send(event.response()))
                    case CloseConnection():
                        if self._ws.state is ConnectionState.REMOTE_CLOSING:
                            await self._send_quietly(self._ws.send(event.response()))
                        self._eof = True
                    case TextMessage():
                        await self._close(CloseReason.UNSUPPORTED_DATA, "text messages are not DERP")
                        raise trio.BrokenResourceError("text message on a DERP WebSocket")
                if self._more:
                    break
            if self._pending or self._eof:
                return
            if self._more:
                await trio.lowlevel.checkpoint()
                return
        except WSRemoteProtocolError as e:
            self._eof = True
            raise trio.BrokenResourceError(f"WebSocket protocol error: {e}") from e
        data = await self._transport.receive_some(RECV_SIZE)
        if not data:
            self._eof = True
            return
        self.wire_bytes_received += len(data)
        self._ws.receive_data(data)

    async def _send_quietly(self, data: bytes) -> None:
        try:
            await self._send_raw(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._eof = True

    async def _close(self, code: int, reason: str) -> None:
        if self._ws.state is ConnectionState.OPEN:
            await self._send_quietly(self._ws.send(CloseConnection(code=code, reason=reason)))

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await self._close(CloseReason.NORMAL_CLOSURE, "")
        finally:
            await self._transport.aclose()
