"""A Trio DERP client: connect by URL, log in, send packets, receive typed events.

::

    async with derpd.client.connect("https://derp.example.com/derp", key) as client:
        await client.send(peer_public_key, b"hello")
        event = await client.recv()      # RecvPacket, PeerGone, KeepAlive, Pong, ...
        rtt = await client.ping()

URLs: ``http://``, ``https://`` (binary DERP upgrade), ``ws://``, ``wss://`` (DERP over
WebSocket).  TLS options are the ones a DERP map can express: ``server_name`` (SNI and the
name checked), ``cert_pin`` (``sha256-raw:<hex>`` of the leaf certificate, for self-signed
certificates), ``insecure`` (no verification, tests only), or a custom ``ssl_context``.

The client answers server Pings itself, and matches Pongs to ``ping()`` calls; every other
frame is delivered by ``recv()`` in order.  The tests, ``derpd check``, the coordinator's
prober and the mesh all use it.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import trio

from .keys import NodePrivate, NodePublic
from .protocol.errors import RemoteProtocolError
from .protocol.frames import FrameType, encode_frame
from .protocol.handshake import NEED_DATA, ClientHandshake, LoginComplete, ServerKeyReceived
from .protocol.messages import (
    WATCH_CONNS_FRAME,
    ClientInfo,
    Ping,
    Pong,
    ServerInfo,
    ServerFrame,
    encode_forward_packet,
    encode_send_packet,
    parse_server_frame,
)
from .transport.tls_stream import DrainingSSLStream
from .transport.websocket_stream import WebSocketStream

RECV_SIZE = 256 * 1024


class DerpClientError(Exception):
    """Connecting or logging in failed; the message says where."""


class LoginRefused(DerpClientError, RemoteProtocolError):
    """The relay read our ClientInfo and closed the connection without a ServerInfo: its
    admission (``--verify-client-url``, ``--allow-keys``) or a wrong mesh key refused us.
    It is also a ``RemoteProtocolError`` (reason ``eof``), as a login cut short always was."""

    def __init__(self, message: str) -> None:
        RemoteProtocolError.__init__(self, message, "eof")


@dataclass(frozen=True, slots=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: str

    @property
    def tls(self) -> bool:
        return self.scheme in ("https", "wss")

    @property
    def websocket(self) -> bool:
        return self.scheme in ("ws", "wss")

    @property
    def host_header(self) -> str:
        default = 443 if self.tls else 80
        h = f"[{self.host}]" if ":" in self.host else self.host
        return h if self.port == default else f"{h}:{self.port}"


def _parse_url(url: str) -> _Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
        raise DerpClientError(f"unsupported DERP URL {url!r}: use http://, https://, ws:// or wss://HOST[:PORT]/derp")
    port = parts.port or (443 if parts.scheme in ("https", "wss") else 80)
    return _Target(parts.scheme, parts.hostname, port, parts.path or "/derp")


def make_ssl_context(
    *, cert_pin: str | None = None, insecure: bool = False, ca_file: str | None = None
) -> ssl.SSLContext:
    """An SSLContext for DERP: system roots (or ``ca_file``); with a pin or ``insecure``, no
    chain verification (the pin is checked after the handshake)."""
    ctx = ssl.create_default_context(cafile=ca_file)
    if cert_pin or insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _check_pin(stream: DrainingSSLStream, pin: str) -> None:
    der = stream.getpeercert(binary_form=True)
    if der is None:
        raise DerpClientError("the server presented no certificate")
    got = "sha256-raw:" + hashlib.sha256(der).hexdigest()
    if got != pin:
        raise DerpClientError(f"certificate pin mismatch: server has {got}, expected {pin}")


class DerpClient:
    """A logged-in DERP connection.  Create it with ``connect()``."""

    def __init__(
        self, stream: trio.abc.Stream, hs: ClientHandshake, login: LoginComplete, private_key: NodePrivate,
        can_ack_pings: bool,
    ) -> None:
        self._stream = stream
        self._decoder = hs.decoder
        self.private_key = private_key
        self.public_key = private_key.public
        self.server_key: NodePublic = login.server_key
        self.server_info: ServerInfo = login.info
        self._can_ack_pings = can_ack_pings
        self._send_lock = trio.StrictFIFOLock()
        self._events_send, self._events = trio.open_memory_channel[ServerFrame | BaseException](256)
        self._pings: dict[bytes, trio.Event] = {}
        self.closed = False

    # ------------------------------------------------------------------ sending

    async def _write(self, data: bytes) -> None:
        async with self._send_lock:
            await self._stream.send_all(data)

    async def send(self, dst: NodePublic, data: bytes) -> None:
        """Send one packet (at most 64 KiB) to ``dst``."""
        await self._write(encode_send_packet(dst, data))

    async def send_many(self, packets: list[tuple[NodePublic, bytes]]) -> None:
        """Send several packets in one write."""
        await self._write(b"".join(encode_send_packet(d, p) for d, p in packets))

    async def note_preferred(self, preferred: bool = True) -> None:
        await self._write(encode_frame(FrameType.NOTE_PREFERRED, b"\x01" if preferred else b"\x00"))

    async def watch_conns(self) -> None:
        """Mesh peers only: ask for PeerPresent/PeerGone about every local client."""
        await self._write(WATCH_CONNS_FRAME)

    async def close_peer(self, target: NodePublic) -> None:
        """Mesh peers only: ask the server to close every connection of ``target``."""
        await self._write(encode_frame(FrameType.CLOSE_PEER, target.raw))

    async def forward_packet(self, src: NodePublic | bytes, dst: NodePublic | bytes, data: bytes) -> None:
        """Mesh peers only: deliver ``data`` from ``src`` to a client of this server."""
        await self._write(encode_forward_packet(src, dst, data))

    async def send_raw(self, data: bytes) -> None:
        """Write raw bytes (tests of bad input)."""
        await self._write(data)

    async def ping(self, timeout: float = 5.0) -> float:
        """Round trip of a Ping/Pong, in seconds.

        Raises:
            trio.TooSlowError: no Pong within ``timeout``.
        """
        data = os.urandom(8)
        done = trio.Event()
        self._pings[data] = done
        start = trio.current_time()
        try:
            await self._write(encode_frame(FrameType.PING, data))
            with trio.fail_after(timeout):
                await done.wait()
        finally:
            self._pings.pop(data, None)
        return trio.current_time() - start

    # ------------------------------------------------------------------ receiving

    async def recv(self) -> ServerFrame:
        """The next event from the server.

        Raises:
            trio.EndOfChannel: the connection closed.
            RemoteProtocolError: the server broke the protocol.
        """
        item = await self._events.receive()
        if isinstance(item, BaseException):
            self._events_send.close()
            raise item
        return item

    def __aiter__(self) -> DerpClient:
        return self

    async def __anext__(self) -> ServerFrame:
        try:
            return await self.recv()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def _reader(self) -> None:
        decoder = self._decoder
        try:
            frames = decoder.frames()
            while True:
                for ftype, payload in frames:
                    event = parse_server_frame(ftype, payload)
                    match event:
                        case None:
                            continue
                        case Pong(data):
                            waiter = self._pings.get(data)
                            if waiter is not None:
                                waiter.set()
                                continue
                        case Ping(data) if self._can_ack_pings:
                            await self._write(encode_frame(FrameType.PONG, data))
                            continue
                    await self._events_send.send(event)
                data = await self._stream.receive_some(RECV_SIZE)
                decoder.receive_data(data)
                frames = decoder.frames()
                if not data and not frames:
                    break
        except (RemoteProtocolError, trio.BrokenResourceError) as e:
            await self._events_send.send(e)
        except trio.ClosedResourceError:
            pass
        finally:
            self.closed = True
            self._events_send.close()

    async def aclose(self) -> None:
        self.closed = True
        await trio.aclose_forcefully(self._stream)


async def _http_upgrade(
    stream: trio.abc.Stream, target: _Target, headers: list[tuple[str, str]]
) -> bytes:
    """Send the upgrade request, require a 101, return bytes read past the response head."""
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET", target=target.path,
        headers=[("Host", target.host_header), ("User-Agent", "derpd-client"), *headers],
    )
    await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(RECV_SIZE)
            if not data:
                raise DerpClientError("the server closed the connection during the HTTP upgrade")
            conn.receive_data(data)
            continue
        if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
            return conn.trailing_data[0]
        if isinstance(event, (h11.Response, h11.InformationalResponse)):
            raise DerpClientError(f"the server answered HTTP {event.status_code} instead of 101 Switching Protocols")


@asynccontextmanager
async def connect(
    url: str,
    private_key: NodePrivate | None = None,
    *,
    mesh_key: bytes | None = None,
    is_prober: bool = False,
    can_ack_pings: bool = True,
    ssl_context: ssl.SSLContext | None = None,
    server_name: str | None = None,
    cert_pin: str | None = None,
    insecure: bool = False,
    server_key: NodePublic | None = None,
    ideal_node: str | None = None,
    connect_host: str | None = None,
    timeout: float = 10.0,
) -> AsyncIterator[DerpClient]:
    """Connect, upgrade and log in; yields a ``DerpClient`` and closes it on exit.

    Args:
        server_key: when known in advance (from a DERP map or an earlier login), log in with
            fast start: ClientInfo goes out right behind the HTTP request (spec 9.3).
        connect_host: dial this address instead of the URL's host (SNI stays the URL host).

    Raises:
        DerpClientError: the URL is bad, the upgrade was refused, or a certificate pin failed.
        OSError / trio.BrokenResourceError: the connection failed.
        RemoteProtocolError: the server broke the login protocol.
        trio.TooSlowError: the whole login took longer than ``timeout``.
    """
    target = _parse_url(url)
    key = private_key or NodePrivate.generate()
    info = ClientInfo(mesh_key=mesh_key, can_ack_pings=can_ack_pings, is_prober=is_prober)
    with trio.fail_after(timeout):
        stream: trio.abc.Stream = await trio.open_tcp_stream(connect_host or target.host, target.port)
        try:
            if target.tls:
                ctx = ssl_context or make_ssl_context(cert_pin=cert_pin, insecure=insecure)
                sni = server_name or target.host
                tls_stream = DrainingSSLStream(stream, ctx, server_hostname=sni)
                await tls_stream.do_handshake()
                if cert_pin:
                    _check_pin(tls_stream, cert_pin)
                stream = tls_stream
            hs = ClientHandshake(key, info, server_key=server_key)
            if target.websocket:
                ws_key = os.urandom(16).hex()[:22] + "=="
                initial = await _http_upgrade(stream, target, [
                    ("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13"),
                    ("Sec-WebSocket-Key", ws_key), ("Sec-WebSocket-Protocol", "derp"),
                ])
                stream = WebSocketStream(stream, client=True, initial=initial)
                initial = b""
                if server_key is not None:
                    await stream.send_all(hs.client_info_frame())
            else:
                headers = [("Connection", "Upgrade"), ("Upgrade", "DERP")]
                if ideal_node:
                    headers.append(("Ideal-Node", ideal_node))
                if server_key is not None:
                    headers.append(("Derp-Fast-Start", "1"))
                    conn = h11.Connection(h11.CLIENT)
                    req = h11.Request(method="GET", target=target.path,
                                      headers=[("Host", target.host_header), ("User-Agent", "derpd-client"), *headers])
                    await stream.send_all(conn.send(req) + conn.send(h11.EndOfMessage()) + hs.client_info_frame())
                    initial = b""
                else:
                    initial = await _http_upgrade(stream, target, headers)
            if initial:
                hs.receive_data(initial)
            try:
                while True:
                    event = hs.next_event()
                    if event is NEED_DATA:
                        hs.receive_data(await stream.receive_some(RECV_SIZE))
                    elif isinstance(event, ServerKeyReceived):
                        await stream.send_all(hs.client_info_frame(event.key))
                    else:
                        assert isinstance(event, LoginComplete)
                        break
            except (RemoteProtocolError, trio.BrokenResourceError) as exc:
                closed = not isinstance(exc, RemoteProtocolError) or exc.reason == "eof"
                if closed and hs.server_key is not None:
                    raise LoginRefused("connection closed during login, after our ClientInfo and before "
                                       "ServerInfo: the relay refused the login (admission or mesh key)") from None
                raise
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    client = DerpClient(stream, hs, event, key, can_ack_pings)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._reader)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The reader task never raises, so a group holds the caller's own exception: give it
        # back unwrapped, as if there were no nursery here.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        await client.aclose()


__all__ = ["DerpClient", "DerpClientError", "LoginRefused", "connect", "make_ssl_context"]
