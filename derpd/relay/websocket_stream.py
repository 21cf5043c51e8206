"""``WebSocketStream``: DERP over WebSocket as a plain ``trio.abc.Stream``.

The relay never knows it talks WebSocket.  Binary messages are concatenated into one byte
stream in both directions (P-5): a message may hold several frames or part of one.  Each
``send_all`` becomes one binary message.  Pings are answered; a close (any code) reads as
EOF; a text message is a protocol error and closes with 1003 (spec 9.5).
"""

from __future__ import annotations

import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import RemoteProtocolError as WSRemoteProtocolError

RECV_SIZE = 256 * 1024


class WebSocketStream(trio.abc.Stream):
    def __init__(self, transport: trio.abc.Stream, *, client: bool = False, initial: bytes = b"") -> None:
        self._transport = transport
        self._ws = Connection(ConnectionType.CLIENT if client else ConnectionType.SERVER)
        self._send_lock = trio.StrictFIFOLock()
        self._pending = bytearray()
        self._eof = False
        if initial:
            self._ws.receive_data(initial)

    async def _send_raw(self, data: bytes) -> None:
        async with self._send_lock:
            await self._transport.send_all(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._ws.state is not ConnectionState.OPEN:
            raise trio.ClosedResourceError("the WebSocket is closed")
        await self._send_raw(self._ws.send(BytesMessage(data=bytes(data))))

    async def wait_send_all_might_not_block(self) -> None:
        await self._transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self._pending and not self._eof:
            await self._pump()
        limit = max_bytes or len(self._pending) or 1
        out = bytes(self._pending[:limit])
        del self._pending[:limit]
        return out

    async def _pump(self) -> None:
        try:
            for event in self._ws.events():
                match event:
                    case BytesMessage(data=data):
                        self._pending += data
                    case Ping():
                        await self._send_raw(self._ws.send(event.response()))
                    case CloseConnection():
                        if self._ws.state is ConnectionState.REMOTE_CLOSING:
                            await self._send_raw(self._ws.send(event.response()))
                        self._eof = True
                    case TextMessage():
                        await self._close(CloseReason.UNSUPPORTED_DATA, "text messages are not DERP")
                        raise trio.BrokenResourceError("text message on a DERP WebSocket")
            if self._pending or self._eof:
                return
        except WSRemoteProtocolError as e:
            self._eof = True
            raise trio.BrokenResourceError(f"WebSocket protocol error: {e}") from e
        data = await self._transport.receive_some(RECV_SIZE)
        if not data:
            self._eof = True
            return
        self._ws.receive_data(data)

    async def _close(self, code: CloseReason, reason: str) -> None:
        if self._ws.state is ConnectionState.OPEN:
            try:
                await self._send_raw(self._ws.send(CloseConnection(code=code, reason=reason)))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await self._close(CloseReason.NORMAL_CLOSURE, "")
        await self._transport.aclose()
