"""Routing of HTTP requests on the relay port, and the exact bytes of the upgrade answers.

Every accepted connection starts as HTTP/1.1 parsed with h11.  ``route_request`` turns the
parsed request into one of:

* ``DerpUpgrade``: binary DERP.  Answer with ``derp_switching_protocols()`` unless
  ``fast_start`` (P-1: then no HTTP answer at all), then speak DERP on the raw stream,
  starting with the bytes h11 read past the request head.
* ``WebSocketUpgrade``: DERP inside WebSocket binary messages (spec 9.5).
* ``Metrics``: Prometheus text, loopback peers only (the I/O layer checks the peer).
* ``Debug``: derper's ``/debug/`` tree (index, ``varz``); the I/O layer checks the peer.
* ``BootstrapDNS``: derper's ``/bootstrap-dns`` (the I/O layer has the resolved names).
* ``Response``: a complete plain answer (probe, generate_204, robots.txt, home, 426, 405).

Decision order follows derper (spec 9.2): ``Upgrade: websocket`` plus a ``derp`` subprotocol
is WebSocket; ``Upgrade: derp`` or a bare ``Upgrade: websocket`` is binary DERP (P-4).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import h11
from wsproto.utilities import generate_accept_token

from ..keys import NodePublic
from .frames import PROTOCOL_VERSION

BROWSER_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"Strict-Transport-Security", b"max-age=63072000; includeSubDomains"),
    (
        b"Content-Security-Policy",
        b"default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'self'; "
        b"block-all-mixed-content; object-src 'none'",
    ),
    (b"X-Frame-Options", b"DENY"),
    (b"X-Content-Type-Options", b"nosniff"),
)
NO_CACHE = b"no-cache, no-store, must-revalidate, no-transform, max-age=0"
_CHALLENGE_RE = re.compile(rb"[A-Za-z0-9._:-]{1,64}")

HOME_PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>DERP</title></head>
<body>
<h1>DERP</h1>
<p>This is a <a href="https://tailscale.com/kb/1232/derp-servers">Tailscale DERP</a> relay, served by derpd.</p>
<p>It relays end-to-end encrypted WireGuard packets for Tailscale clients; it cannot read them.</p>
</body></html>
"""



_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(when: float) -> bytes:
    """``when`` (a Unix time) as an HTTP ``Date`` (RFC 9110 IMF-fixdate), as Go's net/http
    sends it: ``Mon, 07 Dec 2026 18:06:00 GMT``.  No locale and no ``email.utils`` (which
    imports ``socket``)."""
    t = time.gmtime(when)
    return (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT").encode()

@dataclass(frozen=True, slots=True)
class DerpUpgrade:
    fast_start: bool = False
    not_ideal: bool = False


@dataclass(frozen=True, slots=True)
class WebSocketUpgrade:
    accept_token: bytes
    subprotocol_ok: bool


@dataclass(frozen=True, slots=True)
class Metrics:
    pass


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    head_only: bool = field(default=False)

    def to_h11(self) -> tuple[h11.Response, h11.Data | None, h11.EndOfMessage]:
        """The response as h11 events, with its reason phrase ("200 OK"), a Date (as Go's
        net/http sends, so clients and ``derpd doctor`` can see a skewed clock) and a
        Content-Length, except on 204 and 304, which must not carry one (RFC 9110 §8.6)."""
        headers = [*self.headers, (b"Date", http_date(time.time()))]
        if self.status not in (204, 304):
            headers.append((b"Content-Length", str(len(self.body)).encode()))
        body = None if self.head_only or not self.body else h11.Data(data=self.body)
        return (h11.Response(status_code=self.status, headers=headers, reason=_reason(self.status)), body,
                h11.EndOfMessage())


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


@dataclass(frozen=True, slots=True)
class Debug:
    path: bytes  # "/debug/..." without the query
    head_only: bool = False
    forwarded: bool = False  # X-Forwarded-For present: relayed by a proxy, never trusted (as derper)
    target: bytes = b""  # the request target, for query parameters


@dataclass(frozen=True, slots=True)
class BootstrapDNS:
    query: str  # the ``q`` parameter ("" when absent)
    head_only: bool = False


Route = DerpUpgrade | WebSocketUpgrade | Metrics | Debug | BootstrapDNS | Response


def query_param(target: bytes, name: str) -> str:
    """The first value of ``name`` in the request target's query (Go's ``URL.Query().Get``), or ""."""
    from urllib.parse import parse_qs

    query = target.split(b"?", 1)[1] if b"?" in target else b""
    values = parse_qs(query.decode("latin-1"), keep_blank_values=True).get(name)
    return values[0] if values else ""

# The request head (request line and headers) the relay reads; docs/security.md.
MAX_HEAD = 16 * 1024


# What the strict reader below accepts of a header line (RFC 9110 token; field value: visible
# characters, obs-text, and spaces or tabs inside): deleting them must leave nothing.
_TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_VALUE_CHARS = bytes([9, *range(0x20, 0x7F), *range(0x80, 0x100)])
_LEAVE_TO_H11 = frozenset({b"content-length", b"transfer-encoding", b"expect"})
_DERP_REQUEST_LINE = b"GET /derp HTTP/1.1"


@dataclass(frozen=True, slots=True)
class PlainDerpRequest:
    """The one request a DERP client sends on plain TCP, read without h11 (see below)."""

    upgrade: DerpUpgrade
    trailing: bytes  # what followed the head (a fast-start ClientInfo)


def read_plain_derp_request(data: bytes) -> PlainDerpRequest | None:
    """``GET /derp HTTP/1.1`` with ``Upgrade: DERP``, complete in ``data``, read by a strict
    subset of HTTP/1.1; None for anything else, which then goes through h11 as before.

    Every login sends this exact request, and h11's general parser cost a sixth of a login's
    CPU (docs/performance.md).  The subset: that exact request line; a complete head within
    MAX_HEAD; header lines ``token ":" OWS value OWS`` with h11's value characters and no
    continuation lines; exactly one Host; no Content-Length, Transfer-Encoding or Expect; an
    Upgrade whose first value is ``DERP`` (case-insensitive).  For every input it accepts, h11
    and ``route_request`` give the same request, route and trailing bytes
    (tests/derpd/test_upgrade_fastpath.py checks that on generated input).
    """
    last = _last_derp_request[0]
    if last is not None and data.startswith(last):  # the head the previous client sent
        return PlainDerpRequest(_last_derp_request[1], data[len(last) :])
    if not data.startswith(_DERP_REQUEST_LINE + b"\r\n"):
        return None
    end = data.find(b"\r\n\r\n", 0, MAX_HEAD)
    if end < 0:
        return None
    first: dict[bytes, bytes] = {}
    hosts = 0
    for line in data[len(_DERP_REQUEST_LINE) + 2 : end].split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon or not name or name.translate(None, _TOKEN_CHARS):
            return None
        value = value.strip(b" \t")
        if value.translate(None, _VALUE_CHARS):
            return None
        key = name.lower()
        if key in _LEAVE_TO_H11:
            return None
        if key == b"host":
            hosts += 1
        first.setdefault(key, value)
    if hosts != 1 or first.get(b"upgrade", b"").lower() != b"derp":
        return None
    upgrade = DerpUpgrade(fast_start=first.get(b"derp-fast-start") == b"1", not_ideal=bool(first.get(b"ideal-node")))
    if end + 4 <= _REMEMBER_DERP_REQUEST:
        _last_derp_request[:] = (data[: end + 4], upgrade)
    return PlainDerpRequest(upgrade, data[end + 4 :])


# The last head read_plain_derp_request accepted (through its blank line) and its upgrade: one
# entry, replaced by the next different head.  Every client of one build asks one relay with
# the same bytes; a head that starts with these bytes ends where they end, so it reads the same.
_last_derp_request: list[Any] = [None, None]
_REMEMBER_DERP_REQUEST = 1024


def request_framing_error(request: h11.Request) -> str | None:
    """A reason to refuse a request whose body framing is ambiguous, else None.

    Content-Length together with Transfer-Encoding is the request-smuggling shape: a proxy in
    front and this server could disagree about where the body ends (RFC 9112 6.1), so it is
    refused (400) rather than resolved.
    """
    names = {k.lower() for k, _ in request.headers.raw_items()}
    if b"content-length" in names and b"transfer-encoding" in names:
        return "ambiguous_length"
    return None


def _header(request: h11.Request, name: bytes) -> bytes | None:
    for k, v in request.headers:
        if k == name:  # h11 lower-cases header names
            return v
    return None


def _first_headers(request: h11.Request) -> dict[bytes, bytes]:
    """Lower-cased name -> the first value of that header (what ``_header`` finds)."""
    out: dict[bytes, bytes] = {}
    for k, v in request.headers.raw_items():
        out.setdefault(k.lower(), v)
    return out


def _text(status: int, body: bytes, *extra: tuple[bytes, bytes]) -> Response:
    return Response(status, ((b"Content-Type", b"text/plain; charset=utf-8"), *extra), body)


def route_request(request: h11.Request, *, home: str = "", derp_enabled: bool = True) -> Route:
    """Decide how to answer one request on the relay port.

    Args:
        home: derper's ``--home``: ``""`` the built-in page, ``"blank"`` an empty page, or an
            ``http(s)://`` URL to redirect ``/`` to.
    """
    path = request.target.split(b"?", 1)[0]
    method = request.method
    head = method == b"HEAD"
    if path == b"/derp":
        if not derp_enabled:
            return _text(404, b"derp server disabled\n")
        h = _first_headers(request)  # one pass over the headers for every login
        upgrade = (h.get(b"upgrade") or b"").strip().lower()
        if upgrade == b"websocket" and b"derp" in (h.get(b"sec-websocket-protocol") or b""):
            protocols = [p.strip() for p in (h.get(b"sec-websocket-protocol") or b"").split(b",")]
            key = h.get(b"sec-websocket-key")
            if key is None:
                return _text(400, b"missing Sec-WebSocket-Key\n")
            return WebSocketUpgrade(generate_accept_token(key), b"derp" in protocols)
        if upgrade in (b"derp", b"websocket"):
            return DerpUpgrade(
                fast_start=h.get(b"derp-fast-start") == b"1",
                not_ideal=bool(h.get(b"ideal-node")),
            )
        return _text(426, b"DERP requires connection upgrade\n", (b"X-Content-Type-Options", b"nosniff"))
    if path in (b"/derp/probe", b"/derp/latency-check"):
        if method in (b"GET", b"HEAD"):
            return Response(200, ((b"Access-Control-Allow-Origin", b"*"),), head_only=head)
        return _text(405, b"bogus probe method\n")
    if path == b"/generate_204":
        headers = [(b"Cache-Control", NO_CACHE)]
        challenge = _header(request, b"x-tailscale-challenge")
        if challenge is not None and _CHALLENGE_RE.fullmatch(challenge):
            headers.append((b"X-Tailscale-Response", b"response " + challenge))
        return Response(204, tuple(headers), head_only=True)
    if path == b"/robots.txt":
        return Response(
            200,
            (*BROWSER_HEADERS, (b"Content-Type", b"text/plain; charset=utf-8")),
            b"User-agent: *\nDisallow: /\n",
            head_only=head,
        )
    if path == b"/metrics":
        return Metrics()
    if path == b"/bootstrap-dns":
        return BootstrapDNS(query_param(request.target, "q"), head_only=head)
    if path == b"/debug":  # Go's ServeMux redirects to the subtree
        return Response(301, ((b"Location", b"/debug/"),), head_only=head)
    if path.startswith(b"/debug/"):
        return Debug(path, head_only=head, forwarded=_header(request, b"x-forwarded-for") is not None,
                     target=request.target)
    if home.startswith(("http://", "https://")) and path == b"/":
        return Response(302, ((b"Location", home.encode()),))
    body = b"" if home == "blank" else HOME_PAGE
    return Response(200, (*BROWSER_HEADERS, (b"Content-Type", b"text/html; charset=utf-8")), body, head_only=head)


def redirect_to_https(request: h11.Request, authority: bytes) -> Response:
    """The port-80 listener: ``/generate_204`` is served, GET/HEAD redirect to https, the
    rest get 400 (spec 10.2).

    ``authority`` is the relay's own name (``--hostname``, plus the port when not 443): the
    target is never built from the client's Host header, so nobody can make this relay
    redirect to a host of their choosing."""
    path = request.target.split(b"?", 1)[0]
    if path == b"/generate_204":
        route = route_request(request)
        assert isinstance(route, Response)
        return route
    if request.method not in (b"GET", b"HEAD"):
        return _text(400, b"Use HTTPS\n")
    target = request.target if request.target.startswith(b"/") else b"/"
    return Response(302, ((b"Location", b"https://" + authority + target),), head_only=request.method == b"HEAD")


def derp_switching_protocols(server_key: NodePublic) -> bytes:
    """The exact 101 derper writes for a binary DERP upgrade (spec 9.2)."""
    return (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: DERP\r\n"
        b"Connection: Upgrade\r\n"
        b"Derp-Version: %d\r\n"
        b"Derp-Public-Key: %s\r\n"
        b"\r\n" % (PROTOCOL_VERSION, server_key.hex().encode())
    )


def websocket_switching_protocols(accept_token: bytes) -> bytes:
    """The RFC 6455 101 with subprotocol ``derp`` and no extensions (no compression)."""
    return (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: %s\r\n"
        b"Sec-WebSocket-Protocol: derp\r\n"
        b"\r\n" % accept_token
    )
