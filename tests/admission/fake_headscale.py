"""A test server that answers like headscale's ``/verify`` (spec 16.3):

* ``POST /verify`` only; any other method gets 405 ``Wrong method``;
* a body over 4 KiB gets 413; a body that is not JSON gets 400;
* otherwise 200, ``Content-Type: application/json``, body ``{"Allow":true}\\n`` if
  ``NodePublic`` is a registered node key, else ``{"Allow":false}\\n``; ``Source`` is ignored.

It records every request (method, headers, body) so tests can check what the relay sent.
Extra modes let a test make it misbehave: ``hang`` (accept and never answer), ``hang_sources``
(never answer requests whose ``Source`` is in the set), ``location`` (answer 307 to it),
``status`` (answer this status),
``body`` (answer these bytes with 200).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import h11
import trio

MAX_BODY = 4 << 10


def _source(body: bytes) -> str | None:
    try:
        req = json.loads(body)
    except ValueError:
        return None
    return req.get("Source") if isinstance(req, dict) else None


@dataclass
class Seen:
    method: bytes
    target: bytes
    headers: dict[bytes, bytes]
    body: bytes


@dataclass
class FakeHeadscale:
    node_keys: set[str] = field(default_factory=set)
    seen: list[Seen] = field(default_factory=list)
    hang: bool = False
    hang_sources: set[str] = field(default_factory=set)
    allow_all: bool = False
    location: str | None = None  # answer 307 to here
    connections: int = 0
    status: int | None = None
    body: bytes | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/verify"

    def _answer(self, method: bytes, body: bytes, too_big: bool) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        text = [(b"Content-Type", b"text/plain; charset=utf-8"), (b"X-Content-Type-Options", b"nosniff")]
        if self.location is not None:
            return 307, [*text, (b"Location", self.location.encode())], b"moved\n"
        if self.status is not None:
            return self.status, text, b"forced status\n"
        if self.body is not None:
            return 200, [(b"Content-Type", b"application/json")], self.body
        if method != b"POST":
            return 405, text, b"Wrong method\n"
        if too_big:
            return 413, text, b"Request Entity Too Large\n"
        try:
            req = json.loads(body)
            key = req.get("NodePublic", "") if isinstance(req, dict) else None
        except ValueError:
            key = None
        if key is None:
            return 400, text, b"Bad Request\n"
        allow = self.allow_all or key in self.node_keys
        return 200, [(b"Content-Type", b"application/json")], b'{"Allow":%s}\n' % (b"true" if allow else b"false")

    async def _handle(self, stream: trio.SocketStream) -> None:
        """Answer requests on one connection, with keep-alive as a Go server does."""
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        while await self._one_request(stream, conn):
            conn.start_next_cycle()

    async def _one_request(self, stream: trio.SocketStream, conn: h11.Connection) -> bool:
        request = None
        body = bytearray()
        too_big = False
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.DONE:
                    return False
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                too_big = too_big or len(body) > MAX_BODY
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return False
        assert request is not None
        self.seen.append(Seen(request.method, request.target, dict(request.headers), bytes(body)))
        if self.hang or (self.hang_sources and _source(bytes(body)) in self.hang_sources):
            await trio.sleep_forever()
        status, headers, payload = self._answer(request.method, bytes(body), too_big)
        headers = [*headers, (b"Content-Length", str(len(payload)).encode())]
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers))
                              + conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage()))
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def serve(self, *, task_status: trio.TaskStatus[FakeHeadscale] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]

        async def handler(stream: trio.SocketStream) -> None:
            try:
                await self._handle(stream)
            except (trio.BrokenResourceError, h11.RemoteProtocolError):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, handler, listeners)
            task_status.started(self)
