"""derper's ``/debug/`` tree on the relay's HTTP ports: an index and ``/debug/varz`` (the same
Prometheus text as ``/metrics``), for loopback peers and ``--debug-allow`` networks only.  A
request that came through a proxy (``X-Forwarded-For``) is refused, as derper does; an unknown
``/debug/...`` path is a 404, never the home page.  No I/O here: the caller passes the peer's
verdict and the metrics renderer.

Dependencies: used by ``derpd.relay.http_front``; imports ``derpd.protocol.upgrade`` only.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST

from ..protocol.upgrade import BROWSER_HEADERS, Debug, Response

_TEXT = (b"Content-Type", b"text/plain; charset=utf-8")


def debug_response(route: Debug, *, allowed: bool, metrics: Callable[[], bytes],
                   info: Sequence[tuple[str, str]]) -> Response:
    """The answer to one ``/debug/...`` request; ``allowed`` is the peer's verdict."""
    if not allowed or route.forwarded:
        return Response(403, (_TEXT,), b"debug access denied\n", head_only=route.head_only)
    if route.path == b"/debug/":
        items = "".join(f"<li><b>{html.escape(k)}:</b> {html.escape(v)}</li>\n" for k, v in info)
        page = ("<html><body><h1>derpd debug</h1>\n<ul>\n" + items + "</ul>\n<ul>\n"
                '<li><a href="/debug/varz">/debug/varz</a> Metrics (Prometheus)</li>\n'
                "</ul>\n</body></html>\n")
        return Response(200, (*BROWSER_HEADERS, (b"Content-Type", b"text/html; charset=utf-8")), page.encode(),
                        head_only=route.head_only)
    if route.path == b"/debug/varz":
        return Response(200, ((b"Content-Type", CONTENT_TYPE_LATEST.encode()),), metrics(),
                        head_only=route.head_only)
    return Response(404, (_TEXT,), b"404 page not found\n", head_only=route.head_only)
