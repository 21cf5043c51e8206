"""derper's ``/bootstrap-dns``: names resolved in the background, answered from memory.

Tailscale clients whose own DNS is broken ask a DERP relay for the addresses of names they
need (the control server, usually).  As derper (cmd/derper/bootstrap_dns.go):

* ``--bootstrap-dns-names a,b``: resolved at start and every 10 minutes (each round bounded by
  one minute); the answer to every request is the JSON object name -> list of IP strings,
  written as Go's ``json.MarshalIndent(m, "", "\\t")`` (keys sorted), each name's addresses
  shuffled per round.  A name that does not resolve is left out (and logged); before the
  first round, or with no published names, the body is empty.
* ``--unpublished-bootstrap-dns-names c``: resolved the same way, never listed; a request with
  ``?q=c`` gets ``{"c": [...]}`` alone.  Any other ``q`` gets the published list.  derper's
  rollout form ``name/txtname`` (a percentage in a TXT record) is refused at start-up: derpd
  does not look up TXT records.

Lookups go through ``trio.socket.getaddrinfo`` one name at a time; the answer body is built
once per round, so a request costs a dictionary look-up.  ``collect`` exports
``derp_bootstrap_dns_requests_total{answer}``, ``derp_bootstrap_dns_lookup_failures_total`` and
``derp_bootstrap_dns_names{list}`` (names resolved in the last round).
"""

from __future__ import annotations

import json
import logging
import random
import socket
from collections.abc import Awaitable, Callable, Iterable, Iterator

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .settings import SettingsError

log = logging.getLogger("derpd.bootstrapdns")

REFRESH_INTERVAL = 600.0  # derper: every 10 minutes
REFRESH_TIMEOUT = 60.0  # derper: refreshTimeout, for a whole round
MAX_NAMES = 256

Resolver = Callable[[str], Awaitable[list[str]]]


def parse_names(flag: str, value: str) -> tuple[str, ...]:
    """A comma-separated name list, as derper splits it (empty entries dropped).

    Raises:
        SettingsError: a ``name/txtname`` rollout entry, or too many names.
    """
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    for name in names:
        if "/" in name:
            raise SettingsError(f"{flag}: {name!r} asks for a TXT-record rollout percentage, which derpd does "
                                "not support; list the name without '/...'")
    if len(names) > MAX_NAMES:
        raise SettingsError(f"{flag}: at most {MAX_NAMES} names")
    return names


def go_json(ips: dict[str, list[str]]) -> bytes:
    """Go's ``json.MarshalIndent(map[string][]net.IP, "", "\\t")``: sorted keys, tab indents."""
    return json.dumps(ips, indent="\t", sort_keys=True).encode()


async def getaddrinfo_ips(name: str) -> list[str]:
    """Every address of ``name`` (IPv4 and IPv6, as Go's ``LookupIP("ip", name)``), without repeats."""
    infos = await trio.socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    seen: dict[str, None] = {}
    for info in infos:
        seen.setdefault(str(info[4][0]).split("%", 1)[0], None)
    return list(seen)


class BootstrapDNS:
    """The resolved names and the answers built from them."""

    def __init__(self, published: Iterable[str] = (), unpublished: Iterable[str] = (), *,
                 resolve: Resolver = getaddrinfo_ips, interval: float = REFRESH_INTERVAL,
                 timeout: float = REFRESH_TIMEOUT) -> None:
        self.published = tuple(published)
        self.unpublished = tuple(unpublished)
        self.resolve = resolve
        self.interval = interval
        self.timeout = timeout
        self.published_body = b""  # derper's dnsCacheBytes: empty until the first round
        self.published_count = 0
        self.unpublished_ips: dict[str, list[str]] = {}
        self.requests = 0
        self.unpublished_answers = 0
        self.lookup_failures = 0
        self.rounds = 0

    def answer(self, query: str, ip: str) -> bytes:
        """The body for one request (``query`` is the ``q`` parameter, "" when absent)."""
        self.requests += 1
        ips = self.unpublished_ips.get(query) if query else None
        if ips:
            self.unpublished_answers += 1
            return go_json({query: ips})
        return self.published_body

    async def _lookup_all(self, names: tuple[str, ...], found: dict[str, list[str]]) -> None:
        for name in names:
            try:
                ips = await self.resolve(name)
            except OSError as e:
                self.lookup_failures += 1
                log.warning("bootstrap DNS lookup %r: %s", name, e.strerror or e)
                continue
            if ips:
                found[name] = ips

    async def refresh(self) -> None:
        """One round: resolve every name (bounded by ``timeout``), then swap the answers in.  A
        round cut short keeps what it resolved so far, as derper's context deadline does."""
        published: dict[str, list[str]] = {}
        unpublished: dict[str, list[str]] = {}
        with trio.move_on_after(self.timeout) as scope:
            await self._lookup_all(self.published, published)
            await self._lookup_all(self.unpublished, unpublished)
        if scope.cancelled_caught:
            log.warning("bootstrap DNS: lookups did not finish within %gs", self.timeout)
        if self.published:
            for ips in published.values():
                random.shuffle(ips)  # derper: so clients do not all prefer the same address
            self.published_body = go_json(published) if published else b"null"  # Go: a nil map
            self.published_count = len(published)
        if self.unpublished:
            self.unpublished_ips = unpublished
        self.rounds += 1

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """prometheus-client collector (registered on the relay's metrics registry)."""
        requests = CounterMetricFamily("derp_bootstrap_dns_requests", "/bootstrap-dns requests, by answer.",
                                       labels=["answer"])
        requests.add_metric(["published"], self.requests - self.unpublished_answers)
        requests.add_metric(["unpublished"], self.unpublished_answers)
        yield requests
        yield CounterMetricFamily("derp_bootstrap_dns_lookup_failures", "Bootstrap DNS names that did not resolve.",
                                  value=self.lookup_failures)
        names = GaugeMetricFamily("derp_bootstrap_dns_names", "Bootstrap DNS names resolved in the last round.",
                                  labels=["list"])
        names.add_metric(["published"], self.published_count)
        names.add_metric(["unpublished"], len(self.unpublished_ips))
        yield names

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Refresh now and every ``interval``, forever; ``task_status`` after the first round."""
        await self.refresh()
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            await self.refresh()
