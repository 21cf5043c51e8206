"""Client admission: who may log in to the relay (spec section 7).

Two checks, each optional, both run after a valid ClientInfo and before ServerInfo (mesh
peers skip them; the server's ``admit`` runs the installed checks in order, all must pass):

* ``AllowList`` (``--allow-keys FILE``): a static list of ``nodekey:`` lines.  It is read at
  start, on SIGHUP, and when the file changes (checked every few seconds).  A file that
  cannot be read or parsed keeps the previous list and logs why.
* ``VerifyClientURL`` (``--verify-client-url URL``): derper's admission controller protocol
  (spec 7.2), as headscale's ``/verify`` implements it.  The relay POSTs::

      {"NodePublic":"nodekey:<64 hex>","Source":"<client IP>"}

  with no Content-Type and a 5 s timeout, reads at most 4 KiB of the answer, and admits only
  a 200 whose JSON has ``"Allow": true`` (field name matched case-insensitively, like Go).
  Requests go through one pooled httpx client (keep-alive, so a login costs no TCP or TLS
  handshake with the controller); redirects are followed only to the same scheme, host and
  port (307/308, at most 3).
  ``fail_open`` (default true, as derper) admits when the request itself fails -- connect
  error, TLS error, a broken response head, or the 5 s timeout; a non-200 status or an
  unreadable body always refuses.

``--verify-clients`` is the same check with another ``query``: the local tailscaled's LocalAPI
(``derpd.localapi``), failing closed as derper does.

Decisions are cached per (key, source IP) for ``cache_ttl`` seconds and concurrent checks of
the same pair share one request, so a reconnect storm costs the controller one request per
client per TTL; at most ``max_in_flight`` requests run at once.

``FairShare`` sits in front of the remote checks: one source address (an IPv6 /64 counts as
one) may have at most 8 checks in flight and 56 more logins waiting for them, one key at most
2 checks; a login over a cap is refused at once (``admission_busy_source``,
``admission_busy_key``), so a slow controller and one busy source cannot starve everyone
else's logins.

A refusal returns a reason label counted in ``derp_admission_refused_total{reason}``:
``not_allowed`` (allow-list), ``verify_denied`` (``Allow`` false or missing),
``verify_status`` (non-200), ``verify_bad_response`` (body not the expected JSON),
``verify_unreachable`` (transport failure with fail-open off), ``admission_busy_source`` and
``admission_busy_key`` (``FairShare``).
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
import ssl
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from .keys import KeyFormatError, NodePublic
from .settings import AdmissionSettings, SettingsError

log = logging.getLogger("derpd.admission")

VERIFY_TIMEOUT = 5.0
MAX_RESPONSE_BODY = 4 << 10
DEFAULT_CACHE_TTL = 5.0
MAX_CACHE_ENTRIES = 100_000
MAX_IN_FLIGHT = 64
MAX_IN_FLIGHT_PER_SOURCE = 8
MAX_IN_FLIGHT_PER_KEY = 2
MAX_QUEUED_PER_SOURCE = 56  # logins from one source waiting for one of its slots
ALLOW_FILE_CHECK_INTERVAL = 5.0
MAX_REDIRECTS = 3
_HEADERS = {"User-Agent": "derpd"}

Decision = tuple[bool, str]
Check = Callable[[NodePublic, object, str], Awaitable[Decision]]
Query = Callable[[NodePublic, str], Awaitable[Decision]]  # VerifyClientURL(query=...): another way to ask


class VerifyUnreachable(Exception):
    """A ``Query`` got no answer at all: the fail-open rule applies."""


class AdmissionConfigError(SettingsError):
    """An admission option is unusable; the message says what to change."""


# ------------------------------------------------------------------------------ allow-list


def parse_allow_keys(text: str) -> frozenset[bytes]:
    """Parse an allow-list: one ``nodekey:<64 hex>`` per line; blank lines and ``#`` comments
    are ignored, as is anything after ``#`` on a line.

    Raises:
        AdmissionConfigError: a line that is not a node key (with its line number).
    """
    keys = set()
    for n, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            keys.add(NodePublic.parse(entry.lower()).raw)
        except KeyFormatError as e:
            raise AdmissionConfigError(f"line {n}: {e} (each line must be nodekey:<64 hex digits>)") from e
    return frozenset(keys)


class AllowList:
    """``--allow-keys FILE``: only keys listed in the file may log in."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys: frozenset[bytes] = frozenset()
        self._stamp: tuple[int, float, int] | None = None

    def _file_stamp(self) -> tuple[int, float, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime, st.st_size

    def load(self) -> None:
        """Read the file (at start-up).

        Raises:
            AdmissionConfigError: unreadable file or a bad line.
        """
        stamp = self._file_stamp()
        try:
            text = self.path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise AdmissionConfigError(f"cannot read the allow-list {self.path}: {e}; check --allow-keys") from e
        try:
            self.keys = parse_allow_keys(text)
        except AdmissionConfigError as e:
            raise AdmissionConfigError(f"{self.path}: {e}") from e
        self._stamp = stamp

    def reload(self) -> bool:
        """SIGHUP or file change: read again; on error keep the current list and log why.

        Returns True if the new list is in use.
        """
        try:
            self.load()
        except AdmissionConfigError as e:
            self._stamp = self._file_stamp()  # do not retry the same broken file every interval
            log.error("allow-list not reloaded, keeping %d keys: %s", len(self.keys), e)
            return False
        log.warning("allow-list reloaded: %d keys", len(self.keys))
        return True

    def changed(self) -> bool:
        return self._file_stamp() != self._stamp

    async def watch(self, interval: float = ALLOW_FILE_CHECK_INTERVAL) -> None:
        """Reload whenever the file changes, forever."""
        while True:
            await trio.sleep(interval)
            if self.changed():
                self.reload()

    async def check(self, key: NodePublic, info: object, ip: str) -> Decision:
        return (True, "") if key.raw in self.keys else (False, "not_allowed")


# ------------------------------------------------------------------------------ verify URL


class _TransportError(Exception):
    """The request failed before a response head arrived (fail-open applies)."""


class _BadAnswer(Exception):
    """A response head arrived but the answer broke off or cannot be used."""


def _parse_url(url: str) -> httpx.URL:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AdmissionConfigError(f"--verify-client-url must be an http:// or https:// URL, not {url!r}")
    try:
        parts.port
    except ValueError as e:
        raise AdmissionConfigError(f"--verify-client-url has a bad port: {url!r}") from e
    try:
        return httpx.URL(url)
    except httpx.InvalidURL as e:
        raise AdmissionConfigError(f"--verify-client-url is not a usable URL: {url!r} ({e})") from e


def request_body(key: NodePublic, ip: str) -> bytes:
    """The JSON derper sends (``tailcfg.DERPAdmitClientRequest``)."""
    return json.dumps({"NodePublic": str(key), "Source": ip}, separators=(",", ":")).encode()


def parse_verify_response(status: int, body: bytes) -> Decision:
    """Judge a controller's answer like derper: status 200 and a JSON object whose ``Allow``
    field (any letter case; the last one wins) is ``true``.  Only the first 4 KiB count and
    anything after the first JSON value is ignored.  Never raises."""
    if status != 200:
        return False, "verify_status"
    try:
        text = body[:MAX_RESPONSE_BODY].decode()
        obj, _ = json.JSONDecoder().raw_decode(text.lstrip(" \t\r\n"))
    except (ValueError, RecursionError):
        return False, "verify_bad_response"
    if obj is None:  # Go decodes null into a zero struct: Allow false
        return False, "verify_denied"
    if not isinstance(obj, dict):
        return False, "verify_bad_response"
    allow: Any = False
    for k, v in obj.items():
        if k.lower() == "allow":
            allow = v
    if allow is None:
        allow = False
    if not isinstance(allow, bool):
        return False, "verify_bad_response"
    return (True, "") if allow else (False, "verify_denied")


def http_client(*, max_connections: int = MAX_IN_FLIGHT,
                ssl_context: ssl.SSLContext | None = None) -> httpx.AsyncHTTPTransport:
    """The pooled HTTP/1.1 transport for the admission controller: keep-alive connections (one
    TCP and TLS handshake per connection, not per login), no proxy from the environment, TLS
    verified with the system roots or ``ssl_context``.  ``post_json`` sends through the
    transport itself (no cookie jar, no automatic redirects: it follows same-origin 307/308
    only) with every phase under its timeout."""
    return httpx.AsyncHTTPTransport(
        verify=ssl_context if ssl_context is not None else True,
        trust_env=False,
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                            keepalive_expiry=30.0),
    )


async def post_json(url: str, body: bytes, *, max_body: int = MAX_RESPONSE_BODY,
                    ssl_context: ssl.SSLContext | None = None, timeout: float = VERIFY_TIMEOUT,
                    client: httpx.AsyncHTTPTransport | None = None) -> tuple[int, bytes]:
    """POST ``body`` (no Content-Type, as Go's client does for derper) and return the status and
    at most ``max_body`` bytes of the response body.  A 307 or 308 to the same scheme, host and
    port is followed (at most ``MAX_REDIRECTS``); any other redirect is an answer like any
    non-200.  The caller bounds the total time.

    Raises:
        _TransportError: connect/TLS failure, or no response head.
        _BadAnswer: the body broke off.
    """
    if client is None:
        async with http_client(ssl_context=ssl_context, max_connections=1) as one:
            return await post_json(url, body, max_body=max_body, timeout=timeout, client=one)
    target = _parse_url(url)
    extensions = {"timeout": httpx.Timeout(timeout).as_dict()}
    for _ in range(MAX_REDIRECTS + 1):
        request = httpx.Request("POST", target, content=body, headers=_HEADERS, extensions=extensions)
        try:
            response = await client.handle_async_request(request)
        except httpx.TransportError as e:
            raise _TransportError(str(e) or type(e).__name__) from e
        try:
            location = response.headers.get("location")
            if response.status_code in (307, 308) and location is not None:
                try:
                    nxt = target.join(location)
                except httpx.InvalidURL:
                    nxt = None
                if nxt is not None and (nxt.scheme, nxt.host, nxt.port) == (target.scheme, target.host, target.port):
                    target = nxt
                    continue
            got = bytearray()
            try:
                async for chunk in response.aiter_raw():
                    got += chunk
                    if len(got) >= max_body:
                        break
            except httpx.TransportError as e:
                raise _BadAnswer(str(e) or type(e).__name__) from e
            return response.status_code, bytes(got[:max_body])
        finally:
            await response.aclose()
    return 310, b""  # too many redirects: a non-200 answer


class VerifyClientURL:
    """``--verify-client-url``: ask an admission controller (headscale's ``/verify``)."""

    def __init__(
        self,
        url: str,
        *,
        fail_open: bool = True,
        timeout: float = VERIFY_TIMEOUT,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        max_in_flight: int = MAX_IN_FLIGHT,
        ssl_context: ssl.SSLContext | None = None,
        query: Query | None = None,
    ) -> None:
        if query is None:
            _parse_url(url)  # fail at start-up, not at the first client
        self.query = query  # instead of POSTing to url (which then only names it in logs)
        self.url = url
        self.fail_open = fail_open
        self.timeout = timeout
        self.cache_ttl = cache_ttl
        self.ssl_context = ssl_context
        self.requests = 0  # POSTs actually sent (tests and logs)
        self._cache: OrderedDict[tuple[bytes, str], tuple[float, Decision]] = OrderedDict()
        self._pending: dict[tuple[bytes, str], trio.Event] = {}
        self._limit = trio.Semaphore(max_in_flight)
        self._max_in_flight = max_in_flight
        self._client: httpx.AsyncHTTPTransport | None = None  # made in the running event loop, on first use
        self._unreachable_logged = False
        # Called with True when the endpoint stops answering while fail-open admits clients
        # unchecked, and with False once it answers again (the relay's Health frames).
        self.on_fail_open: Callable[[bool], None] | None = None

    async def check(self, key: NodePublic, info: object, ip: str) -> Decision:
        cache_key = (key.raw, ip)
        while True:
            hit = self._cache.get(cache_key)
            if hit is not None and hit[0] > trio.current_time():
                return hit[1]
            pending = self._pending.get(cache_key)
            if pending is None:
                break
            await pending.wait()  # someone is asking about this client right now
        event = self._pending[cache_key] = trio.Event()
        try:
            decision = await (self._ask(key, ip) if self.query is None else self._ask_query(key, ip))
            self._remember(cache_key, decision)
            return decision
        finally:
            del self._pending[cache_key]
            event.set()

    def _remember(self, cache_key: tuple[bytes, str], decision: Decision) -> None:
        cache = self._cache
        now = trio.current_time()
        cache[cache_key] = (now + self.cache_ttl, decision)
        cache.move_to_end(cache_key)
        while len(cache) > MAX_CACHE_ENTRIES:
            cache.popitem(last=False)
        oldest = next(iter(cache.values()))
        if oldest[0] <= now:  # drop a few expired entries on the way
            for k in [k for k, (exp, _) in list(cache.items())[:64] if exp <= now]:
                del cache[k]

    async def _ask(self, key: NodePublic, ip: str) -> Decision:
        async with self._limit:
            self.requests += 1
            try:
                if self._client is None:
                    self._client = http_client(max_connections=self._max_in_flight, ssl_context=self.ssl_context)
                with trio.fail_after(self.timeout):
                    status, body = await post_json(self.url, request_body(key, ip), timeout=self.timeout,
                                                   client=self._client)
            except (_TransportError, trio.TooSlowError) as e:
                return self._unreachable(e)
            except _BadAnswer:
                return False, "verify_bad_response"
        self._answered()
        return parse_verify_response(status, body)

    async def _ask_query(self, key: NodePublic, ip: str) -> Decision:
        assert self.query is not None
        async with self._limit:
            self.requests += 1
            try:
                with trio.fail_after(self.timeout):
                    decision = await self.query(key, ip)
            except (VerifyUnreachable, trio.TooSlowError) as e:
                return self._unreachable(e)
        self._answered()
        return decision

    def _answered(self) -> None:
        if self._unreachable_logged:
            self._unreachable_logged = False
            log.warning("admission controller %s answers again", self.url)
            if self.fail_open and self.on_fail_open is not None:
                self.on_fail_open(False)

    def _unreachable(self, error: BaseException) -> Decision:
        why = "timed out" if isinstance(error, trio.TooSlowError) else str(error)
        if not self._unreachable_logged:
            self._unreachable_logged = True
            action = ("admitting clients unchecked (--verify-client-url-fail-open)" if self.fail_open
                      else "refusing clients until it answers" if self.query is not None
                      else "refusing clients (pass --verify-client-url-fail-open to admit them instead)")
            log.error("admission controller %s unreachable (%s): %s", self.url, why, action)
            if self.fail_open and self.on_fail_open is not None:
                self.on_fail_open(True)
        return (True, "") if self.fail_open else (False, "verify_unreachable")


# ------------------------------------------------------------------------------ fair share


def source_of(ip: str) -> str:
    """The unit a per-source cap counts: the IPv4 address, or the IPv6 /64 (one host usually
    owns a whole /64, so counting single IPv6 addresses would be no cap at all)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return ip


class _Share:
    __slots__ = ("slots", "count")

    def __init__(self, slots: int) -> None:
        self.slots = trio.Semaphore(slots)
        self.count = 0  # asking now plus waiting for a slot


class FairShare:
    """Caps on admission checks per source address and per key.

    ``wrap(check)`` returns a check that lets each source (``source_of``) run at most
    ``per_source`` checks at once; up to ``queue`` more logins from that source wait their
    turn, and any beyond are refused at once without asking.  A key may have at most
    ``per_key`` checks in flight.  So one source can hold at most ``per_source`` of the
    controller's ``MAX_IN_FLIGHT`` slots, however many logins it opens, and the rest of the
    slots stay free for everyone else.  Refusals return ``admission_busy_source`` or
    ``admission_busy_key`` (the server counts them in ``derp_admission_refused_total``); the
    first one per source is logged at debug level until that source's queue empties.
    """

    def __init__(self, per_source: int = MAX_IN_FLIGHT_PER_SOURCE, per_key: int = MAX_IN_FLIGHT_PER_KEY,
                 queue: int = MAX_QUEUED_PER_SOURCE) -> None:
        self.per_source = per_source
        self.per_key = per_key
        self.queue = queue
        self._sources: dict[str, _Share] = {}
        self._keys: dict[bytes, int] = {}
        self._logged: set[str] = set()

    def wrap(self, check: Check) -> Check:
        async def fair_check(key: NodePublic, info: object, ip: str) -> Decision:
            src = source_of(ip)
            share = self._sources.get(src)
            if share is None:
                share = self._sources[src] = _Share(self.per_source)
            elif share.count >= self.per_source + self.queue:
                if src not in self._logged:
                    self._logged.add(src)
                    log.debug("admission: %d logins from %s already waiting, refusing more", share.count, src)
                return False, "admission_busy_source"
            keys = self._keys
            if keys.get(key.raw, 0) >= self.per_key:
                return False, "admission_busy_key"
            share.count += 1
            keys[key.raw] = keys.get(key.raw, 0) + 1
            try:
                async with share.slots:
                    return await check(key, info, ip)
            finally:
                share.count -= 1
                if not share.count:
                    del self._sources[src]
                    self._logged.discard(src)
                if (n := keys[key.raw] - 1) > 0:
                    keys[key.raw] = n
                else:
                    del keys[key.raw]

        return fair_check


# ------------------------------------------------------------------------------ the node's checks


@dataclass(frozen=True, slots=True)
class Protection:
    """A node's admission checks and rate limits (``AdmissionSettings``), loaded and checked
    before it listens; ``install`` puts them in a running relay."""

    allow_list: AllowList | None = None
    verify: VerifyClientURL | None = None
    rate_config_path: Path | None = None
    tailscaled: VerifyClientURL | None = None  # --verify-clients: derpd.node.load_protection sets it

    @classmethod
    def from_settings(cls, settings: AdmissionSettings) -> Protection:
        """Load the allow-list and the rate limits and check the verify URL (``tailscaled``,
        for ``--verify-clients``, is added by ``derpd.node``: ``derpd.localapi`` sits above this
        module).

        Raises:
            SettingsError: an unreadable or malformed file, or a bad URL.
        """
        from .ratelimit import load_rate_config

        allow = None
        if settings.allow_keys is not None:
            allow = AllowList(settings.allow_keys)
            allow.load()
        verify = None
        if settings.verify_client_url:
            verify = VerifyClientURL(settings.verify_client_url, fail_open=settings.verify_client_url_fail_open)
        if settings.rate_config is not None:
            load_rate_config(settings.rate_config)  # fail now, not at the first SIGHUP
        return cls(allow, verify, settings.rate_config)

    def install(self, server: Any, nursery: trio.Nursery) -> None:
        """Add the checks to ``server.admission_checks`` (allow-list first: it is cheaper), the
        reloads to ``server.reload_hooks`` (SIGHUP), and start the file and open-files watches."""
        from .ratelimit import load_rate_config, watch_open_files

        if self.allow_list is not None:
            server.admission_checks.append(self.allow_list.check)
            server.reload_hooks.append(self.allow_list.reload)
            nursery.start_soon(self.allow_list.watch)
            log.info("admission: %d keys allowed by %s", len(self.allow_list.keys), self.allow_list.path)
        for verify in (self.tailscaled, self.verify):  # tailscaled first, as derper
            if verify is not None:
                server.admission_checks.append(FairShare().wrap(verify.check))
                verify.on_fail_open = server.note_admission_fail_open
                log.info("admission: asking %s (fail-open %s)", verify.url, verify.fail_open)
        if self.rate_config_path is not None:
            limits = server.client_rate_limits
            limits.path = self.rate_config_path
            limits.set(load_rate_config(self.rate_config_path))
            server.reload_hooks.append(limits.reload)
        nursery.start_soon(watch_open_files)

