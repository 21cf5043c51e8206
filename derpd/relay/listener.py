"""Listeners: the accept loops of the relay port, the port-80 companion and the metrics port,
with their limits, and the relay's lifetime (start, TLS reloads, graceful shutdown).

``serve_relay(settings, task_status=...)`` binds every listener, then reports a
``RunningRelay``.  It serves until cancelled, or until ``RunningRelay.shutdown(grace)``: then
it stops accepting, sends every client a Restarting frame, lets their queues drain for at most
``grace`` seconds, closes what is left, and returns.

Dependencies: the top of ``derpd.relay``; imports ``http_front`` and ``server``, and nothing
in ``derpd.relay`` imports it.  ``derpd.node`` and the tests start relays from here.
"""

from __future__ import annotations

import errno
import gc
import logging
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from ..keys import NodePublic
from ..metrics import RelayStats
from ..settings import RelaySettings, split_host_port
from ..protocol.errors import RemoteProtocolError
from .client_address import is_trusted, read_proxy_header
from .http_front import handle_connection, handle_metrics_connection, handle_redirect_connection
from .server import RelayServer
from .tls_select import select_tls

log = logging.getLogger("derpd.relay")

_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
CERT_WATCH_INTERVAL = 30.0

Handler = Callable[[trio.SocketStream, tuple[str, int]], Awaitable[None]]


class BindError(OSError):
    """A listen address of the relay cannot be bound.  ``which`` names the listener: "relay"
    (the main address), "http" (the plain-HTTP port beside TLS) or "metrics"; ``cause`` is
    the OSError from bind."""

    def __init__(self, cause: OSError, host: str, port: int, which: str) -> None:
        super().__init__(cause.errno, cause.strerror)
        self.cause = cause
        self.host = host
        self.port = port
        self.which = which


async def _open_listeners(host: str, port: int, which: str) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(port, host=host or None)
    except OSError as e:
        raise BindError(e, host, port, which) from e


@dataclass
class RunningRelay:
    """What ``serve_relay`` reports once it listens."""

    server: RelayServer
    url: str  # base URL; DERP is at url + "/derp"
    host: str
    port: int
    public_key: NodePublic
    cert_pin: str | None = None
    http_port: int | None = None
    addresses: list[tuple[str, int]] = field(default_factory=list)
    _shutdown: trio.Event = field(default_factory=trio.Event, repr=False)
    _grace: float = 0.0

    @property
    def derp_url(self) -> str:
        return self.url + "/derp"

    def shutdown(self, grace: float = 5.0) -> None:
        """Ask ``serve_relay`` to stop accepting, send Restarting to every client, drain for
        at most ``grace`` seconds, and return."""
        self._grace = grace
        self._shutdown.set()

    async def wait_shutdown(self) -> float:
        await self._shutdown.wait()
        return self._grace


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` banked; ``inf`` rate means unlimited."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = trio.current_time()

    def take(self, n: float = 1.0) -> bool:
        if self.rate == float("inf"):
            return True
        now = trio.current_time()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


def _tune_socket(sock: trio.socket.SocketType, settings: RelaySettings) -> None:
    """TCP keepalive and TCP_USER_TIMEOUT where the OS has them (P-32); trio already sets
    TCP_NODELAY on every SocketStream.  Set on a listening socket, Linux passes them on to
    every accepted connection, so there they are set once per listener, not per accept."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            period = max(1, int(settings.tcp_keepalive))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, period)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, period)
        if hasattr(socket, "TCP_USER_TIMEOUT") and settings.tcp_user_timeout > 0:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(settings.tcp_user_timeout * 1000))
    except OSError:
        pass


_INHERITS_OPTIONS = sys.platform.startswith("linux")  # accepted sockets keep the listener's options
_IGNORED_ACCEPT_ERRNOS = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM}  # the peer gave up; go on
ACCEPTS_PER_TURN = 64  # connections one wakeup of an accept loop takes before it lets others run


async def _accept_loop(
    listener: trio.SocketListener,
    handler: Handler,
    settings: RelaySettings,
    handler_nursery: trio.Nursery,
    bucket: TokenBucket | None = None,
    on_reject: Callable[[], None] | None = None,
    stats: RelayStats | None = None,
) -> None:
    """Accept forever: every connection the backlog holds per wakeup (at most
    ``ACCEPTS_PER_TURN`` before a checkpoint), with a plain non-blocking ``accept`` on the
    listening descriptor, so an accept costs no scheduler round.  Retries
    only on capacity errors (EMFILE...), with one log line; connections over the accept rate
    are closed at once and accepting goes on (P-31).  With ``stats``, the handler's unexpected
    exceptions are contained to its connection (``_serve_contained``)."""
    tsock = listener.socket
    _tune_socket(tsock, settings)
    # The same descriptor in a stdlib socket (trio's has no synchronous accept); the listener
    # still owns it: detached, never closed, here.
    lsock = socket.socket(tsock.family, tsock.type, fileno=tsock.fileno())
    lsock.setblocking(False)
    tune_each = not _INHERITS_OPTIONS
    serve = _serve_stream if stats is None else _serve_contained
    start_soon = handler_nursery.start_soon
    from_stdlib = trio.socket.from_stdlib_socket
    stream_type = trio.SocketStream
    out_of_fds_logged = False
    accepted = 0
    try:
        while True:
            try:
                sock, addr = lsock.accept()
            except BlockingIOError:
                accepted = 0
                await trio.lowlevel.wait_readable(lsock)
                continue
            except OSError as e:
                if e.errno in _IGNORED_ACCEPT_ERRNOS:
                    continue
                if e.errno not in _CAPACITY_ERRNOS:
                    raise
                if not out_of_fds_logged:
                    log.error("accept failed (%s): out of file descriptors or memory; raise the open-files "
                              "limit (ulimit -n, systemd LimitNOFILE)", errno.errorcode.get(e.errno, e.errno))
                    out_of_fds_logged = True
                await trio.sleep(0.1)
                continue
            out_of_fds_logged = False
            if bucket is not None and not bucket.take():
                sock.close()
                if on_reject is not None:
                    on_reject()
            else:
                stream = stream_type(from_stdlib(sock))
                if tune_each:
                    _tune_socket(stream.socket, settings)
                start_soon(serve, stream, handler, addr[:2], stats)
            accepted += 1
            if accepted >= ACCEPTS_PER_TURN:
                accepted = 0
                await trio.lowlevel.checkpoint()
    finally:
        lsock.detach()


async def _serve_stream(stream: trio.SocketStream, handler: Handler, peer: tuple[str, int], stats: None) -> None:
    try:
        await handler(stream, peer)
    except OSError:
        pass
    finally:
        stream.socket.close()  # what aclose_forcefully does, without its cancel scope and checkpoint


async def _serve_contained(stream: trio.SocketStream, handler: Handler, peer: tuple[str, int],
                           stats: RelayStats) -> None:
    """``handler``, with its unexpected exceptions (bugs) contained to its own connection: such a
    connection is closed, counted in ``derp_internal_errors{where="connection"}`` and logged in
    one warning line (the traceback at debug level), and every other connection goes on.  The
    compiled data plane has the same policy (``derpd.relay.dataplane``).  One coroutine per
    connection, not a wrapper around ``_serve_stream``: a login is mostly such small costs."""
    try:
        await handler(stream, peer)
    except Exception as e:  # noqa: BLE001 -- the policy itself; Cancelled is a BaseException
        stats.internal_errors["connection"] += 1
        log.warning("internal error on a connection from %s, closing it: %r", peer[0], e)
        log.debug("internal error on a connection from %s", peer[0], exc_info=True)
    finally:
        stream.socket.close()


GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """A login allocates a few hundred short-lived container objects (coroutines, cancel
    scopes, events); with the default threshold of 700 the cyclic collector runs every few
    logins, and its older generations, which hold every connection, more often than they
    need to.  Raised for the whole process (a relay process is one) and never lowered."""
    young, mid, old = gc.get_threshold()
    if 0 < young < GC_YOUNG_THRESHOLD:  # 0: collection is off; leave it off
        gc.set_threshold(GC_YOUNG_THRESHOLD, mid, old)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _watch_cert_files(server: RelayServer) -> None:
    while True:
        await trio.sleep(CERT_WATCH_INTERVAL)
        if server.cert_files_changed():
            server.reload_tls()


def _listeners_from(sockets: list[socket.socket]) -> list[trio.SocketListener]:
    out = []
    for sock in sockets:
        sock.setblocking(False)
        out.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
    return out


async def serve_relay(
    settings: RelaySettings,
    *,
    sockets: list[socket.socket] | None = None,
    internal_sockets: list[socket.socket] | None = None,
    task_status: trio.TaskStatus[RunningRelay] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the relay until cancelled or shut down.

    Args:
        sockets: already bound and listening sockets for the main address (``--workers``
            binds them in the parent with SO_REUSEPORT); default: bind ``settings.addr``.
        internal_sockets: extra plain-HTTP listeners (the loopback ports workers mesh over).

    Raises:
        CertError: the TLS certificate cannot be loaded.
        BindError: a listen address cannot be bound.
    """
    server = RelayServer(settings)
    server.load_tls()
    tune_gc()
    host, port = settings.listen
    if sockets is not None:
        listeners = _listeners_from(sockets)
    else:
        listeners = await _open_listeners(host, port, "relay")
    internal = _listeners_from(internal_sockets or [])
    bound_port = server.port = listeners[0].socket.getsockname()[1]
    addresses = [(str(a[0]), int(a[1])) for a in (ls.socket.getsockname() for ls in listeners)]
    redirect_listeners: list[trio.SocketListener] = []
    http_port = None
    if settings.tls and settings.http_port >= 0:  # with ACME also before a certificate exists
        redirect_listeners = await _open_listeners(host, settings.http_port, "http")
        http_port = redirect_listeners[0].socket.getsockname()[1]
    if settings.tls:
        url = f"https://{_url_host(settings.hostname)}:{bound_port}"
    elif host in ("", "0.0.0.0", "::"):
        url = f"http://127.0.0.1:{bound_port}"
    else:
        url = f"http://{_url_host(host)}:{bound_port}"

    proxy_protocol = settings.proxy_protocol
    trusted = server.trusted_proxies
    stats = server.stats

    acme = settings.acme  # a property that parses --addr: read once, not per connection

    async def serve_tls(stream: trio.abc.Stream, remote: tuple[str, int], via_proxy: bool = False) -> None:
        if not acme:
            await handle_connection(server, stream, remote, tls=server.ssl_context, via_proxy=via_proxy)
        elif (chosen := await select_tls(server, stream, remote)) is not None:  # ACME: derpd.relay.tls_select
            await handle_connection(server, chosen[0], remote, tls=chosen[1], via_proxy=via_proxy)

    async def relay_handler(stream: trio.SocketStream, remote: tuple[str, int]) -> None:
        via_proxy = False
        conn_stream: trio.abc.Stream = stream
        if proxy_protocol:
            try:
                with trio.fail_after(settings.http_timeout):
                    conn_stream, remote, via_proxy = await read_proxy_header(stream, remote, trusted)
            except RemoteProtocolError as e:
                stats.handshake_failures[e.reason] += 1
                log.debug("closing a connection from %s: %s", remote[0], e)
                return
            except trio.TooSlowError:
                stats.handshake_failures["http_timeout"] += 1
                log.debug("no PROXY header from %s within %ss, closing", remote[0], settings.http_timeout)
                return
        elif trusted and is_trusted(remote[0], trusted):
            # A proxy without the PROXY protocol: counted per client once X-Forwarded-For is read.
            await serve_tls(stream, remote)
            return
        ip = remote[0]
        if not server.enter_ip(ip):
            return
        try:
            if acme:
                await serve_tls(conn_stream, remote, via_proxy=via_proxy)
            else:  # serve_tls's first case, one coroutine fewer per login
                await handle_connection(server, conn_stream, remote, tls=server.ssl_context, via_proxy=via_proxy)
        finally:
            server.leave_ip(ip)

    async def internal_handler(stream: trio.SocketStream, remote: tuple[str, int]) -> None:
        await handle_connection(server, stream, remote, tls=None, internal=True)

    async def redirect_handler(stream: trio.SocketStream, remote: tuple[str, int]) -> None:
        await handle_redirect_connection(server, stream, remote)

    def rejected() -> None:
        server.stats.accepts_rejected["rate_limit"] += 1

    running = RunningRelay(
        server=server, url=url, host=host, port=bound_port, public_key=server.public_key,
        cert_pin=server.cert.pin if server.cert else None, http_port=http_port, addresses=addresses,
    )
    bucket = TokenBucket(settings.accept_connection_limit, settings.accept_connection_burst)
    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as acceptors:
            for ls in listeners:
                acceptors.start_soon(_accept_loop, ls, relay_handler, settings, connections, bucket, rejected, stats)
            for ls in redirect_listeners:
                acceptors.start_soon(_accept_loop, ls, redirect_handler, settings, connections, None, None, stats)
            for ls in internal:
                acceptors.start_soon(_accept_loop, ls, internal_handler, settings, connections, None, None, stats)
            if server.cert is not None:
                acceptors.start_soon(_watch_cert_files, server)
            connections.start_soon(server.run_keepalives)
            connections.start_soon(server.run_health)
            connections.start_soon(server.dataplane.run)
            task_status.started(running)
            grace = await running.wait_shutdown()
            acceptors.cancel_scope.cancel()
        for ls in listeners + redirect_listeners + internal:
            await ls.aclose()
        log.info("shutting down: %d clients told to reconnect, draining for up to %.1fs",
                    len(server.all_connections()), grace)
        left = await server.drain(grace)
        if left:
            log.warning("grace period over with %d clients still holding queued packets", left)
        connections.cancel_scope.cancel()


async def serve_metrics(
    addr: str, render: Callable[[], bytes], *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
) -> None:
    """A dedicated Prometheus listener on ``HOST:PORT`` (``--metrics-addr``)."""
    host, port = split_host_port(addr, default_port=9090)
    listeners = await _open_listeners(host, port, "metrics")
    bound = listeners[0].socket.getsockname()[:2]
    settings = RelaySettings(addr="127.0.0.1:0")

    async def handler(stream: trio.SocketStream, remote: tuple[str, int]) -> None:
        await handle_metrics_connection(render, stream, 30.0)

    async with trio.open_nursery() as nursery:
        for ls in listeners:
            nursery.start_soon(_accept_loop, ls, handler, settings, nursery)
        task_status.started((str(bound[0]), int(bound[1])))
