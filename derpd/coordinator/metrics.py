"""Prometheus metrics of one coordinator, in their own registry (served at ``/metrics``).

A registry per coordinator keeps tests that run several coordinators in one process
independent.  Label values come from closed sets, except ``node`` and ``region``, which
are bounded by the config plus ``max_registered_nodes``; a node's series are removed
when the node leaves.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Probe kinds: the ``probe`` label.
PROBE_KINDS = ("https", "derp", "stun")

#: Results of POST /v1/nodes: the ``result`` label.
REGISTRATION_RESULTS = (
    "created", "refreshed", "unauthorized", "bad_request", "too_large", "slow_body", "truncated",
    "forbidden", "conflict", "rate_limited", "full", "disabled", "draining",
)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class CoordinatorMetrics:
    """Every ``derpd_coordinator_*`` metric."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
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
        self.expired = Counter(
            "derpd_coordinator_nodes_expired", "Registered nodes dropped after their TTL.", registry=r)
        self.reloads = Counter(
            "derpd_coordinator_config_reloads", "Config reloads by result.", ["result"], registry=r)
        for result in ("ok", "error"):
            self.reloads.labels(result)
        self.map_requests = Counter(
            "derpd_coordinator_map_requests", "Map requests by format and response status.",
            ["format", "status"], registry=r)

    def forget_node(self, name: str, region: int) -> None:
        """Removes a departed node's series."""
        for probe in PROBE_KINDS:
            _remove(self.probe_success, name, str(region), probe)
            _remove(self.probe_latency, name, probe)
        _remove(self.probe_last_success, name)
        _remove(self.node_up, name, str(region))


def _remove(metric: Gauge | Histogram, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass
