"""The HTTP/1.1 front door of every relay connection (h11), and the port-80 companion.

A connection is read as HTTP until a request upgrades it to DERP (binary or WebSocket); plain
requests (probes, generate_204, robots.txt, the home page, /metrics) are answered with
keep-alive.  The request head and the TLS handshake must finish within ``http_timeout``
(slowloris); a request body is capped.  Garbage gets a 400 where HTTP still makes sense, is
counted in ``derp_handshake_failures_total{reason}``, and closes only this connection.

Dependencies: imports ``server`` (whose ``RelayServer.serve_derp`` takes an upgraded stream)
and ``derpd.transport``; imported only by ``listener``.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST

from .. import __version__
from ..protocol.upgrade import (
    BROWSER_HEADERS,
    MAX_HEAD,
    BootstrapDNS,
    Debug,
    DerpUpgrade,
    Metrics,
    Response,
    WebSocketUpgrade,
    read_plain_derp_request,
    redirect_to_https,
    request_framing_error,
    route_request,
    websocket_switching_protocols,
)
from ..transport.raw_socket import raw_io_for
from ..transport.tls_stream import DrainingSSLStream
from ..transport.websocket_stream import WebSocketStream
from .client_address import client_from_forwarded_for, is_trusted, plain_address
from .debug import debug_response

if TYPE_CHECKING:
    from .server import RelayServer

log = logging.getLogger("derpd.http")

MAX_BODY = 64 * 1024
MAX_REQUESTS_PER_CONNECTION = 100
WRITE_TIMEOUT = 30.0  # every HTTP response must be written within this (derper: 30 s)
_READ = 16 * 1024


class _BadRequest(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _WriteTimedOut(Exception):
    """A response could not be written within the write deadline: the peer does not read."""


async def _write(stream: trio.abc.Stream, data: bytes, timeout: float) -> None:
    with trio.move_on_after(timeout) as scope:
        await stream.send_all(data)
    if scope.cancelled_caught:
        raise _WriteTimedOut


class _RequestReader:
    """The next request of a connection, from the bytes fed to it.

    The head (request line and headers) may be at most ``MAX_HEAD`` bytes, however the bytes
    arrive: h11's own check looks only at an incomplete head, so a complete one that came in a
    large read is measured here (bytes in, minus what h11 still holds past the head)."""

    __slots__ = ("conn", "request", "body", "received")

    def __init__(self, conn: h11.Connection) -> None:
        self.conn = conn
        self.request: h11.Request | None = None
        self.body = 0
        self.received = len(conn.trailing_data[0])  # bytes of this request already read (keep-alive)

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        self.conn.receive_data(data)

    def advance(self) -> h11.Request | None | type[h11.NEED_DATA]:
        """The request once its head and body are in, None on a clean EOF, else NEED_DATA."""
        conn = self.conn
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                raise _BadRequest("head_too_large" if e.error_status_hint == 431 else "bad_http") from e
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    raise _BadRequest("expect_continue")
                if self.request is None and self.received > MAX_HEAD:
                    raise _BadRequest("head_too_large")
                return h11.NEED_DATA
            if isinstance(event, h11.Request):
                if self.received - len(conn.trailing_data[0]) > MAX_HEAD:
                    raise _BadRequest("head_too_large")
                if (why := request_framing_error(event)) is not None:
                    raise _BadRequest(why)
                self.request = event
            elif isinstance(event, h11.Data):
                self.body += len(event.data)
                if self.body > MAX_BODY:
                    raise _BadRequest("body_too_large")
            elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                return self.request
            elif isinstance(event, h11.ConnectionClosed):
                if self.request is not None or conn.their_state is h11.ERROR:
                    raise _BadRequest("truncated_request")
                return None


async def _read_request(stream: trio.abc.Stream, conn: h11.Connection) -> h11.Request | None:
    """Returns the next request once its head and body are in, or None on a clean EOF."""
    reader = _RequestReader(conn)
    while (request := reader.advance()) is h11.NEED_DATA:
        reader.feed(await stream.receive_some(_READ))
    return request  # type: ignore[return-value]


def _read_now(stream: trio.SocketStream) -> bytes | None:
    """What a plain TCP socket holds right now (b"" at EOF), or None if nothing yet."""
    try:
        return os.read(stream.socket.fileno(), _READ)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise trio.BrokenResourceError(exc) from exc


async def _send_response(stream: trio.abc.Stream, conn: h11.Connection, response: Response,
                         timeout: float = WRITE_TIMEOUT) -> None:
    head, body, end = response.to_h11()
    data = conn.send(head)
    if body is not None:
        data += conn.send(body)
    data += conn.send(end)
    await _write(stream, data, timeout)


def https_authority(hostname: str, port: int) -> bytes:
    """``--hostname`` (and the TLS port when it is not 443), for redirects to the relay."""
    name = f"[{hostname}]" if ":" in hostname else hostname
    return (name if port in (0, 443) else f"{name}:{port}").encode()


def is_loopback(ip: str) -> bool:
    addr = plain_address(ip)
    return addr is not None and addr.is_loopback


def debug_allowed(server: RelayServer, ip: str) -> bool:
    """derper's debug rule: loopback peers, plus derpd's ``--debug-allow`` networks."""
    addr = plain_address(ip)
    if addr is None:
        return False
    return addr.is_loopback or any(addr in net for net in server.settings.debug_allow if net.version == addr.version)


def _answer_debug_or_dns(server: RelayServer, route: Debug | BootstrapDNS, ip: str, relayed: bool) -> Response:
    """``relayed``: a proxy relayed the request, so it is never a local (debug) peer."""
    if isinstance(route, Debug):
        info = (("Version", __version__), ("Uptime", f"{time.monotonic() - server.started:.0f}s"),
                ("TLS hostname", server.settings.hostname), ("Mesh key", str(server.settings.mesh_key is not None)))
        allowed = server.settings.serve_metrics and not relayed and debug_allowed(server, ip)
        return debug_response(route, allowed=allowed,
                              metrics=server.metrics_text, info=info, clients=server.clients_json)
    # derper: JSON, browser headers, and no keep-alive (these requests are one-off and cross-region)
    return Response(200, (*BROWSER_HEADERS, (b"Content-Type", b"application/json"), (b"Connection", b"close")),
                    server.bootstrap_dns(route.query, ip), head_only=route.head_only)


_ROUTE_LABELS = {b"/derp": "derp", b"/derp/probe": "probe", b"/derp/latency-check": "probe",
                 b"/generate_204": "generate_204", b"/robots.txt": "robots", b"/metrics": "metrics",
                 b"/bootstrap-dns": "bootstrap_dns"}


def _route_label(request: h11.Request) -> str:
    path = request.target.split(b"?", 1)[0]
    if path.startswith(b"/debug"):
        return "debug"
    return _ROUTE_LABELS.get(path, "home")


_PROXY_HEADERS = (b"x-forwarded-for", b"forwarded", b"x-real-ip")


def _forwarded(server: RelayServer, request: h11.Request, remote: tuple[str, int],
               behind_proxy: bool) -> tuple[tuple[str, int], bool]:
    """The client of a plain-HTTP request, and whether a proxy relayed it.  From a trusted
    proxy, ``X-Forwarded-For`` names the client; any request that carries a forwarding header,
    or comes from a trusted proxy, was relayed (so it is never "local", whoever sent it)."""
    if behind_proxy:
        xff = [v for k, v in request.headers if k == b"x-forwarded-for"]
        client = client_from_forwarded_for(xff, server.trusted_proxies) if xff else None
        return ((client, 0) if client else remote), True
    return remote, any(k.lower() in _PROXY_HEADERS for k, _ in request.headers.raw_items())


async def handle_connection(
    server: RelayServer, stream: trio.abc.Stream, remote: tuple[str, int], *, tls: ssl.SSLContext | None,
    via_proxy: bool = False, internal: bool = False,
) -> None:
    """Serve one accepted connection until it closes.  Never raises for peer misbehaviour.

    ``remote`` is the client (as a PROXY header named it when ``via_proxy``).  On plain HTTP
    from a ``--trusted-proxies`` address, ``X-Forwarded-For`` names the client instead, and
    the per-IP limit is applied to that client when it upgrades to DERP; ``internal`` (the
    loopback links between ``--workers``) never goes through a proxy."""
    settings = server.settings
    stats = server.stats
    behind_http_proxy = (tls is None and not via_proxy and not internal and bool(server.trusted_proxies)
                         and is_trusted(remote[0], server.trusted_proxies))
    peer = remote
    if tls is not None:
        stream = DrainingSSLStream(stream, tls, server_side=True)
    raw = raw_io_for(stream)  # plain TCP (not TLS, not behind a PROXY header): cheaper reads
    receive_some = raw.receive_some if raw is not None else stream.receive_some
    first = None
    deadline = None  # of the first request's head, once a wait for it has begun
    if raw is not None:
        # A client writes its request right after connecting, so the first read finds it or
        # finds nothing yet; then wait for the socket once and read again, so that a login
        # still takes the fast path below (h11 costs about a sixth of a login).
        try:
            first = _read_now(stream)  # type: ignore[arg-type]
            if first is None:
                deadline = trio.current_time() + settings.http_timeout
                with trio.CancelScope(deadline=deadline) as waited:
                    await trio.lowlevel.wait_readable(stream.socket)  # type: ignore[attr-defined]
                    first = _read_now(stream)  # type: ignore[arg-type]
                if waited.cancelled_caught:
                    _head_timed_out(server, remote[0])
                    return
        except trio.BrokenResourceError:
            return
        if first is not None:
            fast = None if behind_http_proxy or not settings.derp_enabled else read_plain_derp_request(first)
            if fast is not None:  # a client's login request: no h11 (see read_plain_derp_request)
                stats.http_requests["derp"] += 1
                up, trailing = fast.upgrade, fast.trailing
                first = fast = None  # up to 16 KiB that the session need not keep
                preamble = b"" if up.fast_start else server.derp_101
                try:
                    await server.serve_derp(stream, remote, trailing, preamble=preamble, not_ideal=up.not_ideal)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                return
    try:
        upgrade = await _serve_http(server, stream, peer, first, deadline, receive_some,
                                    behind_http_proxy=behind_http_proxy, via_proxy=via_proxy)
        first = None
        if upgrade is None:
            return
        # The HTTP state (h11's connection, the request: about 2.4 KB) went with _serve_http's
        # frame; a DERP session that lasts days keeps only what it needs.
        route, initial, remote = upgrade
        if not behind_http_proxy:
            await _upgrade(server, stream, route, initial, remote)
        elif server.enter_ip(remote[0]):
            try:
                await _upgrade(server, stream, route, initial, remote)
            finally:
                server.leave_ip(remote[0])
    except _WriteTimedOut:
        stats.handshake_failures["http_write_timeout"] += 1
        log.debug("HTTP response to %s not read within %ss, closing", remote[0], settings.http_write_timeout)
    except trio.BrokenResourceError as e:
        cause = e.__cause__
        if isinstance(cause, ssl.SSLError):
            stats.handshake_failures["tls"] += 1
            log.debug("TLS failure from %s: %s", remote[0], cause)
    except (trio.ClosedResourceError, h11.LocalProtocolError):
        pass


def _head_timed_out(server: RelayServer, ip: str) -> None:
    server.stats.handshake_failures["http_timeout"] += 1
    log.debug("no complete request from %s within %ss, closing", ip, server.settings.http_timeout)


async def _serve_http(
    server: RelayServer, stream: trio.abc.Stream, peer: tuple[str, int], first: bytes | None,
    deadline: float | None, receive_some: Callable[[int], Awaitable[bytes]], *,
    behind_http_proxy: bool, via_proxy: bool,
) -> tuple[DerpUpgrade | WebSocketUpgrade, bytes, tuple[str, int]] | None:
    """Answer HTTP requests (keep-alive) until one upgrades: then (its route, the bytes read
    past its head, the client's address), else None when the connection is done.  A bad
    request is answered 400 here; I/O errors propagate."""
    settings = server.settings
    stats = server.stats
    remote = peer
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    if first is not None:
        conn.receive_data(first)
    try:
        for _ in range(MAX_REQUESTS_PER_CONNECTION):
            reader = _RequestReader(conn)
            request = reader.advance()
            if request is h11.NEED_DATA:
                if deadline is None:
                    deadline = trio.current_time() + settings.http_timeout
                with trio.CancelScope(deadline=deadline) as scope:
                    while (request := reader.advance()) is h11.NEED_DATA:
                        reader.feed(await receive_some(_READ))
                if scope.cancelled_caught:
                    _head_timed_out(server, remote[0])
                    return None
            assert not isinstance(request, type)
            if request is None:
                return None
            route = route_request(request, home=settings.home, derp_enabled=settings.derp_enabled)
            stats.http_requests[_route_label(request)] += 1
            remote, relayed = _forwarded(server, request, peer, behind_http_proxy)
            relayed = relayed or via_proxy
            match route:
                case DerpUpgrade() | WebSocketUpgrade():
                    return route, conn.trailing_data[0], remote
                case Metrics():
                    if settings.serve_metrics and not relayed and is_loopback(remote[0]):
                        response = Response(200, ((b"Content-Type", CONTENT_TYPE_LATEST.encode()),),
                                            server.metrics_text())
                    else:
                        response = Response(403, ((b"Content-Type", b"text/plain; charset=utf-8"),),
                                            b"metrics are served to loopback clients only; use --metrics-addr\n")
                    await _send_response(stream, conn, response, settings.http_write_timeout)
                case Debug() | BootstrapDNS():
                    await _send_response(stream, conn, _answer_debug_or_dns(server, route, remote[0], relayed),
                                         settings.http_write_timeout)
                case Response() as response:
                    await _send_response(stream, conn, response, settings.http_write_timeout)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return None
            conn.start_next_cycle()
            deadline = None
    except _BadRequest as e:
        stats.handshake_failures[e.reason] += 1
        log.debug("bad request from %s: %s", remote[0], e.reason)
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            try:
                await _send_response(stream, conn, Response(400, body=b"bad request\n",
                                                            headers=((b"Connection", b"close"),)), 1.0)
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError, _WriteTimedOut):
                pass
    return None


async def _upgrade(server: RelayServer, stream: trio.abc.Stream, route: DerpUpgrade | WebSocketUpgrade,
                   initial: bytes, remote: tuple[str, int]) -> None:
    """Answer an upgrade and serve DERP (binary or inside WebSocket) on ``stream``; ``initial``
    holds the bytes read past the request's head."""
    if isinstance(route, DerpUpgrade):
        preamble = b"" if route.fast_start else server.derp_101
        await server.serve_derp(stream, remote, initial, preamble=preamble, not_ideal=route.not_ideal)
        return
    await _write(stream, websocket_switching_protocols(route.accept_token), server.settings.http_write_timeout)
    ws = WebSocketStream(stream, initial=initial)
    if not route.subprotocol_ok:
        server.stats.handshake_failures["websocket_subprotocol"] += 1
        await ws._close(1008, "client must speak the derp subprotocol")
        return
    server.stats.websocket_accepts += 1
    await server.serve_derp(ws, remote, b"")


async def handle_redirect_connection(server: RelayServer, stream: trio.abc.Stream, remote: tuple[str, int]) -> None:
    """The plain-HTTP port beside TLS: generate_204, else a redirect to https (spec 10.2)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    try:
        with trio.move_on_after(server.settings.http_timeout):
            request = await _read_request(stream, conn)
            if request is not None:
                path = request.target.split(b"?", 1)[0]
                route = route_request(request) if request.target.startswith(b"/debug") else None
                if path.startswith(ACME_CHALLENGE_PREFIX):
                    response = _acme_http01(server, path[len(ACME_CHALLENGE_PREFIX):], remote)
                elif isinstance(route, Debug):  # derper serves /debug on port 80 too (tsweb.Port80Handler)
                    relayed = _forwarded(server, request, remote, False)[1]
                    response = _answer_debug_or_dns(server, route, remote[0], relayed)
                else:
                    response = redirect_to_https(request, https_authority(server.settings.hostname, server.port))
                await _send_response(stream, conn, response, server.settings.http_write_timeout)
    except _BadRequest as e:
        server.stats.handshake_failures[e.reason] += 1
    except _WriteTimedOut:
        server.stats.handshake_failures["http_write_timeout"] += 1
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        pass


ACME_CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"


def _acme_http01(server: RelayServer, token: bytes, remote: tuple[str, int]) -> Response:
    """RFC 8555 8.3: the key authorization of a pending HTTP-01 token, else 404 (never a redirect)."""
    text = b"text/plain"
    challenges = server.challenges
    answer = None
    if challenges is not None and token and len(token) <= 256:
        answer = challenges.http01_response(token.decode("ascii", "replace"))
    if answer is None:
        log.debug("HTTP-01 request from %s for an unknown token", remote[0])
        return Response(404, ((b"Content-Type", text),), b"no such ACME challenge\n")
    log.info("answered an HTTP-01 validation from %s", remote[0])
    return Response(200, ((b"Content-Type", text),), answer)


async def handle_metrics_connection(render: Callable[[], bytes], stream: trio.abc.Stream, timeout: float) -> None:
    """The dedicated ``--metrics-addr`` listener: ``/metrics`` for anyone who can reach it
    (bind it to a private address), 404 elsewhere."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    try:
        for _ in range(MAX_REQUESTS_PER_CONNECTION):
            with trio.move_on_after(timeout) as scope:
                request = await _read_request(stream, conn)
            if scope.cancelled_caught or request is None:
                return
            if request.target.split(b"?", 1)[0] == b"/metrics":
                response = Response(200, ((b"Content-Type", CONTENT_TYPE_LATEST.encode()),), render(),
                                    head_only=request.method == b"HEAD")
            else:
                response = Response(404, ((b"Content-Type", b"text/plain; charset=utf-8"),), b"try /metrics\n")
            await _send_response(stream, conn, response)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except (_BadRequest, _WriteTimedOut, trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        pass
