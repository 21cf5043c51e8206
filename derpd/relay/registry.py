"""Who is connected where: the client registry, duplicate keys, watchers and mesh forwarders.

Every method is synchronous: a check and the change it leads to never have an ``await`` in
between, so the registry needs no lock (design rule 6).

``active`` is the hot-path table: key -> the one connection that receives that key's packets.
``_members`` holds every connection of a key, oldest first and the active one last; a key
with two or more connections is a *duplicate set*, and whichever member last sent a frame is
active ("last writer is active", spec 5.8).

Dependencies: the registry is the lowest layer of ``derpd.relay`` but for ``parking`` (packets
held for a key that is moving), which it uses.  It knows connections only through the
``Member`` interface below and mesh links through ``Forwarder``; it imports nothing from
``client_connection``, ``server``, ``http_front`` or ``listener`` (they import it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import trio

from ..keys import NodePublic
from ..metrics import GaugeSource, RelayStats
from ..protocol.frames import PeerGoneReason, PeerPresentFlags
from ..protocol.messages import encode_peer_gone, encode_peer_present
from .parking import Parking

log = logging.getLogger("derpd.relay")


class Member(Protocol):
    """A local connection as the registry sees it (``client_connection.ClientConnection``).
    ``enqueue`` and ``send_control`` are its send path's (``sendpath.SendPath``), which the
    router and the registry call directly."""

    key: bytes  # the client's public key, raw
    public: NodePublic
    remote_ip: str
    remote_port: int
    present_flags: int
    is_dup: bool  # set by the registry: the key has two or more connections
    saw_src: set[bytes]  # senders whose PeerGone this connection should hear (``watch_peer_gone``)

    def enqueue(self, frame: bytes, disco: bool) -> bool:
        """Queue a ready RecvPacket frame, dropping the oldest when full; True when now full."""
        ...

    def send_control(self, frame: bytes) -> None:
        """Queue a frame that must not be dropped (PeerGone, PeerPresent)."""
        ...


class Forwarder(Protocol):
    """Something that can carry a packet to a mesh peer that holds the destination."""

    congested: bool  # past the high-water mark: senders should wait for ``wait_drained``
    internal: bool  # a link between ``--workers`` of one node, not a mesh peer (left out of metrics)

    def forward(self, src: bytes, dst: bytes, packet: bytes) -> bool:
        """Queue the packet; returns False if it had to be dropped."""
        ...

    async def wait_drained(self) -> None:
        """Return once the queue is below its high-water mark (or the link is down)."""
        ...


class Registry(GaugeSource):
    def __init__(self, stats: RelayStats, server_key: bytes) -> None:
        self.stats = stats
        self.server_key = server_key
        self.active: dict[bytes, Member] = {}
        self._members: dict[bytes, list[Member]] = {}
        self.watchers: set[Member] = set()
        self.forwarders: dict[bytes, list[Forwarder]] = {}
        # src key -> the local connections that received packets from it; drives
        # PeerGone(Disconnected) (5.4/5.5).  Kept by the receivers (``Member.saw_src``,
        # as derper's sawSrc): an entry dies with its receiver or when src leaves the region, so
        # this holds at most one entry per (live receiver, live sender), never history.
        self.peer_gone_watchers: dict[bytes, set[Member]] = {}
        # The client keys of the links between ``--workers`` (derpd.workers): plumbing of one
        # node, left out of the connection, client and watcher gauges.
        self.internal_keys: frozenset[bytes] = frozenset()
        self._changed = trio.Event()
        # Keys whose duplicate set has two live senders (an older member sent after a newer one
        # logged in: a cloned key, not a reconnect whose old connection is dead), and who hears
        # of it: on_cloned(members, True) once, then (remaining, False) when one is left.
        self.cloned: set[bytes] = set()
        self.on_cloned: Callable[[list[Member], bool], None] | None = None
        # Packets for keys that left the region a moment ago, until they log in again (parking.py).
        self.parking = Parking(stats)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        """Wait until the next registration, unregistration or forwarder change."""
        await self._changed.wait()

    def change_event(self) -> trio.Event:
        """The event the next change sets.  Take it *before* checking a condition, then wait
        on it: a change between the check and the wait is not missed."""
        return self._changed

    # ------------------------------------------------------------------ local clients

    def register(self, conn: Member) -> None:
        members = self._members.setdefault(conn.key, [])
        members.append(conn)
        if len(members) > 1:
            self.stats.dup_client_conns += 1
            for m in members:
                m.is_dup = True
            log.info("duplicate connection for %s from %s (%d now)", conn.public.short(), conn.remote_ip,
                     len(members))
            if conn.key in self.cloned and self.on_cloned is not None:
                self.on_cloned([conn], True)
        self.active[conn.key] = conn
        self.stats.current_connections += 1
        self._notify()
        if len(members) == 1:
            self.parking.arrived_here(conn.key, conn, lambda src: self.watch_peer_gone(conn, src))
        if self.watchers:
            frame = encode_peer_present(conn.key, conn.remote_ip, conn.remote_port, conn.present_flags)
            for w in self.watchers:
                if w is not conn:
                    w.send_control(frame)

    def unregister(self, conn: Member) -> None:
        members = self._members.get(conn.key)
        if members is None or conn not in members:
            return
        members.remove(conn)
        self.stats.current_connections -= 1
        self.watchers.discard(conn)
        self._notify()
        if members:
            if len(members) == 1:
                members[0].is_dup = False
                if conn.key in self.cloned:
                    self.cloned.discard(conn.key)
                    if self.on_cloned is not None:
                        self.on_cloned(members, False)
            if self.active.get(conn.key) is conn:
                self.active[conn.key] = members[-1]
            return
        del self._members[conn.key]
        del self.active[conn.key]
        self.cloned.discard(conn.key)
        if self.watchers:
            frame = encode_peer_gone(conn.key, PeerGoneReason.DISCONNECTED)
            for w in self.watchers:
                w.send_control(frame)
        if conn.key not in self.forwarders:
            self.gone_from_region(conn.key)

    def note_activity(self, conn: Member) -> None:
        """A member of a duplicate set sent a frame: it becomes the active one."""
        if self.active.get(conn.key) is not conn:
            members = self._members[conn.key]
            members.remove(conn)
            members.append(conn)
            self.active[conn.key] = conn
            if conn.key not in self.cloned:
                self.cloned.add(conn.key)
                if self.on_cloned is not None:
                    self.on_cloned(list(members), True)

    def connections(self, key: bytes) -> list[Member]:
        return list(self._members.get(key, ()))

    def all_connections(self) -> list[Member]:
        """Every local connection, duplicates included."""
        return [c for conns in self._members.values() for c in conns]

    def watch_peer_gone(self, receiver: Member, src: bytes) -> None:
        """``receiver`` got a packet from ``src``: it hears PeerGone when ``src`` leaves."""
        receiver.saw_src.add(src)
        watchers = self.peer_gone_watchers.get(src)
        if watchers is None:
            self.peer_gone_watchers[src] = {receiver}
        else:
            watchers.add(receiver)

    def forget_receiver(self, receiver: Member) -> None:
        """``receiver`` is gone: drop it from every sender's PeerGone list."""
        watchers_of = self.peer_gone_watchers
        for src in receiver.saw_src:
            watchers = watchers_of.get(src)
            if watchers is not None:
                watchers.discard(receiver)
                if not watchers:
                    del watchers_of[src]
        receiver.saw_src.clear()

    def gone_from_region(self, key: bytes) -> None:
        """``key`` left the region: tell every local client that received from it (5.5), and
        hold packets for it a moment in case it is only moving (``parking``)."""
        self.parking.left(key)
        watchers = self.peer_gone_watchers.pop(key, None)
        if not watchers:
            return
        frame = encode_peer_gone(key, PeerGoneReason.DISCONNECTED)
        for c in watchers:
            c.saw_src.discard(key)
            c.send_control(frame)
            self.stats.peer_gone_sent["disconnected"] += 1

    # ------------------------------------------------------------------ mesh

    def add_watcher(self, conn: Member) -> None:
        """Flood PeerPresent for every local key, then stream changes (spec 6.2)."""
        if conn.key == self.server_key:
            return
        for members in self._members.values():
            m = members[-1]
            conn.send_control(encode_peer_present(m.key, m.remote_ip, m.remote_port, m.present_flags))
        self.watchers.add(conn)

    def add_forwarder(self, key: bytes, fwd: Forwarder) -> None:
        fwds = self.forwarders.setdefault(key, [])
        if fwd not in fwds:
            fwds.append(fwd)
            self._notify()
            if key not in self._members:
                self.parking.arrived_elsewhere(key, fwd)

    def remove_forwarder(self, key: bytes, fwd: Forwarder) -> None:
        fwds = self.forwarders.get(key)
        if not fwds or fwd not in fwds:
            return
        fwds.remove(fwd)
        self._notify()
        if not fwds:
            del self.forwarders[key]
            if key not in self._members:
                self.gone_from_region(key)

    # ------------------------------------------------------------------ gauges

    def internal_connections(self) -> int:
        """Local connections of the links between ``--workers`` (``internal_keys``)."""
        return sum(len(self._members.get(k, ())) for k in self.internal_keys)

    def gauge_values(self) -> dict[str, tuple[str, float]]:
        internal = self.internal_keys
        dup_keys = [m for k, m in self._members.items() if len(m) > 1 and k not in internal]
        local = len(self._members) - sum(1 for k in internal if k in self._members)
        remote = sum(1 for k, fwds in self.forwarders.items() if k not in self._members and k not in internal
                     and any(not getattr(f, "internal", False) for f in fwds))
        return {
            "derp_clients_local": ("Distinct keys with local connections.", local),
            "derp_clients_remote": ("Distinct keys known only through mesh peers.", remote),
            "derp_clients": ("Distinct keys known in the region (local and through mesh peers).", local + remote),
            "derp_current_dup_client_keys": ("Keys with two or more connections.", len(dup_keys)),
            "derp_current_dup_client_conns": ("Connections of keys with two or more connections.",
                                              sum(len(m) for m in dup_keys)),
            "derp_watchers": ("Mesh peers watching connections.",
                              sum(1 for w in self.watchers if w.key not in internal)),
            "derp_parked_packets": ("Packets held now for clients that left a moment ago and may log in again.",
                                    self.parking.count),
            "derp_peer_gone_senders": ("Senders whose departure some live receiver will hear of (PeerGone).",
                                       len(self.peer_gone_watchers)),
        }


def present_flags(can_mesh: bool, is_prober: bool, not_ideal: bool) -> int:
    flags = 0
    if can_mesh:
        flags |= PeerPresentFlags.IS_MESH_PEER
    if is_prober:
        flags |= PeerPresentFlags.IS_PROBER
    if not_ideal:
        flags |= PeerPresentFlags.NOT_IDEAL
    return flags or PeerPresentFlags.IS_REGULAR


__all__ = ["Forwarder", "Member", "NodePublic", "Registry", "present_flags"]
