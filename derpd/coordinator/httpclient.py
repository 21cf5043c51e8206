"""A minimal one-request HTTP/1.1 client (h11 over trio) for probes and heartbeats.

We need two things only: ``GET https://node/derp/probe`` with per-node TLS rules
(system roots, a private CA, a ``sha256-raw:`` pin, or no verification) and
``POST coordinator/v1/nodes``.  One connection per request, ``Connection: close``,
bodies capped, everything under the caller's deadline.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import trio

MAX_RESPONSE_BYTES = 1 << 20


class HTTPError(Exception):
    """The request failed: connection, TLS, pin mismatch or a malformed response."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def pin_of(der: bytes) -> str:
    """Returns the ``sha256-raw:<hex>`` pin of a DER certificate (lower-case hex, P-23)."""
    return "sha256-raw:" + hashlib.sha256(der).hexdigest()


def client_ssl_context(*, cafile: str | None = None, insecure: bool = False) -> ssl.SSLContext:
    """Returns a client context: default roots plus ``cafile``, or no verification."""
    ctx = ssl.create_default_context()
    if cafile:
        ctx.load_verify_locations(cafile=cafile)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def request(
    url: str,
    method: str = "GET",
    *,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    connect_host: str | None = None,
    server_name: str | None = None,
    cert_pin: str | None = None,
) -> Response:
    """Sends one request and returns the response; the caller sets the deadline.

    ``connect_host`` dials that address instead of the URL's host (the Host header and
    SNI stay the URL's host, or ``server_name``).  With ``cert_pin`` the leaf
    certificate's SHA-256 must equal the pin and chain verification is skipped.

    Raises:
        HTTPError: anything went wrong below HTTP status level.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HTTPError(f"unsupported URL {url!r}: use http://host[:port]/path or https://...")
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.netloc.rsplit("@", 1)[-1]
    try:
        stream: trio.abc.Stream = await trio.open_tcp_stream(connect_host or host, port)
    except OSError as exc:
        raise HTTPError(f"cannot connect to {connect_host or host}:{port}: {exc.strerror or exc}") from None
    try:
        if parts.scheme == "https":
            if cert_pin:
                ctx = client_ssl_context(insecure=True)
            else:
                ctx = ssl_context or client_ssl_context()
            sni = server_name or host
            tls = trio.SSLStream(stream, ctx, server_hostname=sni, https_compatible=True)
            try:
                await tls.do_handshake()
            except (ssl.SSLError, trio.BrokenResourceError) as exc:
                cause = exc.__cause__ or exc
                raise HTTPError(f"TLS handshake with {host}:{port} failed: {cause}") from None
            if cert_pin:
                der = tls.getpeercert(binary_form=True)
                if der is None or pin_of(der) != cert_pin:
                    raise HTTPError(f"certificate of {host}:{port} does not match the pin {cert_pin[:24]}...")
            stream = tls
        return await _exchange(stream, method, target, host_header, body, headers or {})
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise HTTPError(f"connection to {host}:{port} broke: {exc}") from None
    finally:
        await trio.aclose_forcefully(stream)


async def _exchange(stream: trio.abc.Stream, method: str, target: str, host: str, body: bytes,
                    headers: dict[str, str]) -> Response:
    conn = h11.Connection(h11.CLIENT)
    hdrs = [("Host", host), ("Connection", "close"), ("User-Agent", "derpd-coordinator")]
    hdrs += list(headers.items())
    if body or method in ("POST", "PUT"):
        hdrs.append(("Content-Length", str(len(body))))
    out = conn.send(h11.Request(method=method, target=target, headers=hdrs))
    if body:
        out += conn.send(h11.Data(data=body))
    out += conn.send(h11.EndOfMessage())
    await stream.send_all(out)
    status = 0
    resp_headers: dict[str, str] = {}
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                resp_headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
                if method == "HEAD":
                    break
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_RESPONSE_BYTES:
                    raise HTTPError(f"response body larger than {MAX_RESPONSE_BYTES} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
    except h11.RemoteProtocolError as exc:
        raise HTTPError(f"malformed HTTP response: {exc}") from None
    if not status:
        raise HTTPError("the server closed the connection without a response")
    return Response(status, resp_headers, b"".join(chunks))
