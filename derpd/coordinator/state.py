"""The coordinator's live state: which nodes exist, how healthy they are, and the map.

Theory of operation
-------------------
Nodes come from two sources: the config file (*static*, replaced as a whole on reload)
and ``POST /v1/nodes`` (*registered*, kept alive by heartbeats and dropped ``node_ttl``
seconds after the last one).  Each node has a health record fed by the prober:

    unknown --probe ok--> up --probe failed--> down --probe ok--> up

``unknown`` counts as healthy, so a fresh coordinator publishes its config at once.
The published map holds, per region, the nodes that are not ``down``.  When every node
of a region is down, the region keeps all its nodes (``keep_region_when_down``, the
default) instead of vanishing, so clients homed there still have something to retry and
peers stay reachable once it recovers; with the option off the region leaves the map.
Regions without nodes are left out.

Every change (registration of something new, a probe result that flips health, expiry,
reload) rebuilds the map once; the JSON and YAML bytes and the ETag are computed then,
so serving the map is a dict lookup.  Methods are synchronous and take ``now`` (trio's
clock) explicitly, so tests can drive time.  ``changed`` is a trio-free hook list so the
ASGI layer can wake waiters.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from .config import CoordinatorConfig
from .metrics import PROBE_KINDS, CoordinatorMetrics
from .model import DerpMap, DerpNode, DerpRegion
from .registration import Registration, RegistrationError
from .yamlout import to_yaml

log = logging.getLogger("derpd.coordinator")


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One probe round of one node.

    ``latency`` maps a probe kind (``https``, ``derp``, ``stun``) to seconds for the
    kinds that succeeded; ``failed`` maps kinds that failed to their error text;
    ``skipped`` lists kinds that do not apply (e.g. STUN on a node with ``STUNPort -1``).
    """

    at: float
    latency: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def error(self) -> str:
        return "; ".join(f"{k}: {v}" for k, v in self.failed.items())


@dataclass(slots=True)
class NodeEntry:
    node: DerpNode
    source: str  # "static" | "registered"
    public_key: str = ""
    last_seen: float = 0.0  # trio clock, registered nodes only
    registered_at_wall: float = 0.0
    status: str = "unknown"  # "unknown" | "up" | "down"
    history: deque[ProbeResult] = field(default_factory=deque)
    last_success_wall: float | None = None
    last_error: str = ""
    last_error_wall: float | None = None


@dataclass(frozen=True, slots=True)
class PublishedMap:
    dmap: DerpMap
    json: bytes
    yaml: bytes
    etag: str


class CoordinatorState:
    """Nodes, health and the published map.  Not thread-safe; use from one trio task tree."""

    def __init__(self, config: CoordinatorConfig, *, metrics: CoordinatorMetrics | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        self.metrics = metrics or CoordinatorMetrics()
        self._wall = wall
        self.config = config
        self._regions: dict[int, DerpRegion] = {}  # static region metadata (nodes=())
        self._registered_regions: dict[int, DerpRegion] = {}
        self.entries: dict[str, NodeEntry] = {}
        self.listeners: list[Callable[[], None]] = []
        self.on_new_node: Callable[[], None] | None = None
        self.published: PublishedMap
        self._install_static(config)
        self._rebuild()

    # ---- sources -------------------------------------------------------------------

    def _install_static(self, config: CoordinatorConfig) -> None:
        self._regions = {r.region_id: replace(r, nodes=()) for r in config.static_map.regions}
        old = self.entries
        entries: dict[str, NodeEntry] = {}
        for node in config.static_map.nodes():
            prev = old.get(node.name)
            if prev is not None and prev.source == "static" and prev.node == node:
                entries[node.name] = prev  # unchanged: keep its health
            else:
                entries[node.name] = NodeEntry(node, "static")
        for name, entry in old.items():
            if entry.source == "registered":
                if name in entries:
                    log.warning("registered node %s is now defined in the config; the config wins", name)
                    continue
                entries[name] = entry
        for name, entry in old.items():
            if name not in entries or entries[name] is not entry:
                self.metrics.forget_node(name, entry.node.region_id)
        self.entries = entries

    def reload(self, config: CoordinatorConfig) -> None:
        """Replaces the static nodes and the settings; registered nodes and health stay."""
        self.config = config
        self._install_static(config)
        self.metrics.reloads.labels("ok").inc()
        self._rebuild()

    def register(self, reg: Registration, now: float) -> bool:
        """Adds or refreshes a self-registered node.

        Returns:
            True if the node is new or changed, False for a plain heartbeat.
        Raises:
            RegistrationError: 409 for a name/region conflict, 429 for a too-fast heartbeat
            or when ``max_registered_nodes`` is reached.
        """
        node = reg.node
        rid = node.region_id
        region = self._regions.get(rid) or self._registered_regions.get(rid)
        if region is not None and reg.region_code and reg.region_code != region.region_code:
            raise RegistrationError(
                409, f"region {rid} has code {region.region_code!r}, not {reg.region_code!r}; "
                     "fix --region-code or --region-id", "RegionCode")
        if region is None and not reg.region_code:
            raise RegistrationError(
                400, f"region {rid} is not in the coordinator's config; give RegionCode (--region-code) "
                     "to create it", "RegionCode")
        entry = self.entries.get(node.name)
        if entry is not None and entry.source == "static":
            raise RegistrationError(
                409, f"node name {node.name!r} is taken by a node in the coordinator's config; "
                     "pick another --node-name", "Name")
        if entry is not None and now - entry.last_seen < self.config.min_heartbeat_interval:
            raise RegistrationError(
                429, f"heartbeats from {node.name!r} come too fast; send at most one every "
                     f"{self.config.min_heartbeat_interval:g} s")
        if entry is None and self._registered_count() >= self.config.max_registered_nodes:
            raise RegistrationError(
                429, f"the coordinator already has {self.config.max_registered_nodes} registered nodes "
                     "(max_registered_nodes)")
        if region is None:
            region = DerpRegion(rid, reg.region_code, reg.region_name or reg.region_code)
            self._registered_regions[rid] = region
            log.info("region %d (%s) created by registration of %s", rid, reg.region_code, node.name)
        if entry is not None:
            entry.last_seen = now
            if entry.node == node and entry.public_key == reg.public_key:
                return False
            if entry.node.region_id != rid:
                self.metrics.forget_node(node.name, entry.node.region_id)
            log.info("registered node %s changed: %s", node.name, node.to_json())
            entry.node = node
            entry.public_key = reg.public_key
            entry.status = "unknown"
        else:
            self.entries[node.name] = NodeEntry(node, "registered", reg.public_key, now, self._wall())
            log.info("node %s registered in region %d (%s:%d)", node.name, rid, node.host_name,
                     node.derp_port or 443)
        self._rebuild()
        if self.on_new_node is not None:
            self.on_new_node()
        return True

    def _registered_count(self) -> int:
        return sum(1 for e in self.entries.values() if e.source == "registered")

    def expire(self, now: float) -> list[str]:
        """Drops registered nodes whose last heartbeat is older than ``node_ttl``.

        Returns:
            The names dropped.
        """
        dead = [name for name, e in self.entries.items()
                if e.source == "registered" and now - e.last_seen > self.config.node_ttl]
        for name in dead:
            entry = self.entries.pop(name)
            self.metrics.expired.inc()
            self.metrics.forget_node(name, entry.node.region_id)
            log.info("node %s dropped: no heartbeat for %.0f s (node_ttl)", name, now - entry.last_seen)
        if dead:
            live = {e.node.region_id for e in self.entries.values()}
            for rid in list(self._registered_regions):
                if rid not in live:
                    del self._registered_regions[rid]
            self._rebuild()
        return dead

    # ---- health --------------------------------------------------------------------

    def probe_targets(self) -> list[DerpNode]:
        """Returns the nodes to probe now."""
        return [e.node for e in self.entries.values()]

    def record_probe(self, node: DerpNode, result: ProbeResult) -> None:
        """Records one probe round; rebuilds the map when the node's health flips."""
        entry = self.entries.get(node.name)
        if entry is None or entry.node != node:
            return  # the node left or changed while it was being probed
        entry.history.append(result)
        while len(entry.history) > self.config.history:
            entry.history.popleft()
        region = str(node.region_id)
        m = self.metrics
        for kind in PROBE_KINDS:
            if kind in result.latency:
                m.probe_success.labels(node.name, region, kind).set(1)
                m.probe_latency.labels(node.name, kind).observe(result.latency[kind])
            elif kind in result.failed:
                m.probe_success.labels(node.name, region, kind).set(0)
        new_status = "up" if result.ok else "down"
        if result.ok:
            entry.last_success_wall = result.at
            m.probe_last_success.labels(node.name).set(result.at)
        else:
            entry.last_error = result.error
            entry.last_error_wall = result.at
        m.node_up.labels(node.name, region).set(1 if result.ok else 0)
        if new_status != entry.status:
            old, entry.status = entry.status, new_status
            if new_status == "down":
                log.warning("node %s is down: %s", node.name, result.error)
            elif old == "down":
                log.info("node %s is up again", node.name)
            self._rebuild()

    # ---- the published map ---------------------------------------------------------

    def region_meta(self) -> dict[int, DerpRegion]:
        return {**self._registered_regions, **self._regions}

    def _rebuild(self) -> None:
        regions: list[DerpRegion] = []
        by_region: dict[int, list[NodeEntry]] = {}
        for entry in self.entries.values():
            by_region.setdefault(entry.node.region_id, []).append(entry)
        for rid, meta in sorted(self.region_meta().items()):
            members = by_region.get(rid, [])
            healthy = [e.node for e in members if e.status != "down"]
            if healthy:
                nodes = healthy
            elif self.config.keep_region_when_down:
                nodes = [e.node for e in members]  # all down: keep them all rather than vanish
            else:
                nodes = []
            if nodes:
                regions.append(replace(meta, nodes=tuple(nodes)))
        dmap = DerpMap(tuple(regions), omit_default_regions=self.config.static_map.omit_default_regions)
        body = dmap.to_json_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        prev = getattr(self, "published", None)
        if prev is not None and prev.etag == etag:
            return
        self.published = PublishedMap(dmap, body, to_yaml(dmap).encode(), etag)
        self.metrics.published_regions.set(len(regions))
        self.metrics.published_nodes.set(sum(len(r.nodes) for r in regions))
        if prev is not None:
            log.info("map changed: %d regions, %d nodes", len(regions), sum(len(r.nodes) for r in regions))
        for callback in list(self.listeners):
            callback()

    # ---- status --------------------------------------------------------------------

    def status(self, now: float) -> dict[str, Any]:
        """Returns the ``/status.json`` document."""
        published = {n.name for n in self.published.dmap.nodes()}
        regions = []
        meta = self.region_meta()
        by_region: dict[int, list[NodeEntry]] = {}
        for entry in self.entries.values():
            by_region.setdefault(entry.node.region_id, []).append(entry)
        for rid in sorted(set(meta) | set(by_region)):
            r = meta.get(rid)
            nodes = []
            for e in by_region.get(rid, []):
                last = e.history[-1] if e.history else None
                nodes.append({
                    "name": e.node.name,
                    "source": e.source,
                    "status": e.status,
                    "published": e.node.name in published,
                    "host": e.node.host_name,
                    "derp_port": e.node.derp_port or 443,
                    "stun_port": e.node.stun_port or 3478,
                    "public_key": e.public_key,
                    "latency_ms": {k: round(v * 1000, 3) for k, v in last.latency.items()} if last else {},
                    "history": [{"at": h.at, "ok": h.ok,
                                 "ms": round(max(h.latency.values()) * 1000, 3) if h.latency else None}
                                for h in e.history],
                    "last_success": e.last_success_wall,
                    "last_error": e.last_error,
                    "last_error_at": e.last_error_wall,
                    "expires_in": (round(self.config.node_ttl - (now - e.last_seen), 1)
                                   if e.source == "registered" else None),
                    "node": e.node.to_json(),
                })
            regions.append({
                "id": rid,
                "code": r.region_code if r else "",
                "name": r.region_name if r else "",
                "published": any(n["published"] for n in nodes),
                "nodes": nodes,
            })
        return {
            "generated_at": self._wall(),
            "etag": self.published.etag,
            "probe_interval": self.config.probe_interval,
            "regions": regions,
        }
