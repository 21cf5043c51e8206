"""derper's ``/debug/`` tree on the relay's HTTP ports: an index, ``/debug/varz`` (the same
Prometheus text as ``/metrics``) and ``/debug/clients`` (one JSON row per client, see
``diagnostics``), for loopback peers and ``--debug-allow`` networks only.  A
request that came through a proxy (``X-Forwarded-For``) is refused, as derper does; an unknown
``/debug/...`` path is a 404, never the home page.  No I/O here: the caller passes the peer's
verdict and the metrics renderer.

Dependencies: used by ``derpd.relay.http_front``; imports ``derpd.protocol.upgrade`` and ``diagnostics``.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST

from ..protocol.upgrade import BROWSER_HEADERS, Debug, Response, query_param
from .diagnostics import DEFAULT_LIMIT, parse_limit

_TEXT = (b"Content-Type", b"text/plain; charset=utf-8")


def debug_response(route: Debug, *, allowed: bool, metrics: Callable[[], bytes],
                   info: Sequence[tuple[str, str]], clients: Callable[[str, int], bytes] | None = None) -> Response:
    """The answer to one ``/debug/...`` request; ``allowed`` is the peer's verdict."""
    if not allowed or route.forwarded:
        return Response(403, (_TEXT,), b"debug access denied\n", head_only=route.head_only)
    if route.path == b"/debug/":
        items = "".join(f"<li><b>{html.escape(k)}:</b> {html.escape(v)}</li>\n" for k, v in info)
        page = ("<html><body><h1>derpd debug</h1>\n<ul>\n" + items + "</ul>\n<ul>\n"
                '<li><a href="/debug/varz">/debug/varz</a> Metrics (Prometheus)</li>\n'
                '<li><a href="/debug/clients">/debug/clients</a> Clients, worst first (JSON; ?key=, ?limit=)</li>\n'
                "</ul>\n</body></html>\n")
        return Response(200, (*BROWSER_HEADERS, (b"Content-Type", b"text/html; charset=utf-8")), page.encode(),
                        head_only=route.head_only)
    if route.path == b"/debug/varz":
        return Response(200, ((b"Content-Type", CONTENT_TYPE_LATEST.encode()),), metrics(),
                        head_only=route.head_only)
    if route.path == b"/debug/clients" and clients is not None:
        limit = query_param(route.target, "limit")
        body = clients(query_param(route.target, "key"), parse_limit(limit) if limit else DEFAULT_LIMIT)
        return Response(200, ((b"Content-Type", b"application/json"),), body, head_only=route.head_only)
    return Response(404, (_TEXT,), b"404 page not found\n", head_only=route.head_only)
