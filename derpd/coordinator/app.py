"""The coordinator's ASGI app (plain ASGI 3, no framework; served by hypercorn's Trio worker).

Routes:

    GET  /derpmap/default        the DERPMap JSON (ETag, If-None-Match -> 304, Cache-Control)
    GET  /derpmap/default.yaml   the same map as headscale ``derp.paths`` YAML
    POST /v1/nodes               self-registration / heartbeat (Authorization: Bearer <token>);
                                 with "Draining": true, a relay going down for maintenance
    GET  /status                 HTML status page (no external assets, refreshes itself)
    GET  /status.json            the data behind it
    GET  /metrics                Prometheus text
    GET  /healthz                ``ok``
    GET  /readyz                 ``ok``, or 503 while a fresh replica waits for first heartbeats

Bad requests get a 4xx with a JSON ``{"error": ..., "field": ...}`` body, one debug log
line and a count in ``derpd_coordinator_registrations_total{result}``; they never change
state.  A body must arrive within ``body_timeout`` (408) and within ``max_body_bytes``
(413).  ``/status`` and ``/status.json`` show probe failures as short classes unless the
request carries the registration token.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..relay.client_address import IPNetwork, client_from_forwarded_for, is_trusted
from .config import UNSCOPED
from .registration import RegistrationError, parse_registration
from .state import CoordinatorState
from .status import render_status

log = logging.getLogger("derpd.coordinator")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
]


class _TooLarge(Exception):
    pass


class _Truncated(Exception):
    """The client went away before the whole body arrived."""


class CoordinatorApp:
    """ASGI callable over a :class:`CoordinatorState`."""

    def __init__(self, state: CoordinatorState, *, clock: Callable[[], float] = trio.current_time,
                 trusted_proxies: tuple[IPNetwork, ...] = ()) -> None:
        self.state = state
        self.clock = clock
        self.trusted_proxies = trusted_proxies

    def client_address(self, scope: Scope) -> str:
        """The registrant's address: the connection's peer (as a PROXY header named it), or,
        from a ``--trusted-proxies`` peer, the right-most untrusted ``X-Forwarded-For`` entry.
        A forwarding header from anyone else is ignored and counted."""
        peer = str((scope.get("client") or ("", 0))[0] or "")
        forwarded = [v for k, v in scope["headers"] if k.lower() == b"x-forwarded-for"]
        if self.trusted_proxies and is_trusted(peer, self.trusted_proxies):
            return (client_from_forwarded_for(forwarded, self.trusted_proxies) or peer) if forwarded else peer
        if forwarded or any(k.lower() in (b"forwarded", b"x-real-ip") for k, _ in scope["headers"]):
            self.state.metrics.proxy_refusals.labels("forwarded_untrusted").inc()
            log.debug("ignoring forwarding headers from %s, which is not in --trusted-proxies", peer)
        return peer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        method = scope["method"]
        route = _ROUTES.get(path)
        if route is None:
            await _send(send, 404, _json({"error": f"no such page {path!r}; try /status or /derpmap/default"}),
                        b"application/json")
            return
        handler, methods = route
        if method not in methods:
            await _send(send, 405, _json({"error": f"{method} is not allowed here; use {' or '.join(methods)}"}),
                        b"application/json", [(b"allow", ", ".join(methods).encode())])
            return
        await handler(self, scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    # ---- map ---------------------------------------------------------------------

    async def _map(self, scope: Scope, receive: Receive, send: Send, *, yaml: bool) -> None:
        self.state.expire(self.clock())
        pub = self.state.published
        fmt = "yaml" if yaml else "json"
        headers = [
            (b"etag", pub.etag.encode()),
            (b"cache-control", b"no-cache"),
            (b"access-control-allow-origin", b"*"),
        ]
        if _etag_matches(_header(scope, b"if-none-match"), pub.etag):
            self.state.metrics.map_requests.labels(fmt, "304").inc()
            await _send(send, 304, b"", None, headers)
            return
        self.state.metrics.map_requests.labels(fmt, "200").inc()
        body, ctype = (pub.yaml, b"application/yaml; charset=utf-8") if yaml else (pub.json, b"application/json")
        await _send(send, 200, b"" if scope["method"] == "HEAD" else body, ctype, headers,
                    content_length=len(body))

    async def map_json(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._map(scope, receive, send, yaml=False)

    async def map_yaml(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._map(scope, receive, send, yaml=True)

    # ---- registration --------------------------------------------------------------

    async def register(self, scope: Scope, receive: Receive, send: Send) -> None:
        m = self.state.metrics.registrations
        refusals = self.state.metrics.auth_refusals
        cfg = self.state.config
        peer = self.client_address(scope)
        try:
            if not cfg.registration_enabled:
                m.labels("disabled").inc()
                refusals.labels("disabled").inc()
                raise RegistrationError(403, "registration is disabled on this coordinator: "
                                             "set coordinator.token_file in its config")
            given = self._bearer(scope)
            token = cfg.find_token(given) if given is not None else None
            if token is None:
                m.labels("unauthorized").inc()
                refusals.labels("missing" if given is None else "wrong").inc()
                raise RegistrationError(401, "missing or wrong token: send 'Authorization: Bearer <token>' "
                                             "with the content of the coordinator's token file")
            try:
                with trio.fail_after(cfg.body_timeout):
                    body = await _read_body(scope, receive, cfg.max_body_bytes)
            except _TooLarge:
                m.labels("too_large").inc()
                raise RegistrationError(413, f"the body is larger than {cfg.max_body_bytes} bytes") from None
            except trio.TooSlowError:
                m.labels("slow_body").inc()
                raise RegistrationError(408, f"the body did not arrive within {cfg.body_timeout:g} s") from None
            except _Truncated:
                m.labels("truncated").inc()
                log.debug("registration from %s: the connection closed before the whole body arrived", peer)
                return
            try:
                reg = parse_registration(body)
                created = self.state.register(reg, self.clock(), peer, None if token is UNSCOPED else token)
            except RegistrationError as exc:
                if exc.reason in ("region", "node"):
                    refusals.labels(exc.reason).inc()
                result = ("out_of_scope" if exc.reason in ("region", "node")
                          else {400: "bad_request", 403: "forbidden", 409: "conflict"}.get(exc.status))
                if result is None:
                    result = "full" if "max_registered_nodes" in exc.message else "rate_limited"
                m.labels(result).inc()
                raise
        except RegistrationError as exc:
            log.debug("registration from %s refused (%d): %s", peer, exc.status, exc)
            extra = [(b"www-authenticate", b"Bearer")] if exc.status == 401 else []
            if exc.status == 429:
                extra.append((b"retry-after", str(max(1, round(cfg.min_heartbeat_interval))).encode()))
            await _send(send, exc.status, _json(exc.to_json()), b"application/json", extra,
                        close=exc.status in (408, 413))
            return
        m.labels("draining" if reg.draining else "created" if created else "refreshed").inc()
        answer = {
            "ok": True,
            "changed": created,
            "node_ttl": cfg.node_ttl,
            "heartbeat_interval": self.state.heartbeat_interval(),
        }
        if reg.draining:
            answer["draining"] = True
        await _send(send, 200, _json(answer), b"application/json")

    @staticmethod
    def _bearer(scope: Scope) -> bytes | None:
        """The token of ``Authorization: Bearer <token>``, or None without one."""
        scheme, _, given = (_header(scope, b"authorization") or b"").partition(b" ")
        return given.strip() if scheme.lower() == b"bearer" and given.strip() else None

    def _authorized(self, scope: Scope) -> bool:
        """True when the request carries a registration token (``Authorization: Bearer``)."""
        given = self._bearer(scope)
        return given is not None and self.state.config.find_token(given) is not None

    # ---- people and machines -------------------------------------------------------

    async def status_html(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.state.expire(self.clock())
        doc = self.state.status(self.clock(), detailed=self._authorized(scope))
        body = render_status(doc, refresh=self.state.config.status_refresh).encode()
        await _send(send, 200, body, b"text/html; charset=utf-8", [
            (b"cache-control", b"no-store"),
            (b"content-security-policy",
             b"default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'"),
        ])

    async def status_json(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.state.expire(self.clock())
        doc = self.state.status(self.clock(), detailed=self._authorized(scope))
        await _send(send, 200, _json(doc), b"application/json",
                    [(b"cache-control", b"no-store")])

    async def metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = generate_latest(self.state.metrics.registry)
        await _send(send, 200, body, CONTENT_TYPE_LATEST.encode())

    async def healthz(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send(send, 200, b"ok\n", b"text/plain; charset=utf-8")

    async def readyz(self, scope: Scope, receive: Receive, send: Send) -> None:
        """503 while a replica that started without a state file waits for the relays'
        first heartbeats, so a load balancer does not hand out its incomplete map."""
        if self.state.ready(self.clock()):
            await _send(send, 200, b"ok\n", b"text/plain; charset=utf-8")
        else:
            await _send(send, 503, b"waiting for the relays' first heartbeats\n", b"text/plain; charset=utf-8")


_Handler = Callable[[CoordinatorApp, Scope, Receive, Send], Awaitable[None]]
_ROUTES: dict[str, tuple[_Handler, tuple[str, ...]]] = {
    "/derpmap/default": (CoordinatorApp.map_json, ("GET", "HEAD")),
    "/derpmap/default.yaml": (CoordinatorApp.map_yaml, ("GET", "HEAD")),
    "/v1/nodes": (CoordinatorApp.register, ("POST",)),
    "/status": (CoordinatorApp.status_html, ("GET", "HEAD")),
    "/status.json": (CoordinatorApp.status_json, ("GET", "HEAD")),
    "/metrics": (CoordinatorApp.metrics, ("GET", "HEAD")),
    "/healthz": (CoordinatorApp.healthz, ("GET", "HEAD")),
    "/readyz": (CoordinatorApp.readyz, ("GET", "HEAD")),
}


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode()


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value)
    return None


def _etag_matches(header: bytes | None, etag: str) -> bool:
    if not header:
        return False
    for candidate in header.decode("latin-1").split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == etag:
            return True
    return False


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """Returns the request body.

    Raises:
        _TooLarge: Content-Length or the bytes received exceed ``limit``.
        _Truncated: the client disconnected before the end of the body.
    """
    length = _header(scope, b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _Truncated
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _send(send: Send, status: int, body: bytes, ctype: bytes | None,
                headers: list[tuple[bytes, bytes]] | None = None, *, content_length: int | None = None,
                close: bool = False) -> None:
    hdrs = list(_SECURITY_HEADERS)
    if ctype is not None:
        hdrs.append((b"content-type", ctype))
    if status != 304:
        hdrs.append((b"content-length", str(len(body) if content_length is None else content_length).encode()))
    if close:
        hdrs.append((b"connection", b"close"))
    hdrs += headers or []
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})
