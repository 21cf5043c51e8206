"""The relay: ``RelayServer`` holds the registry and statistics, logs clients in, and routes
packets that have no local destination; ``serve_relay`` runs its listeners.

Lifetime: ``serve_relay(settings, task_status=...)`` binds every listener, reports a
``RunningRelay`` through ``task_status.started`` and serves until cancelled.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from ..keys import NodePublic, mesh_keys_equal
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from ..metrics import RelayCollector, RelayStats
from ..protocol.errors import RemoteProtocolError
from ..protocol.handshake import NEED_DATA, ClientAuthenticated, ServerHandshake
from ..protocol.messages import looks_like_disco
from ..settings import RelaySettings, split_host_port
from .client_connection import RECV_SIZE, ClientConnection
from .http_front import handle_connection, handle_metrics_connection, handle_redirect_connection
from .registry import Registry
from .tls import ServerCert, load_manual_cert, server_context

log = logging.getLogger("derpd.relay")

_RECV_HEADER = struct.Struct(">BI")

# An admission check: (client key, ClientInfo, remote ip) -> (admitted, reason).
AdmissionCheck = Callable[[NodePublic, object, str], Awaitable[tuple[bool, str]]]


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

    @property
    def derp_url(self) -> str:
        return self.url + "/derp"


class RelayServer:
    def __init__(self, settings: RelaySettings) -> None:
        self.settings = settings
        self.public_key = settings.private_key.public
        self.stats = RelayStats()
        self.registry = Registry(self.stats, self.public_key.raw)
        self.admission_checks: list[AdmissionCheck] = []
        self.ssl_context: ssl.SSLContext | None = None
        self.cert: ServerCert | None = None
        self.metrics_registry = CollectorRegistry(auto_describe=True)
        self.metrics_registry.register(RelayCollector(self.stats, self.registry))
        self.connections_per_ip: dict[str, int] = {}

    def load_tls(self) -> None:
        s = self.settings
        if s.tls and s.certmode == "manual" and s.certdir is not None:
            self.cert = load_manual_cert(s.certdir, s.hostname)
            self.ssl_context = server_context(self.cert, self.public_key)

    # ------------------------------------------------------------------ login

    async def serve_derp(
        self,
        stream: trio.abc.Stream,
        remote: tuple[str, int],
        initial: bytes,
        *,
        preamble: bytes = b"",
        not_ideal: bool = False,
    ) -> None:
        """Log a client in on ``stream`` and serve it until it leaves.

        ``initial`` holds bytes already read past the HTTP head (a fast-start ClientInfo);
        ``preamble`` is written right before ServerKey (the 101, in one write with it).
        """
        s = self.settings
        self.stats.accepts += 1
        hs = ServerHandshake(s.private_key)
        if initial:
            hs.receive_data(initial)
        try:
            with trio.fail_after(s.login_timeout):
                await stream.send_all(preamble + hs.server_key_frame())
                event = hs.next_event()
                while event is NEED_DATA:
                    hs.receive_data(await stream.receive_some(RECV_SIZE))
                    event = hs.next_event()
                assert isinstance(event, ClientAuthenticated)
                can_mesh = mesh_keys_equal(event.info.mesh_key, s.mesh_key)
                if not can_mesh:
                    ok, why = await self.admit(event.key, event.info, remote[0])
                    if not ok:
                        self.stats.admission_refused[why] += 1
                        log.info("refused %s from %s: %s", event.key, remote[0], why)
                        return
        except RemoteProtocolError as e:
            self.stats.handshake_failures[e.reason] += 1
            log.debug("login from %s failed: %s", remote[0], e)
            return
        except trio.TooSlowError:
            self.stats.handshake_failures["login_timeout"] += 1
            log.debug("login from %s timed out", remote[0])
            return
        conn = ClientConnection(
            self, stream, event.key, event.info, remote,
            can_mesh=can_mesh, is_prober=event.info.is_prober, not_ideal=not_ideal,
        )
        # Register before ServerInfo (packets may queue from now on), but start the writer only
        # after ServerInfo is out, so it is the first frame after ServerKey (P-3).
        self.registry.register(conn)
        if not_ideal:
            self.stats.current_notideal_connections += 1
        try:
            with trio.fail_after(s.login_timeout):
                await stream.send_all(hs.server_info_frame())
        except trio.TooSlowError:
            self.stats.handshake_failures["login_timeout"] += 1
            conn.closing = True
            conn._teardown()
            return
        except BaseException:
            conn._teardown()
            raise
        log.debug("client %s connected from %s", event.key.short(), remote[0])
        await conn.run(hs.decoder)
        log.debug("client %s gone (%s)", event.key.short(), conn.close_reason or "eof")

    async def admit(self, key: NodePublic, info: object, ip: str) -> tuple[bool, str]:
        for check in self.admission_checks:
            ok, why = await check(key, info, ip)
            if not ok:
                return False, why
        return True, ""

    # ------------------------------------------------------------------ routing

    def route_elsewhere(
        self, sender: ClientConnection, src: bytes, dst: bytes, packet: bytes, disco: bool, *, forwarded: bool
    ) -> None:
        """A packet for a key with no active local connection: forward it one hop to the mesh
        peer that holds the key, or drop it (spec 5.2)."""
        fwds = None if forwarded else self.registry.forwarders.get(dst)
        if fwds:
            if fwds[0].forward(src, dst, packet):
                self.stats.packets_forwarded_out += 1
                self.stats.bytes_forwarded_out += len(packet)
            return
        self.stats.drop("unknown_dest_on_fwd" if forwarded else "unknown_dest", disco, len(packet))
        if disco:
            sender.not_here(dst)

    def handle_forwarded(self, peer: ClientConnection, src: bytes, dst: bytes, packet: bytes) -> None:
        """A ForwardPacket from a mesh peer: deliver locally or drop; never re-forward (P-17)."""
        self.stats.packets_forwarded_in += 1
        self.stats.bytes_forwarded_in += len(packet)
        conn = self.registry.active.get(dst)
        disco = looks_like_disco(packet)
        if conn is not None:
            self.registry.sent_to.setdefault(src, set()).add(dst)
            conn.enqueue(_RECV_HEADER.pack(5, len(packet) + 32) + src + packet, disco)
        else:
            self.route_elsewhere(peer, src, dst, packet, disco, forwarded=True)

    def close_peer(self, target: NodePublic) -> None:
        conns = self.registry.connections(target.raw)
        if not conns:
            log.info("ClosePeer for %s: not connected here", target.short())
        for c in conns:
            log.info("closing %s on a mesh peer's request", target.short())
            c.close("close_peer")

    def metrics_text(self) -> bytes:
        """Prometheus text: this relay's metrics plus the process-wide default registry
        (process, Python, and in-process STUN)."""
        return generate_latest(self.metrics_registry) + generate_latest(REGISTRY)


# ---------------------------------------------------------------------- listeners

_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


def _tune_socket(sock: trio.socket.SocketType, settings: RelaySettings) -> None:
    """TCP keepalive and TCP_USER_TIMEOUT where the OS has them (P-32); trio already sets
    TCP_NODELAY on every SocketStream."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(settings.tcp_keepalive)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(settings.tcp_keepalive)))
        if hasattr(socket, "TCP_USER_TIMEOUT") and settings.tcp_user_timeout > 0:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(settings.tcp_user_timeout * 1000))
    except OSError:
        pass


async def _accept_loop(
    listener: trio.SocketListener,
    handler: Callable[[trio.SocketStream, tuple[str, int]], Awaitable[None]],
    settings: RelaySettings,
    nursery: trio.Nursery,
) -> None:
    while True:
        try:
            stream = await listener.accept()
        except OSError as e:
            if e.errno in _CAPACITY_ERRNOS:
                log.error("accept failed (%s): out of file descriptors or memory; raise the "
                          "open-files limit (ulimit -n / LimitNOFILE)", errno.errorcode.get(e.errno, e.errno))
                await trio.sleep(0.1)
                continue
            raise
        _tune_socket(stream.socket, settings)
        nursery.start_soon(_serve_stream, stream, handler)


async def _serve_stream(
    stream: trio.SocketStream, handler: Callable[[trio.SocketStream, tuple[str, int]], Awaitable[None]]
) -> None:
    try:
        peer = stream.socket.getpeername()
        await handler(stream, (str(peer[0]), int(peer[1])))
    except OSError:
        pass
    finally:
        await trio.aclose_forcefully(stream)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def serve_relay(settings: RelaySettings, *, task_status: trio.TaskStatus[RunningRelay] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the relay until cancelled.

    Reports a ``RunningRelay`` (URL, bound port, public key, certificate pin) once every
    listener is bound.

    Raises:
        CertError: the TLS certificate cannot be loaded.
        OSError: a listen address cannot be bound.
    """
    server = RelayServer(settings)
    server.load_tls()
    host, port = settings.listen
    listeners = await trio.open_tcp_listeners(port, host=host or None)
    bound_port = listeners[0].socket.getsockname()[1]
    addresses = [tuple(ls.socket.getsockname()[:2]) for ls in listeners]
    redirect_listeners: list[trio.SocketListener] = []
    http_port = None
    if server.ssl_context is not None and settings.http_port >= 0:
        redirect_listeners = await trio.open_tcp_listeners(settings.http_port, host=host or None)
        http_port = redirect_listeners[0].socket.getsockname()[1]
    if server.ssl_context is not None:
        url = f"https://{_url_host(settings.hostname)}:{bound_port}"
    else:
        url = f"http://{_url_host(host or '127.0.0.1')}:{bound_port}"
        if host in ("", "0.0.0.0", "::"):
            url = f"http://127.0.0.1:{bound_port}"
    tls = server.ssl_context

    async def relay_handler(stream: trio.SocketStream, remote: tuple[str, int]) -> None:
        await handle_connection(server, stream, remote, tls=tls)

    async def redirect_handler(stream: trio.SocketStream, remote: tuple[str, int]) -> None:
        await handle_redirect_connection(server, stream, remote)

    async with trio.open_nursery() as nursery:
        for ls in listeners:
            nursery.start_soon(_accept_loop, ls, relay_handler, settings, nursery)
        for ls in redirect_listeners:
            nursery.start_soon(_accept_loop, ls, redirect_handler, settings, nursery)
        task_status.started(
            RunningRelay(
                server=server, url=url, host=host, port=bound_port, public_key=server.public_key,
                cert_pin=server.cert.pin if server.cert else None, http_port=http_port,
                addresses=addresses,  # type: ignore[arg-type]
            )
        )


async def serve_metrics(
    addr: str, render: Callable[[], bytes], *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
) -> None:
    """A dedicated Prometheus listener on ``HOST:PORT`` (``--metrics-addr``)."""
    host, port = split_host_port(addr, default_port=9090)
    listeners = await trio.open_tcp_listeners(port, host=host or None)
    bound = listeners[0].socket.getsockname()[:2]
    settings = RelaySettings(addr="127.0.0.1:0")

    async def handler(stream: trio.SocketStream, remote: tuple[str, int]) -> None:
        await handle_metrics_connection(render, stream, 30.0)

    async with trio.open_nursery() as nursery:
        for ls in listeners:
            nursery.start_soon(_accept_loop, ls, handler, settings, nursery)
        task_status.started((str(bound[0]), int(bound[1])))
