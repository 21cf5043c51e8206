"""Prometheus metrics of one coordinator, in their own registry (served at ``/metrics``).

A registry per coordinator keeps tests that run several coordinators in one process
independent; it holds the process and Python collectors too, and nothing else of the
process (no ``stun_*`` of a STUN server that does not run here).  Label values come from
closed sets, pre-created at zero, except ``node`` and ``region``, which are bounded by the
config plus ``max_registered_nodes``; a node's series are removed when the node leaves.
No ``*_created`` series: nothing derpd serves has them.
"""

from __future__ import annotations

from prometheus_client import (GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry, Counter,
                               Gauge, Histogram, disable_created_metrics)

from ..metrics import build_info

disable_created_metrics()

#: Probe kinds: the ``probe`` label.
PROBE_KINDS = ("https", "derp", "stun")

#: Map formats and the statuses a map request is answered with: the ``format`` and ``status`` labels.
MAP_FORMATS = ("json", "yaml")
MAP_STATUSES = ("200", "304")

#: Results of POST /v1/nodes: the ``result`` label.
REGISTRATION_RESULTS = (
    "created", "refreshed", "unauthorized", "bad_request", "too_large", "slow_body", "truncated",
    "forbidden", "conflict", "rate_limited", "full", "disabled", "out_of_scope", "draining",
)

#: Why a request's token was refused: the ``reason`` label of ``auth_refusals``.
AUTH_REFUSALS = ("missing", "wrong", "region", "node", "disabled")

#: Why a proxy header was refused or ignored: the ``reason`` label of ``proxy_refusals``.
PROXY_REFUSALS = ("proxy_header_untrusted", "proxy_header", "eof", "timeout", "forwarded_untrusted")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class CoordinatorMetrics:
    """Every ``derpd_coordinator_*`` metric."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)
        r.register(_BuildInfo())  # type: ignore[arg-type]
        self.probe_success = Gauge(
            "derpd_coordinator_probe_success",
            "1 if the node's last probe of this kind succeeded, else 0.",
            ["node", "region", "probe"], registry=r)
        self.probe_latency = Histogram(
            "derpd_coordinator_probe_latency_seconds",
            "Latency of successful probes.",
            ["node", "probe"], buckets=_LATENCY_BUCKETS, registry=r)
        self.probe_last_success = Gauge(
            "derpd_coordinator_probe_last_success_timestamp_seconds",
            "Unix time of the node's last fully successful probe round.",
            ["node"], registry=r)
        self.node_up = Gauge(
            "derpd_coordinator_node_up",
            "1 if the node is healthy (or not probed yet), 0 if it is down.",
            ["node", "region"], registry=r)
        self.published_nodes = Gauge(
            "derpd_coordinator_published_nodes", "Nodes in the published map.", registry=r)
        self.published_regions = Gauge(
            "derpd_coordinator_published_regions", "Regions in the published map.", registry=r)
        self.registrations = Counter(
            "derpd_coordinator_registrations", "POST /v1/nodes requests by result.", ["result"], registry=r)
        for result in REGISTRATION_RESULTS:
            self.registrations.labels(result)
        self.auth_refusals = Counter(
            "derpd_coordinator_auth_refusals",
            "Registrations refused for their token: missing, wrong, outside its regions or nodes, "
            "or registration disabled.", ["reason"], registry=r)
        for reason in AUTH_REFUSALS:
            self.auth_refusals.labels(reason)
        self.proxy_refusals = Counter(
            "derpd_coordinator_proxy_refusals",
            "Proxy headers refused: a PROXY header from an address outside --trusted-proxies "
            "(proxy_header_untrusted), none or a bad one from a trusted proxy (proxy_header), none in "
            "time (timeout), or X-Forwarded-For from an untrusted peer, ignored (forwarded_untrusted).",
            ["reason"], registry=r)
        for reason in PROXY_REFUSALS:
            self.proxy_refusals.labels(reason)
        self.tls_reloads = Counter(
            "derpd_coordinator_tls_reloads", "Certificate reloads by result.", ["result"], registry=r)
        for result in ("ok", "error"):
            self.tls_reloads.labels(result)
        self.expired = Counter(
            "derpd_coordinator_nodes_expired", "Registered nodes dropped after their TTL.", registry=r)
        self.reloads = Counter(
            "derpd_coordinator_config_reloads", "Config reloads by result.", ["result"], registry=r)
        for result in ("ok", "error"):
            self.reloads.labels(result)
        self.map_requests = Counter(
            "derpd_coordinator_map_requests", "Map requests by format and response status.",
            ["format", "status"], registry=r)
        for fmt in MAP_FORMATS:
            for status in MAP_STATUSES:
                self.map_requests.labels(fmt, status)

    def forget_node(self, name: str, region: int) -> None:
        """Removes a departed node's series."""
        for probe in PROBE_KINDS:
            _remove(self.probe_success, name, str(region), probe)
            _remove(self.probe_latency, name, probe)
        _remove(self.probe_last_success, name)
        _remove(self.node_up, name, str(region))


class _BuildInfo:
    """``derpd_build_info``, as the relay exports it."""

    def collect(self) -> list:
        return [build_info()]


def _remove(metric: Gauge | Histogram, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass
