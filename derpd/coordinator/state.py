"""The coordinator's live state: which nodes exist, how healthy they are, and the map.

Theory of operation
-------------------
Nodes come from two sources: the config file (*static*, replaced as a whole on reload)
and ``POST /v1/nodes`` (*registered*, kept alive by heartbeats and dropped ``node_ttl``
seconds after the last one).  Each node has a health record fed by the prober:

    unknown --ok--> up --2 x failed--> down --2 x ok--> up      (unknown --2 x failed--> down)

Health changes only when two consecutive probe rounds agree, so one lost probe does not
make a node flap; a probe that finds another relay than the one registered (its DERP
server key differs from the registration's ``PublicKey``) marks it down at once.
``unknown`` counts as healthy, so a fresh coordinator publishes its config at once.

Registrations, their health and the last published map are written to a state file
(:class:`derpd.coordinator.persist.StateStore`) whenever they change.  After a restart
the registered nodes come back at once, each kept for ``node_ttl`` from the start even
before its first heartbeat, so the map a restarted coordinator serves is the one it
served before, not an empty one that fills as heartbeats arrive.
The published map holds, per region, the nodes that are not ``down``.  When every node
of a region is down, the region keeps all its nodes (``keep_region_when_down``, the
default) instead of vanishing, so clients homed there still have something to retry and
peers stay reachable once it recovers; with the option off the region leaves the map.
Regions without nodes are left out.

A relay about to stop for maintenance registers with ``Draining: true``: the node leaves
the published map at once while the region has another healthy node that is not
draining; when it is the region's last one, the region stays with its draining nodes and
``NoMeasureNoHome: true``, so clients pick another home but still reach peers homed there.
A registration without ``Draining`` from a node that was draining (the relay is back)
makes it ``down``: it is published again after two good probe rounds, like any node that
recovers.

Every change (registration of something new, a probe result that flips health, expiry,
reload) rebuilds the map once; the JSON and YAML bytes and the ETag are computed then,
so serving the map is a dict lookup.  The bytes depend only on the state, never on the
order in which registrations arrived (config nodes keep their config order, registered
nodes follow sorted by name), so replicas with the same state serve the same bytes and
the same ETag.  Methods are synchronous and take ``now`` (trio's
clock) explicitly, so tests can drive time.  ``changed`` is a trio-free hook list so the
ASGI layer can wake waiters.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from .config import CoordinatorConfig, TokenScope
from .metrics import PROBE_KINDS, CoordinatorMetrics
from .model import DerpMap, DerpNode, DerpRegion
from .persist import StateStore
from .registration import Registration, RegistrationError
from .yamlout import to_yaml

log = logging.getLogger("derpd.coordinator")

#: Changed registrations a node may send back to back (then one per min_heartbeat_interval).
CHANGE_BURST = 3.0


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One probe round of one node.

    ``latency`` maps a probe kind (``https``, ``derp``, ``stun``) to seconds for the
    kinds that succeeded; ``failed`` maps kinds that failed to their error text and
    ``classes`` to a short failure class (``timeout``, ``refused``, ``tls``, ...: what
    anonymous viewers of the status page see); ``skipped`` lists kinds that do not
    apply (e.g. STUN on a node with ``STUNPort -1``); ``notes`` holds kinds that neither
    passed nor failed (a DERP probe refused by the relay's admission).  ``fatal`` marks
    a result that must take effect at once (the relay is not the one registered).
    """

    at: float
    latency: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()
    classes: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    fatal: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def error(self) -> str:
        return "; ".join(f"{k}: {v}" for k, v in self.failed.items())

    @property
    def error_class(self) -> str:
        return "; ".join(f"{k}: {self.classes.get(k, 'failed')}" for k in self.failed)


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    """What the prober may dial for one node, and what it must find there.

    ``dial`` is the only address the HTTPS and DERP probes connect to and ``stun`` the
    only one STUN goes to: for registered nodes these are addresses the registration was
    allowed to name (see :func:`address_problem`), never a name resolved at probe time.
    ``public_key`` is the key the registration claims (``nodekey:...``; empty: not
    checked) and ``mesh_key`` the key the DERP probe logs in with (None: as a plain client).
    """

    node: DerpNode
    dial: str
    stun: str
    public_key: str = ""
    mesh_key: bytes | None = field(default=None, repr=False)


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
    last_error_class: str = ""
    last_error_wall: float | None = None
    source_addr: str = ""  # where the registration came from (registered nodes)
    restored: bool = False  # loaded from the state file, no heartbeat since the start
    last_change: float = 0.0  # trio clock of the last registration that changed the entry
    change_tokens: float = 3.0  # changed registrations allowed now (see CoordinatorState.register)
    streak: int = 0  # consecutive probe results that disagree with ``status``
    note: str = ""  # e.g. "DERP probe refused by admission"
    draining: bool = False  # the relay announced maintenance (registration with "Draining": true)


@dataclass(frozen=True, slots=True)
class PublishedMap:
    dmap: DerpMap
    json: bytes
    yaml: bytes
    etag: str


def address_problem(text: str, allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
                    allow_loopback: bool = False) -> str | None:
    """Returns why a registration may not make the prober dial the IP literal ``text``, or None.

    Allowed: public (globally routable) addresses, addresses inside a ``probe_allow``
    network, and loopback with ``allow_loopback_nodes`` (``derpd dev``).  Where the
    registration comes from never matters: behind a proxy on the same host that is loopback.
    """
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None  # not an IP literal ("" or "none", or a DNS name in HostName)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if any(addr in net for net in allow):
        return None
    if addr.is_loopback:
        if allow_loopback:
            return None
        return (f"{addr} is a loopback address, allowed only with allow_loopback_nodes = true in the "
                "coordinator's config (derpd dev); advertise a public address")
    if addr.is_global and not addr.is_multicast:
        return None
    return (f"{addr} is not a public address; the coordinator probes only public addresses unless its "
            "config lists the network in coordinator.probe_allow")


class CoordinatorState:
    """Nodes, health and the published map.  Not thread-safe; use from one trio task tree.

    With a ``store``, the registrations and the map are loaded from it at once (``now`` is
    the start time on trio's clock) and saved to it whenever they change.
    """

    def __init__(self, config: CoordinatorConfig, *, metrics: CoordinatorMetrics | None = None,
                 wall: Callable[[], float] = time.time, store: StateStore | None = None,
                 now: float = 0.0) -> None:
        self.metrics = metrics or CoordinatorMetrics()
        self._wall = wall
        self.config = config
        self.store = store
        self._saved: bytes = b""
        self._regions: dict[int, DerpRegion] = {}  # static region metadata (nodes=())
        self._registered_regions: dict[int, DerpRegion] = {}
        self.entries: dict[str, NodeEntry] = {}
        self.listeners: list[Callable[[], None]] = []
        self.on_new_node: Callable[[], None] | None = None
        self.published: PublishedMap
        self._restored_down: set[str] = set()  # config nodes that were down when the state was saved
        self.started_at = now
        self.restored = False  # True when the state file was read at start
        if store is not None:
            doc = store.load()
            if doc is not None:
                self._restore(doc, now)
                self.restored = True
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
                status = "down" if node.name in self._restored_down else "unknown"
                entries[node.name] = NodeEntry(node, "static", status=status)
        self._restored_down.clear()
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

    def register(self, reg: Registration, now: float, source: str = "", scope: TokenScope | None = None) -> bool:
        """Adds or refreshes a self-registered node; ``source`` is the registrant's IP address
        and ``scope`` the token it came with (None: any region, any node).

        Returns:
            True if the node is new or changed, False for a plain heartbeat.
        Raises:
            RegistrationError: 403 for a node or region outside the token's scope (``reason``
            ``region`` or ``node``; a node registered in another region counts as that region's),
            403 for an address the prober may not be aimed at, 409 for a
            name/region conflict or a name held by another key, 429 for a too-fast heartbeat
            or when ``max_registered_nodes`` is reached.
        """
        node = reg.node
        rid = node.region_id
        if scope is not None:
            held = self.entries.get(node.name)
            for region_id in (rid, held.node.region_id) if held is not None else (rid,):
                refused = scope.refusal(region_id, node.name)
                if refused:
                    raise RegistrationError(403, refused[1], "Name" if refused[0] == "node" else "RegionID",
                                            reason=refused[0])
        allow, loopback = self.config.probe_allow, self.config.allow_loopback_nodes
        for key, value in (("IPv4", node.ipv4), ("IPv6", node.ipv6), ("STUNTestIP", node.stun_test_ip),
                           ("HostName", node.host_name)):
            why = address_problem(value, allow, loopback)
            if why:
                raise RegistrationError(403, why, key)
        if not (_literal(node.ipv4, 4) or _literal(node.ipv6, 6)) and source:
            why = address_problem(source, allow, loopback)  # the prober would dial where it came from
            if why:
                raise RegistrationError(403, f"the registration names no IPv4 or IPv6, so the prober would dial "
                                             f"where it came from, and {why} (--advertise-ipv4)", "IPv4")
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
        if entry is not None and entry.public_key != reg.public_key:
            left = max(0.0, self.config.node_ttl - (now - entry.last_seen))
            raise RegistrationError(
                409, f"node name {node.name!r} is registered with another key until that registration "
                     f"expires (in {left:.0f} s without heartbeats); pick another --node-name", "PublicKey")
        unchanged = (entry is not None and entry.node == node and entry.source_addr == source
                     and entry.draining == reg.draining)
        # A plain heartbeat may come once per min_heartbeat_interval.  A changed entry (a new
        # certificate pin right after a reload) is not a heartbeat: it spends one of a few
        # change tokens, which come back at the same pace.
        if entry is not None and not entry.restored and (
                now - entry.last_seen < self.config.min_heartbeat_interval if unchanged
                else self._change_tokens(entry, now) < 1):
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
            entry.restored = False
            if unchanged:
                return False
            entry.change_tokens = self._change_tokens(entry, now) - 1
            entry.last_change = now
            if entry.node.region_id != rid:
                self.metrics.forget_node(node.name, entry.node.region_id)
            if entry.node != node or entry.source_addr != source:
                log.info("registered node %s changed: %s", node.name, node.to_json())
                entry.status = "unknown"
                entry.streak = 0
                entry.note = ""
            if reg.draining and not entry.draining:
                log.info("node %s is draining for maintenance: out of the map", node.name)
            elif entry.draining and not reg.draining:
                # Back from maintenance: published again once its probes pass (twice in a row).
                log.info("node %s is back from maintenance; published again after its probes pass", node.name)
                entry.status = "down"
                entry.streak = 0
                self.metrics.node_up.labels(node.name, str(rid)).set(0)
            entry.draining = reg.draining
            entry.node = node
            entry.source_addr = source
        else:
            self.entries[node.name] = NodeEntry(node, "registered", reg.public_key, now, self._wall(),
                                                source_addr=source, last_change=now, draining=reg.draining)
            log.info("node %s registered in region %d (%s:%d)%s", node.name, rid, node.host_name,
                     node.derp_port or 443, ", draining" if reg.draining else "")
        self._rebuild(force_save=True)
        if self.on_new_node is not None:
            self.on_new_node()
        return True

    def _change_tokens(self, entry: NodeEntry, now: float) -> float:
        refill = (now - entry.last_change) / self.config.min_heartbeat_interval
        return min(CHANGE_BURST, entry.change_tokens + refill)

    def heartbeat_interval(self) -> float:
        """How often relays are told to heartbeat (in every registration answer): a third of
        ``node_ttl``, so two heartbeats may be lost before a node expires, and never slower than
        the relays' own ``heartbeat_interval``."""
        cfg = self.config
        return max(cfg.min_heartbeat_interval, min(cfg.heartbeat_interval, cfg.node_ttl / 3))

    def ready(self, now: float) -> bool:
        """True once the map is complete: restored from the state file, or registrations are
        off, or every relay has had a heartbeat interval (plus a little) to register."""
        return (self.restored or not self.config.registration_enabled
                or now - self.started_at >= self.heartbeat_interval() + 2.0)

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
            self._rebuild(force_save=True)
        return dead

    # ---- health --------------------------------------------------------------------

    def probe_targets(self) -> list[ProbeTarget]:
        """Returns the nodes to probe now, healthy ones first (so failing nodes cannot delay them)."""
        out = []
        for e in sorted(self.entries.values(), key=lambda e: e.status == "down"):
            node = e.node
            if e.source == "static":
                dial = _literal(node.ipv4, 4) or _literal(node.ipv6, 6) or node.host_name
            else:  # only addresses the registration was allowed to name, or where it came from
                dial = _literal(node.ipv4, 4) or _literal(node.ipv6, 6) or e.source_addr or node.host_name
            out.append(ProbeTarget(node, dial, node.stun_test_ip or dial, e.public_key,
                                   self.config.mesh_key_for(node.region_id)))
        return out

    def record_probe(self, node: DerpNode, result: ProbeResult) -> None:
        """Records one probe round; rebuilds the map when the node's health flips.

        Health flips after two consecutive results that disagree with it (at once for a
        ``fatal`` result); ``unknown`` becomes ``up`` after one good round.
        """
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
        observed = "up" if result.ok else "down"
        if result.ok:
            entry.last_success_wall = result.at
            m.probe_last_success.labels(node.name).set(result.at)
        else:
            entry.last_error = result.error
            entry.last_error_class = result.error_class
            entry.last_error_wall = result.at
        entry.note = "; ".join(result.notes.values())
        if observed == entry.status or (observed == "up" and entry.status == "unknown"):
            entry.streak = 0
            new_status = observed
        else:
            entry.streak += 1
            new_status = observed if entry.streak >= 2 or result.fatal else entry.status
        m.node_up.labels(node.name, region).set(0 if new_status == "down" else 1)
        if new_status != entry.status:
            entry.streak = 0
            old, entry.status = entry.status, new_status
            if new_status == "down":
                log.warning("node %s is down: %s", node.name, result.error)
            elif old == "down":
                log.info("node %s is up again", node.name)
            self._rebuild(force_save=True)

    # ---- the published map ---------------------------------------------------------

    def region_meta(self) -> dict[int, DerpRegion]:
        return {**self._registered_regions, **self._regions}

    def _members(self) -> dict[int, list[NodeEntry]]:
        """Entries per region: config nodes in config order, then registered ones by name."""
        by_region: dict[int, list[NodeEntry]] = {}
        for entry in self.entries.values():
            by_region.setdefault(entry.node.region_id, []).append(entry)
        for members in by_region.values():
            members.sort(key=lambda e: (e.source != "static", e.node.name if e.source != "static" else ""))
        return by_region

    def _rebuild(self, *, force_save: bool = False) -> None:
        regions: list[DerpRegion] = []
        by_region = self._members()
        for rid, meta in sorted(self.region_meta().items()):
            members = by_region.get(rid, [])
            healthy = [e for e in members if e.status != "down"]
            serving = [e.node for e in healthy if not e.draining]
            no_home = meta.no_measure_no_home
            if serving:
                nodes = serving
            elif healthy:  # its last healthy nodes are draining: no new homes, peers stay reachable
                nodes, no_home = [e.node for e in healthy], True
            elif self.config.keep_region_when_down:
                # all down: keep them all rather than vanish (those not draining, if any)
                nodes = [e.node for e in members if not e.draining] or [e.node for e in members]
                no_home = no_home or all(e.draining for e in members)
            else:
                nodes = []
            if nodes:
                regions.append(replace(meta, nodes=tuple(nodes), no_measure_no_home=no_home))
        dmap = DerpMap(tuple(regions), omit_default_regions=self.config.static_map.omit_default_regions)
        body = dmap.to_json_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        prev = getattr(self, "published", None)
        if prev is not None and prev.etag == etag:
            if force_save:
                self._save()
            return
        self.published = PublishedMap(dmap, body, to_yaml(dmap).encode(), etag)
        self.metrics.published_regions.set(len(regions))
        self.metrics.published_nodes.set(sum(len(r.nodes) for r in regions))
        if prev is not None:
            log.info("map changed: %d regions, %d nodes", len(regions), sum(len(r.nodes) for r in regions))
        self._save()
        for callback in list(self.listeners):
            callback()

    # ---- the state file ------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Returns what the state file keeps: registrations, their health and the map."""
        nodes = []
        for name in sorted(self.entries):
            e = self.entries[name]
            if e.source != "registered":
                continue
            nodes.append({"node": e.node.to_json(), "public_key": e.public_key, "source": e.source_addr,
                          "status": e.status, "registered_at": e.registered_at_wall})
            if e.draining:
                nodes[-1]["draining"] = True
        regions = [{"RegionID": r.region_id, "RegionCode": r.region_code, "RegionName": r.region_name}
                   for _, r in sorted(self._registered_regions.items())]
        down = sorted(name for name, e in self.entries.items() if e.source == "static" and e.status == "down")
        return {"version": 1, "regions": regions, "nodes": nodes, "config_nodes_down": down,
                "map": json.loads(self.published.json), "etag": self.published.etag}

    def _save(self) -> None:
        if self.store is None:
            return
        data = json.dumps(self.snapshot(), indent=1, sort_keys=True).encode() + b"\n"
        if data != self._saved and self.store.save(data):
            self._saved = data

    def _restore(self, doc: dict[str, Any], now: float) -> None:
        """Loads registrations from a state document; a bad entry is skipped with one log line."""
        from .registration import parse_registration

        down = doc.get("config_nodes_down", [])
        self._restored_down = {name for name in down if isinstance(name, str)} if isinstance(down, list) else set()
        for raw in doc.get("regions", []):
            try:
                region = DerpRegion(int(raw["RegionID"]), str(raw["RegionCode"]), str(raw["RegionName"]))
            except (KeyError, TypeError, ValueError):
                log.warning("state file: skipping a region entry that is not understood: %.200r", raw)
                continue
            self._registered_regions[region.region_id] = region
        for raw in doc.get("nodes", []):
            try:
                body = dict(raw["node"])
                if raw.get("public_key"):
                    body["PublicKey"] = raw["public_key"]
                reg = parse_registration(json.dumps(body).encode())
                if reg.node.region_id not in self._registered_regions and \
                        reg.node.region_id not in {r.region_id for r in self.config.static_map.regions}:
                    raise RegistrationError(400, "its region is unknown")
                status = "down" if raw.get("status") == "down" else "unknown"
                self.entries[reg.node.name] = NodeEntry(
                    reg.node, "registered", reg.public_key, now, float(raw.get("registered_at") or 0.0),
                    status=status, source_addr=str(raw.get("source") or ""), restored=True,
                    draining=raw.get("draining") is True)
            except (KeyError, TypeError, ValueError, RegistrationError) as exc:
                log.warning("state file: skipping a node entry (%s): %.200r", exc, raw)
        log.info("restored %d registered node(s) from the state file; each is kept for %g s without "
                 "heartbeats", sum(1 for e in self.entries.values() if e.restored), self.config.node_ttl)

    # ---- status --------------------------------------------------------------------

    def status(self, now: float, *, detailed: bool = False) -> dict[str, Any]:
        """Returns the ``/status.json`` document.

        Without ``detailed`` (anonymous viewers) a failure shows as its short class
        (``https: timeout``), never as the socket error, which could tell which ports of an
        address are open.
        """
        published = {n.name for n in self.published.dmap.nodes()}
        regions = []
        meta = self.region_meta()
        by_region = self._members()
        for rid in sorted(set(meta) | set(by_region)):
            r = meta.get(rid)
            nodes = []
            for e in by_region.get(rid, []):
                last = e.history[-1] if e.history else None
                nodes.append({
                    "name": e.node.name,
                    "source": e.source,
                    "status": e.status,
                    "draining": e.draining,
                    "note": e.note,
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
                    "last_error": e.last_error if detailed else e.last_error_class,
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


def _literal(value: str, version: int) -> str | None:
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return None
    return str(addr) if addr.version == version else None
