"""HTTP for the coordinator and its relays: httpx on Trio, with our TLS rules and limits.

Two uses, one client class:

* the prober's ``GET https://node/derp/probe`` with per-node TLS rules (system roots plus
  a private CA, a ``sha256-raw:`` pin, or no verification), dialling an allowed address
  while sending the node's name as SNI and Host; a probe opens a fresh connection
  (``keepalive=False``) so what it times and checks is the certificate served now;
* the relay's ``POST coordinator/v1/nodes`` heartbeats, over pooled keep-alive
  connections (one :class:`HTTPClient` per announcer).

Every client has explicit timeouts, follows no redirects (a 3xx is an answer like any
other, so nothing can send a request on to another host), ignores proxy variables, and
caps the answer at ``max_response_bytes``.  TLS contexts are made once per client, never
per request.
"""

from __future__ import annotations

import functools
import hashlib
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx

MAX_RESPONSE_BYTES = 1 << 20


class HTTPError(Exception):
    """The request failed: connection, TLS, pin mismatch or a malformed response."""


class PinMismatch(HTTPError):
    """The server's certificate does not have the expected ``sha256-raw:`` pin."""


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
    if insecure:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no CA bundle to load: nothing is verified
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    ctx = ssl.create_default_context()
    if cafile:
        ctx.load_verify_locations(cafile=cafile)
    return ctx


@functools.cache
def shared_ssl_context(insecure: bool = False) -> ssl.SSLContext:
    """Returns one process-wide context (system roots, or no verification), made on first use."""
    return client_ssl_context(insecure=insecure)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class HTTPClient:
    """An httpx ``AsyncClient`` with one TLS context, explicit timeouts and an answer cap.

    Use it from a Trio task (httpx picks its Trio backend); close it with :meth:`aclose`.
    """

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None, timeout: float = 10.0,
                 keepalive: bool = True, max_response_bytes: int = MAX_RESPONSE_BYTES) -> None:
        self.max_response_bytes = max_response_bytes
        self._client = httpx.AsyncClient(
            verify=ssl_context or shared_ssl_context(),
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            trust_env=False,
            limits=httpx.Limits(max_connections=64,
                                max_keepalive_connections=8 if keepalive else 0,
                                keepalive_expiry=30.0),
            headers={"User-Agent": "derpd-coordinator"},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def request(
        self,
        url: str,
        method: str = "GET",
        *,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        connect_host: str | None = None,
        server_name: str | None = None,
        cert_pin: str | None = None,
    ) -> Response:
        """Sends one request and returns the answer; the caller may add a deadline.

        ``connect_host`` dials that address instead of the URL's host (Host header and SNI
        stay the URL's host, or ``server_name`` for SNI).  With ``cert_pin`` the leaf
        certificate's SHA-256 must equal the pin (give this client a context that does not
        verify the chain).

        Raises:
            HTTPError: anything went wrong below HTTP status level (PinMismatch for a pin).
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HTTPError(f"unsupported URL {url!r}: use http://host[:port]/path or https://...")
        host = parts.hostname
        hdrs = dict(headers or {})
        extensions: dict[str, object] = {}
        if connect_host and connect_host != host:
            hdrs.setdefault("Host", parts.netloc.rsplit("@", 1)[-1])
            netloc = _url_host(connect_host) + (f":{parts.port}" if parts.port else "")
            url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
        if parts.scheme == "https":
            extensions["sni_hostname"] = server_name or host
        where = f"{connect_host or host}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
        try:
            req = self._client.build_request(method, url, content=body or None, headers=hdrs,
                                             extensions=extensions)
            resp = await self._client.send(req, stream=True)
            try:
                if cert_pin:
                    _check_pin(resp, cert_pin, where)
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.aiter_raw():
                    size += len(chunk)
                    if size > self.max_response_bytes:
                        raise HTTPError(f"answer from {where} is larger than {self.max_response_bytes} bytes")
                    chunks.append(chunk)
            finally:
                await resp.aclose()
        except httpx.ConnectError as exc:
            raise HTTPError(f"cannot connect to {where}: {_cause(exc)}") from None
        except httpx.TimeoutException:
            raise HTTPError(f"no answer from {where} in time") from None
        except httpx.HTTPError as exc:
            raise HTTPError(f"request to {where} failed: {_cause(exc)}") from None
        return Response(resp.status_code, {k.lower(): v for k, v in resp.headers.items()}, b"".join(chunks))


def _check_pin(resp: httpx.Response, pin: str, where: str) -> None:
    stream = resp.extensions.get("network_stream")
    ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if der is None:
        raise PinMismatch(f"{where} presented no certificate to check against the pin")
    if pin_of(der) != pin:
        raise PinMismatch(f"certificate of {where} does not match the pin {pin[:24]}...")


def _cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        nxt = exc.__cause__ or exc.__context__
        assert nxt is not None
        exc = nxt
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


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
    """One request on a client of its own (tests, one-off calls); see :meth:`HTTPClient.request`."""
    ctx = ssl_context or shared_ssl_context(insecure=bool(cert_pin))
    client = HTTPClient(ssl_context=ctx, keepalive=False)
    try:
        return await client.request(url, method, body=body, headers=headers, connect_host=connect_host,
                                    server_name=server_name, cert_pin=cert_pin)
    finally:
        await client.aclose()
