"""The coordinator's listeners: HTTPS with the relay's certificate code, PROXY headers, and
hypercorn's HTTP/1.1 on every connection.

Each accepted connection goes through, in order:

1. with ``proxy_protocol``, the PROXY v1/v2 header (the relay's reader,
   :func:`derpd.relay.client_address.read_proxy_header`): from a ``trusted_proxies`` address
   it names the client; from anyone else it closes the connection, counted in
   ``derpd_coordinator_proxy_refusals_total{reason}``;
2. with a certificate (``certmode``), TLS with the context in use at that moment, so a reload
   (SIGHUP, changed files, a new ACME certificate: :class:`derpd.relay.tls.CertificateFiles`)
   reaches new connections at once and leaves open ones alone;
3. hypercorn's connection handler (its Trio worker's ``TCPServer``), which sees the client
   named by the PROXY header as the peer, so the ASGI scope's ``client`` is the real one.

Beside TLS a plain ``http_port`` answers ACME HTTP-01 validations and redirects everything
else to HTTPS.  ``X-Forwarded-For`` is read by the app (:mod:`.app`) from trusted proxies only.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

from ..protocol.errors import RemoteProtocolError
from ..relay.client_address import read_proxy_header
from ..relay.tls import CertificateFiles
from ..settings import SettingsError

if TYPE_CHECKING:
    from ..acme import AcmeConfig, AcmeManager
    from .metrics import CoordinatorMetrics

log = logging.getLogger("derpd.coordinator")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: how often certificate files are checked for a change (manual mode)
CERT_WATCH_INTERVAL = 30.0

CERTMODES = ("manual", "letsencrypt", "gcp")


@dataclass(frozen=True)
class FrontOptions:
    """How the coordinator listens.  Without ``certmode``: plain HTTP."""

    certmode: str | None = None  # "manual", or "letsencrypt"/"gcp" with ``acme``
    certdir: Path | None = None
    hostname: str = ""
    http_port: int = -1  # beside TLS: ACME HTTP-01 and redirects to https; -1: none
    acme: AcmeConfig | None = None
    proxy_protocol: bool = False
    trusted_proxies: tuple[IPNetwork, ...] = ()
    header_timeout: float = 10.0  # for the PROXY header and the TLS handshake

    def __post_init__(self) -> None:
        if self.certmode is not None:
            if self.certmode not in CERTMODES:
                raise SettingsError(f"--certmode {self.certmode!r}: use manual, letsencrypt or gcp")
            if self.certdir is None or not self.hostname:
                raise SettingsError(f"--certmode {self.certmode} needs --certdir and --hostname (the name "
                                    "relays and headscale reach the coordinator at)")
            if self.certmode != "manual" and self.acme is None:
                raise SettingsError(f"--certmode {self.certmode} needs its ACME settings")
        if self.proxy_protocol and not self.trusted_proxies:
            raise SettingsError("--proxy-protocol needs --trusted-proxies CIDR,... (the addresses of the proxies "
                                "that send PROXY headers)")

    @property
    def tls(self) -> bool:
        return self.certmode is not None


class _SocketView:
    """What hypercorn asks a socket (family, peer, own address), with the peer a PROXY header named."""

    def __init__(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        self.family = sock.family
        self._peer = peer
        self._own = sock.getsockname()

    def getpeername(self) -> tuple[str, int]:
        return self._peer

    def getsockname(self) -> Any:
        return self._own


class _Conn(trio.abc.Stream):
    """A connection as hypercorn's ``TCPServer`` takes it: a plain stream with ``socket``."""

    def __init__(self, stream: trio.abc.Stream, view: _SocketView) -> None:
        self.inner = stream
        self.socket = view

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        send_eof = self.inner.send_eof  # type: ignore[attr-defined]  # AttributeError: hypercorn's "cannot"
        await send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


class _TLSConn(_Conn):
    """The same over TLS: hypercorn runs the handshake and reads ALPN and the transport's socket."""

    inner: trio.SSLStream[trio.abc.Stream]

    def __init__(self, stream: trio.SSLStream[trio.abc.Stream], view: _SocketView) -> None:
        super().__init__(stream, view)
        self.transport_stream = self  # hypercorn reads transport_stream.socket

    async def do_handshake(self) -> None:
        await self.inner.do_handshake()

    def selected_alpn_protocol(self) -> str | None:
        return self.inner.selected_alpn_protocol()

    async def send_eof(self) -> None:
        raise AttributeError("send_eof")  # TLS has no half-close; hypercorn then just closes


class Front:
    """The listeners' shared parts: certificates, the ACME client, hypercorn's settings."""

    def __init__(self, options: FrontOptions, metrics: CoordinatorMetrics) -> None:
        self.options = options
        self.metrics = metrics
        self.files: CertificateFiles | None = None
        self.acme: AcmeManager | None = None
        if options.tls:
            assert options.certdir is not None
            self.files = CertificateFiles(options.certdir, options.hostname, acme=options.certmode != "manual")

    def load(self) -> None:
        """Loads the certificate (before anything listens).

        Raises:
            CertError: ``manual`` files missing or unusable.
        """
        if self.files is not None:
            self.files.load()

    def reload_tls(self) -> bool:
        """SIGHUP or changed files: the certificate again; True if a new one is in use."""
        if self.files is None or (self.files.cert is None and not self.files.acme):
            return False
        ok = self.files.reload()
        self.metrics.tls_reloads.labels("ok" if ok else "error").inc()
        return ok

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watches the certificate files (manual) or runs the ACME client (letsencrypt, gcp)."""
        files = self.files
        if files is None:
            task_status.started()
            return
        if files.acme:
            from ..acme import AcmeManager

            assert self.options.acme is not None
            self.acme = AcmeManager(self.options.acme, self.reload_tls,
                                    lambda: files.cert.cert_path if files.cert is not None else None)
            await self.acme.run(task_status=task_status)
            return
        task_status.started()
        while True:
            await trio.sleep(CERT_WATCH_INTERVAL)
            if files.changed():
                self.reload_tls()

    async def serve(self, app: Any, hc: HypercornConfig, sockets: list[socket.socket], *, tls: bool) -> None:
        """Serves ``app`` on ``sockets`` (listening) until cancelled."""
        wrapped = wrap_app(app, hc.wsgi_max_body_size, "asgi")
        context = WorkerContext(None)
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]
        handler = partial(self._connection, wrapped, hc, context, tls)
        await trio.serve_listeners(handler, listeners)

    async def _connection(self, app: Any, hc: HypercornConfig, context: WorkerContext, tls: bool,
                          stream: trio.SocketStream) -> None:
        opts = self.options
        try:
            sock = stream.socket
            peer = sock.getpeername()[:2]
        except OSError:  # gone already
            await stream.aclose()
            return
        conn: trio.abc.Stream = stream
        if opts.proxy_protocol:
            try:
                with trio.fail_after(opts.header_timeout):
                    conn, peer, _ = await read_proxy_header(stream, peer, opts.trusted_proxies)
            except RemoteProtocolError as e:
                self.metrics.proxy_refusals.labels(e.reason).inc()
                log.debug("closing a connection from %s: %s", peer[0], e)
                await stream.aclose()
                return
            except trio.TooSlowError:
                self.metrics.proxy_refusals.labels("timeout").inc()
                log.debug("no PROXY header from %s within %g s, closing", peer[0], opts.header_timeout)
                await stream.aclose()
                return
        view = _SocketView(stream.socket, peer)  # type: ignore[arg-type]
        if tls:
            ctx = self.files.context if self.files is not None else None
            if ctx is None:  # ACME has no certificate yet
                await stream.aclose()
                return
            await TCPServer(app, hc, context, ConnectionState({}),
                            _TLSConn(trio.SSLStream(conn, ctx, server_side=True, https_compatible=True), view))
        else:
            await TCPServer(app, hc, context, ConnectionState({}), _Conn(conn, view))  # type: ignore[arg-type]


Scope = MutableMapping[str, Any]


class RedirectApp:
    """The plain-HTTP port beside TLS: ACME HTTP-01 answers, and a redirect to HTTPS for
    everything else (to the configured hostname, never to the request's Host header)."""

    def __init__(self, front: Front, https_port: Callable[[], int]) -> None:
        self.front = front
        self.https_port = https_port

    async def __call__(self, scope: Scope, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        prefix = "/.well-known/acme-challenge/"
        if path.startswith(prefix):
            acme = self.front.acme
            answer = acme.http01_response(path[len(prefix):]) if acme is not None else None
            status, body, headers = (200, answer, []) if answer is not None else (404, b"no such challenge\n", [])
        else:
            port = self.https_port()
            host = self.front.options.hostname
            host = f"[{host}]" if ":" in host else host
            query = scope.get("query_string", b"")
            location = f"https://{host}{'' if port == 443 else f':{port}'}{path}"
            location += f"?{query.decode('latin-1')}" if query else ""
            status, body, headers = 308, b"use https\n", [(b"location", location.encode("latin-1", "replace"))]
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
            *headers]})
        await send({"type": "http.response.body", "body": body})

