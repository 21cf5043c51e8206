"""DERP framing: frame types, the encoder, and the incremental ``FrameDecoder``.

Theory of operation
-------------------
After the HTTP upgrade (or WebSocket handshake) a DERP connection is a plain byte stream
of frames, in both directions::

    +--------+---------------------------+---------------------+
    | type   | length (uint32, BE)       | payload (length B)  |
    | 1 byte | 4 bytes                   |                     |
    +--------+---------------------------+---------------------+

There is no alignment, padding, checksum or message ID.  Frames straddle TCP segments and
WebSocket messages freely, and one read often holds many frames, so the decoder keeps one
buffer and hands out every complete frame in it at once.

The protocol flow (spec section 3)::

    client                                         server
      |<------------- ServerKey (0x01) --------------|  unsolicited, first
      |-------------- ClientInfo (0x02) ----------->|  sealed JSON
      |<------------- ServerInfo (0x03) -------------|  always the first frame after ServerKey
      |<==== SendPacket / RecvPacket / KeepAlive / Ping / Pong / PeerGone ... ====>|

Bounds before buffering: a known frame type has a maximum payload size, and a length over
it is rejected as soon as the 5-byte header arrives, so an attacker can never make us
buffer a length of its choosing.  Frames of *unknown* types are skipped (spec 2.4); the
server skips them by streaming, without buffering their payload, whatever their length.

This module is sans-IO: it never touches a socket or a clock.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping

from ..accel import speedups
from .errors import RemoteProtocolError

FRAME_HEADER_LEN = 5
KEY_LEN = 32
NONCE_LEN = 24
PROTOCOL_VERSION = 2
MAX_PACKET_SIZE = 64 << 10  # 65536: packet bytes, excluding key prefixes and the header
MAX_INFO_LEN = 1 << 20  # ServerInfo bound used by clients
MAX_CLIENT_INFO_LEN = 256 << 10  # the server's bound on ClientInfo
CLIENT_MAX_FRAME_LEN = 1 << 20  # Go clients treat any longer frame as fatal (P-21)
MAGIC = b"DERP\xf0\x9f\x94\x91"  # "DERP🔑", first 8 bytes of the ServerKey payload

_HEADER = struct.Struct(">BI")
_U32 = struct.Struct(">I")
_split_frames = speedups.split_frames if speedups is not None else None


class FrameType(enum.IntEnum):
    """Frame types and their payload layouts (spec 2.3).  There is no 0x00 and no 0x0b..0x0f."""

    SERVER_KEY = 0x01  # magic(8) || server public key(32) [|| ignored future bytes]
    CLIENT_INFO = 0x02  # client public key(32) || nonce(24) || box(JSON)
    SERVER_INFO = 0x03  # nonce(24) || box(JSON)
    SEND_PACKET = 0x04  # destination key(32) || packet
    RECV_PACKET = 0x05  # source key(32) || packet   (protocol v2)
    KEEP_ALIVE = 0x06  # empty
    NOTE_PREFERRED = 0x07  # 1 byte: 0x01 = this is my home region
    PEER_GONE = 0x08  # peer key(32) || reason(1)
    PEER_PRESENT = 0x09  # peer key(32) || IPv6 or v4-mapped IP(16) || port(2) || flags(1)
    FORWARD_PACKET = 0x0A  # source key(32) || destination key(32) || packet   (mesh only)
    WATCH_CONNS = 0x10  # empty  (mesh only)
    CLOSE_PEER = 0x11  # target key(32)  (mesh only)
    PING = 0x12  # 8 opaque bytes (server accepts 8..1000, echoes the first 8)
    PONG = 0x13  # the 8 bytes of the ping
    HEALTH = 0x14  # UTF-8 problem text; empty = healthy again
    RESTARTING = 0x15  # reconnectIn ms(uint32) || tryFor ms(uint32)


class PeerGoneReason(enum.IntEnum):
    DISCONNECTED = 0x00  # a peer you received from left the region (or, for watchers, any peer)
    NOT_HERE = 0x01  # you sent a disco packet to a key the region does not know
    MESH_CONN_BROKE = 0xF0  # never on the wire; synthesized locally by mesh clients


class PeerPresentFlags(enum.IntFlag):
    IS_REGULAR = 0x01
    IS_MESH_PEER = 0x02
    IS_PROBER = 0x04
    NOT_IDEAL = 0x08


# The maximum payload the *server* accepts for each frame type it understands.  Frame types
# missing here are skipped by streaming (spec 2.4).  Minimum sizes are checked when a payload
# is interpreted (messages.py).
SERVER_READ_LIMITS: Mapping[int, int] = {
    FrameType.CLIENT_INFO: MAX_CLIENT_INFO_LEN,
    FrameType.SEND_PACKET: KEY_LEN + MAX_PACKET_SIZE,
    FrameType.NOTE_PREFERRED: 1,
    FrameType.FORWARD_PACKET: 2 * KEY_LEN + MAX_PACKET_SIZE,
    FrameType.WATCH_CONNS: 0,
    FrameType.CLOSE_PEER: KEY_LEN,
    FrameType.PING: 1000,
}

# A client understands every server-to-client type and caps every frame at 1 MiB.
CLIENT_READ_LIMITS: Mapping[int, int] = {t: CLIENT_MAX_FRAME_LEN for t in FrameType}


def encode_frame(frame_type: int, payload: bytes = b"") -> bytes:
    """Returns header plus payload for one frame."""
    return _HEADER.pack(frame_type, len(payload)) + payload


def encode_header(frame_type: int, length: int) -> bytes:
    """Returns only the 5-byte header (for writers that join the payload themselves)."""
    return _HEADER.pack(frame_type, length)


def u32(value: int) -> bytes:
    return _U32.pack(value)


_TABLES: dict[int, tuple[Mapping[int, int], tuple[int | None, ...]]] = {}


def _limit_table(limits: Mapping[int, int]) -> tuple[int | None, ...]:
    """For the compiled splitter: the limit of each of the 256 frame types (None = skipped),
    built once per limits mapping (a login makes a decoder; this costs more than the login's
    JSON when built each time)."""
    hit = _TABLES.get(id(limits))
    if hit is not None and hit[0] is limits:
        return hit[1]
    if len(_TABLES) >= 64:
        _TABLES.clear()
    table = tuple(limits.get(t) for t in range(256))
    _TABLES[id(limits)] = (limits, table)
    return table


class FrameDecoder:
    """Incremental frame parser.

    ``receive_data(data)`` appends bytes (``b""`` marks EOF); ``frames()`` returns every
    complete frame in the buffer as ``(type, payload)`` tuples.

    Args:
        limits: maximum payload length per known frame type.
        max_unknown: maximum payload length of an unknown frame type; ``None`` means any
            length is skipped by streaming.

    Raises (from ``frames``/``next_frame``):
        RemoteProtocolError: a length over the limit (reason ``frame_too_large``) or EOF in
            the middle of a frame (``truncated_frame``).
    """

    __slots__ = ("_buf", "_pos", "_limits", "_max_unknown", "_skip", "_eof", "skipped_frames", "_table")

    def __init__(self, limits: Mapping[int, int], max_unknown: int | None = None) -> None:
        self._buf = b""
        self._pos = 0
        self._limits = dict(limits)
        self._max_unknown = max_unknown
        self._skip = 0  # bytes of an unknown frame still to discard
        self._eof = False
        self.skipped_frames = 0
        self._table = _limit_table(limits) if _split_frames is not None else ()

    @property
    def eof(self) -> bool:
        """True once EOF was received and every buffered byte was consumed."""
        return self._eof and self._pos == len(self._buf) and not self._skip

    def receive_data(self, data: bytes) -> None:
        if not data:
            self._eof = True
            return
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            if not self._skip:
                self.skipped_frames += 1
            data = data[n:]
            if not data:
                return
        if self._pos == len(self._buf):
            self._buf = bytes(data)
        else:
            self._buf = self._buf[self._pos:] + data
        self._pos = 0

    def buffered(self) -> bytes:
        """Returns the bytes received but not yet consumed."""
        return self._buf[self._pos:]

    def take_buffered(self) -> bytes:
        """Returns the bytes received but not yet consumed, and forgets them (the caller
        carries on parsing them elsewhere)."""
        data = self._buf[self._pos:]
        self._buf = b""
        self._pos = 0
        return data

    @property
    def skipping(self) -> bool:
        """True while the rest of an unknown frame is still to be discarded."""
        return self._skip > 0

    def frames(self, most: int = -1) -> list[tuple[int, bytes]]:
        """Returns every complete frame buffered so far (at most ``most`` if given), consuming them."""
        if _split_frames is not None:
            out, pos, skipped, skip, bad_type, bad_len = _split_frames(
                self._buf, self._pos, self._table, -1 if self._max_unknown is None else self._max_unknown, most
            )
            self._pos = pos
            if skipped:
                self.skipped_frames += skipped
            if skip:
                self._skip = skip
            if bad_type >= 0:
                raise self._too_large(bad_type, bad_len)
        else:
            out, pos = self._split(most)
        if not out and self._eof and (pos != len(self._buf) or self._skip):
            raise RemoteProtocolError("connection closed in the middle of a frame", "truncated_frame")
        return out

    def _too_large(self, ftype: int, n: int) -> RemoteProtocolError:
        limit = self._limits.get(ftype)
        if limit is None:
            return RemoteProtocolError(f"frame type {ftype:#x} length {n} over {self._max_unknown}", "frame_too_large")
        return RemoteProtocolError(f"frame type {ftype:#x} length {n} over the limit {limit}", "frame_too_large")

    def _split(self, most: int) -> tuple[list[tuple[int, bytes]], int]:
        """The pure-Python splitter (derpd/_speedups.c has the same loop in C)."""
        out: list[tuple[int, bytes]] = []
        buf = self._buf
        pos = self._pos
        end = len(buf)
        limits = self._limits
        unpack = _HEADER.unpack_from
        try:
            while end - pos >= FRAME_HEADER_LEN and most != 0:
                ftype, n = unpack(buf, pos)
                limit = limits.get(ftype)
                if limit is None:
                    if self._max_unknown is not None and n > self._max_unknown:
                        raise self._too_large(ftype, n)
                    avail = end - pos - FRAME_HEADER_LEN
                    if avail >= n:
                        pos += FRAME_HEADER_LEN + n
                        self.skipped_frames += 1
                        continue
                    self._skip = n - avail
                    pos = end
                    break
                if n > limit:
                    raise self._too_large(ftype, n)
                start = pos + FRAME_HEADER_LEN
                if end - start < n:
                    break
                pos = start + n
                out.append((ftype, buf[start:pos]))
                most -= 1
        finally:
            self._pos = pos
        return out, pos

    def next_frame(self) -> tuple[int, bytes] | None:
        """Returns one complete frame, or ``None`` when more data is needed."""
        got = self.frames(1)
        return got[0] if got else None
