"""A stand-in for tailscaled's LocalAPI on a unix socket, answering ``/localapi/v0/whois`` the way
``ipn/localapi`` does (tailscale.com v1.98.10):

* a Host other than ``local-tailscaled.sock`` (or empty) gets 403 ``invalid localapi request``;
* ``addr=nodekey:<hex>``: 200 with a JSON WhoIsResponse for a known key, 404 ``no match for
  IP:port`` otherwise; a malformed node key gets 400 ``invalid nodekey in 'addr' parameter``;
* ``old``: answers 400 ``invalid 'addr' parameter`` like a tailscaled too old to look up keys;
* ``hang``: reads the request and never answers.

It records every request (target and headers) and keeps connections alive, as Go's server does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import h11
import trio


@dataclass
class FakeTailscaled:
    path: str
    node_keys: set[str] = field(default_factory=set)
    seen: list[tuple[bytes, dict[bytes, bytes]]] = field(default_factory=list)
    hang: bool = False
    old: bool = False

    def _answer(self, request: h11.Request) -> tuple[int, bytes, bytes]:
        headers = dict(request.headers)
        if headers.get(b"host", b"") not in (b"", b"local-tailscaled.sock"):
            return 403, b"text/plain; charset=utf-8", b"invalid localapi request\n"
        url = urlsplit(request.target.decode())
        if url.path != "/localapi/v0/whois":
            return 404, b"text/plain; charset=utf-8", b"404 page not found\n"
        addr = parse_qs(url.query).get("addr", [""])[0]
        if self.old:
            return 400, b"text/plain; charset=utf-8", b"invalid 'addr' parameter\n"
        if not addr.startswith("nodekey:") or len(addr) != 8 + 64:
            return 400, b"text/plain; charset=utf-8", b"invalid nodekey in 'addr' parameter\n"
        if addr not in self.node_keys:
            return 404, b"text/plain; charset=utf-8", b"no match for IP:port\n"
        doc = {"Node": {"ID": 1, "Key": addr, "Name": "node.tailnet.ts.net."},
               "UserProfile": {"ID": 1, "LoginName": "op@example.com"}, "CapMap": {}}
        return 200, b"application/json", json.dumps(doc, indent="\t").encode()

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                self.seen.append((event.target, dict(event.headers)))
                if self.hang:
                    await trio.sleep_forever()
                status, ctype, body = self._answer(event)
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=[
                    (b"Content-Type", ctype), (b"Content-Length", str(len(body)).encode()),
                    (b"Tailscale-Cap", b"138")])) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
            elif isinstance(event, h11.EndOfMessage):
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return

    async def serve(self, *, task_status: trio.TaskStatus[FakeTailscaled] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(self.path)
        sock.listen(16)
        listener = trio.SocketListener(sock)

        async def handler(stream: trio.SocketStream) -> None:
            try:
                await self._handle(stream)
            except (trio.BrokenResourceError, h11.RemoteProtocolError):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, handler, [listener])
            task_status.started(self)
