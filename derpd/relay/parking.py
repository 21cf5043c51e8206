"""Packets held for a client that is moving: ``Parking``.

A Tailscale client moves between the nodes of a region whenever its map redefines the region
(a node drained for maintenance leaves the list, comes back, or control reorders the list):
it closes its connection and logs in again, on this node or another one of the mesh.  For
the few milliseconds in between, a packet for it finds no connection here and no mesh peer
that holds it, and derper drops it; a disco ping that falls into that gap is lost.

So a packet for a key that was connected in the region until at most ``hold`` seconds ago is
held here instead (at most ``per_key`` per key, oldest dropped first, and ``total`` packets
and ``total_bytes`` in all) and
goes out as soon as the key logs in again here, or a mesh peer announces it.  After ``hold``
seconds the held packets are dropped and counted (``unknown_dest``, ``unknown_dest_on_fwd``),
as they would have been at once.  A packet that came over the mesh (``forwarded``) is handed only to a local
connection, never forwarded a second time, so a packet crosses at most two mesh links and
never loops.

Keys that were never here are not held for: a sender cannot make the relay keep packets for
arbitrary keys.

Dependencies: used by ``registry`` (departures, arrivals) and ``server`` (``route_elsewhere``);
it knows connections and mesh links only through the two small interfaces below.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from ..metrics import RelayStats
from ..protocol.frames import FrameType, encode_frame

#: Seconds a key that left is waited for.  A client with a packet to send logs in again at once;
#: one with nothing to send, only once it has picked its home again after the netcheck that
#: follows its new map (3 s when UDP is blocked and STUN has to time out).
HOLD = 5.0
#: Packets held per key (the oldest goes first when more come).
PER_KEY = 256
#: Packets held in all; past it, a packet for a departed key is dropped at once.
TOTAL = 4096
#: Bytes held in all (a DERP packet may be 64 KiB), with the same effect.
TOTAL_BYTES = 4 << 20


class Receiver(Protocol):
    """A local connection (``client_connection.ClientConnection``)."""

    def enqueue(self, frame: bytes, disco: bool) -> bool: ...


class Link(Protocol):
    """A mesh link that holds the key (``mesh.MeshPeer``)."""

    def forward(self, src: bytes, dst: bytes, packet: bytes) -> bool: ...


class Parking:
    """Packets held per destination key, for keys that left the region recently."""

    def __init__(self, stats: RelayStats, hold: float = HOLD, per_key: int = PER_KEY, total: int = TOTAL,
                 total_bytes: int = TOTAL_BYTES, clock: Callable[[], float] = time.monotonic) -> None:
        self.stats = stats
        self.hold = hold
        self.per_key = per_key
        self.total = total
        self.total_bytes = total_bytes
        self.clock = clock
        self._left: dict[bytes, float] = {}  # key -> when it left; oldest departure first
        self._held: dict[bytes, deque[tuple[bytes, bytes, bool, bool]]] = {}  # key -> (src, packet, disco, fwd)
        self.count = 0  # packets held now
        self.nbytes = 0  # their bytes
        self.delivered = 0  # held packets that reached their key (tests, diagnostics)

    def left(self, key: bytes) -> None:
        """``key`` has no connection here and no mesh peer holds it any more."""
        now = self.clock()
        self.expire(now)
        self._left.pop(key, None)
        self._left[key] = now  # to the end: departures stay in time order

    def park(self, src: bytes, dst: bytes, packet: bytes, disco: bool, forwarded: bool) -> bool:
        """Holds a packet for ``dst`` if it left recently; False: not held (drop it)."""
        now = self.clock()
        self.expire(now)
        if dst not in self._left or self.count >= self.total or self.nbytes + len(packet) > self.total_bytes:
            return False
        q = self._held.get(dst)
        if q is None:
            q = self._held[dst] = deque()
        if len(q) >= self.per_key:
            self._dropped(q.popleft())
        q.append((src, packet, disco, forwarded))
        self.count += 1
        self.nbytes += len(packet)
        return True

    def arrived_here(self, key: bytes, conn: Receiver, watch: Callable[[bytes], None]) -> None:
        """``key`` logged in here: its held packets go to ``conn`` (``watch(src)`` for each
        sender, as for any packet delivered, so the key hears when a sender leaves)."""
        self._left.pop(key, None)
        q = self._held.pop(key, None)
        if not q:
            return
        for src, packet, disco, _ in q:
            self._took(packet)
            watch(src)
            conn.enqueue(encode_frame(FrameType.RECV_PACKET, src + packet), disco)
            self.delivered += 1

    def arrived_elsewhere(self, key: bytes, link: Link) -> None:
        """A mesh peer holds ``key`` now: what this relay's own clients sent goes there; what
        came over the mesh already waits for a local login until it expires."""
        q = self._held.get(key)
        if not q:
            self._left.pop(key, None)
            return
        kept: deque[tuple[bytes, bytes, bool, bool]] = deque()
        for item in q:
            src, packet, disco, forwarded = item
            if forwarded:
                kept.append(item)
                continue
            self._took(packet)
            if link.forward(src, key, packet):
                self.delivered += 1
                self.stats.packets_forwarded_out += 1
                self.stats.bytes_forwarded_out += len(packet)
            else:
                self._count_drop(item)
        if kept:
            self._held[key] = kept
        else:
            del self._held[key]
            self._left.pop(key, None)

    def expire(self, now: float | None = None) -> None:
        """Drops what was held for keys that left over ``hold`` seconds ago (the relay calls
        it every second; parking and departures call it too)."""
        if now is None:
            now = self.clock()
        left = self._left
        while left:
            key, since = next(iter(left.items()))
            if now - since < self.hold:
                return
            del left[key]
            for item in self._held.pop(key, ()):
                self._dropped(item)

    def _took(self, packet: bytes) -> None:
        self.count -= 1
        self.nbytes -= len(packet)

    def _dropped(self, item: tuple[bytes, bytes, bool, bool]) -> None:
        self._took(item[1])
        self._count_drop(item)

    def _count_drop(self, item: tuple[bytes, bytes, bool, bool]) -> None:
        _, packet, disco, forwarded = item
        self.stats.drop("unknown_dest_on_fwd" if forwarded else "unknown_dest", disco, len(packet))


__all__ = ["HOLD", "PER_KEY", "TOTAL", "TOTAL_BYTES", "Link", "Parking", "Receiver"]
