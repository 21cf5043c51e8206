"""The router: where a SendPacket or a ForwardPacket goes.

::

    SendPacket(dst || packet) from client S         -> RecvPacket(S || packet) on dst's send path
    ForwardPacket(src || dst || packet), mesh peer  -> RecvPacket(src || packet) on dst's send path
    dst with no local connection                    -> RouteHost.route_elsewhere: a mesh peer, or
                                                       dropped (PeerGone NotHere for disco)

``route`` takes a batch of decoded frames and handles each by its type: SendPacket and
ForwardPacket (derper's handleFrameSendPacket and handleFrameForwardPacket) look the destination
up in ``Registry.active``, register the source for the destination's PeerGone
(``watch_peer_gone``, when the destination's ``saw_src`` lacks it), and hand the RecvPacket frame
to the destination's ``enqueue(frame, disco)``; any other frame goes to the sender's
``handle_other``.  Each packet frame type only locates its source, destination and body; the
delivery (the lookup, the PeerGone registration, the RecvPacket header, the disco test) is
written once after them.  They are branches of one loop, not functions: in Python a call costs
about as much as the routing itself (a function per frame type measured +18 % instructions per
one-packet batch on the pure path), and a packet costs one dictionary lookup and its
destination's ``enqueue``, nothing more.  The disco test is ``messages.looks_like_disco``,
inlined once.

``_speedups.route_packets`` (derpd/_speedups.c) is a declared acceleration of the SendPacket
case: ``route`` calls it first when it is built (``route_send_packets``); it delivers every
SendPacket to a local connection up to the first frame it does not take, which ``route`` then
handles as it would without it.  tests/derpd/test_router.py holds ``route`` with and without it,
and ``route_packets`` alone, to a per-frame reference model built on the protocol's own encoder
and ``looks_like_disco`` (fixed vectors and Hypothesis): the same enqueues, the same frames sent
elsewhere, the same errors and counters.  The compiled data plane (derpd/_dataplane.c) routes
its own sockets' SendPackets the same way and hands every frame it does not deliver back to the
connection's reader, which brings it here.

Dependencies: below ``client_connection`` (which calls ``route``); knows connections through
``Sender`` and the registry's ``Member``, the relay through ``RouteHost``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Protocol

from ..accel import speedups
from ..keys import KEY_LEN
from ..metrics import RelayStats
from ..protocol.errors import RemoteProtocolError
from ..protocol.frames import FrameType
from ..protocol.messages import DISCO_MAGIC, DISCO_MIN_LEN
from .registry import Forwarder, Registry

SEND_PACKET = int(FrameType.SEND_PACKET)
FORWARD_PACKET = int(FrameType.FORWARD_PACKET)
RECV_PACKET = int(FrameType.RECV_PACKET)
_RECV_HEADER = struct.Struct(">BI")  # RecvPacket: type, length of src(32) || packet


class RouteHost(Protocol):
    """What the router needs from the relay (``server.RelayServer``)."""

    stats: RelayStats
    registry: Registry

    def route_elsewhere(
        self, sender: Any, src: bytes, dst: bytes, packet: bytes, disco: bool, *, forwarded: bool
    ) -> Forwarder | None:
        ...


class Sender(Protocol):
    """The connection whose reader decoded the frames (``client_connection.ClientConnection``)."""

    key: bytes
    can_mesh: bool
    is_dup: bool
    rx_packets: int
    rx_bytes: int
    congested: Forwarder | None  # set by ``route``: a mesh link the reader should wait for

    def handle_other(self, ftype: int, payload: bytes) -> None:
        """A frame that is not a packet (or a ForwardPacket from a client without the mesh key)."""
        ...


#: The compiled SendPacket run (``_speedups.route_packets``), or None: ``route`` does the same.
route_send_packets: Callable[..., tuple[int, int, int, int, int]] | None = (
    speedups.route_packets if speedups is not None else None
)


def route(host: RouteHost, sender: Sender, frames: list[tuple[int, bytes]], start: int) -> int:
    """Route every frame of ``frames[start:]``: packets as in the module docstring, anything
    else to ``sender.handle_other``.  Counts what it read (relay stats, the sender's ``rx_*``).

    Returns the index to resume at: ``len(frames)`` when done, earlier when a local
    destination's queue filled up (the reader yields so that its writer drains it) or a mesh link
    is congested (``sender.congested`` is set; the reader waits for it).

    Raises:
        RemoteProtocolError: a SendPacket or ForwardPacket too short for its keys
            (``bad_send_packet``, ``bad_forward_packet``), or whatever ``handle_other`` raises.
    """
    registry = host.registry
    active = registry.active
    src = sender.key
    pack = _RECV_HEADER.pack
    run = route_send_packets
    klen, magic, min_len = KEY_LEN, DISCO_MAGIC, DISCO_MIN_LEN  # locals: read for every packet
    npk = nbytes = ndisco = nfwd = nfwd_bytes = 0
    i = start
    end = len(frames)
    try:
        while i < end:
            if run is not None:
                # The compiled run: every SendPacket to a local connection, up to anything else.
                i, n, nb, nd, full = run(frames, i, active, src, registry.watch_peer_gone, magic, min_len)
                npk += n
                nbytes += nb
                ndisco += nd
                if full or i >= end:
                    break
            ftype, payload = frames[i]
            i += 1
            # Each packet frame type only says where its keys and body are (handleFrameSendPacket,
            # handleFrameForwardPacket); the delivery below is the same for both.
            n = len(payload)
            if ftype == SEND_PACKET:  # dst(32) || packet
                if n < klen:
                    raise RemoteProtocolError(f"SendPacket of {n} bytes", "bad_send_packet")
                psrc = src
                dst = payload[:klen]
                at = klen
                npk += 1
                nbytes += n - klen
            elif ftype == FORWARD_PACKET and sender.can_mesh:  # src(32) || dst(32) || packet
                if n < 2 * klen:
                    raise RemoteProtocolError(f"ForwardPacket of {n} bytes", "bad_forward_packet")
                psrc = payload[:klen]
                dst = payload[klen : 2 * klen]
                at = 2 * klen
                nfwd += 1
                nfwd_bytes += n - at
            else:
                sender.handle_other(ftype, payload)
                continue
            # Delivery, written once: one lookup, then RecvPacket(src || packet) on the local
            # destination's send path, or elsewhere (a mesh peer, or dropped).
            disco = n - at >= min_len and payload.startswith(magic, at)  # looks_like_disco
            if disco and at == klen:
                ndisco += 1
            conn = active.get(dst)
            if conn is not None:
                if psrc not in conn.saw_src:
                    registry.watch_peer_gone(conn, psrc)
                if conn.enqueue(pack(RECV_PACKET, n - at + klen) + psrc + payload[at:], disco):
                    break
            else:
                congested = host.route_elsewhere(sender, psrc, dst, payload[at:], disco, forwarded=at != klen)
                if congested is not None and at == klen:
                    sender.congested = congested
                    break
    finally:
        stats = host.stats
        stats.packets_received += npk
        stats.bytes_received += nbytes
        stats.disco_packets_received += ndisco
        if nfwd:
            stats.packets_forwarded_in += nfwd
            stats.bytes_forwarded_in += nfwd_bytes
        sender.rx_packets += npk + nfwd
        sender.rx_bytes += nbytes + nfwd_bytes
        if sender.is_dup:
            registry.note_activity(sender)  # type: ignore[arg-type]
    return i


__all__ = ["FORWARD_PACKET", "RECV_PACKET", "SEND_PACKET", "RouteHost", "Sender", "route", "route_send_packets"]
