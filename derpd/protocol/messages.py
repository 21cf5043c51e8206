"""Typed DERP messages: frozen events for every frame payload, the ClientInfo and ServerInfo
JSON, and disco-packet detection.

Events are nouns (``RecvPacket``, ``PeerGone``) dispatched with ``match``.  Each direction
has one parser: ``parse_client_frame`` (what a server reads) and ``parse_server_frame``
(what a client reads).  Size rules follow spec 2.3 and 5.11: a server closes the connection
on a malformed known frame; a client skips short frames (returns ``None``) and only a frame
over 1 MiB is fatal (handled by the decoder).
"""

from __future__ import annotations

import ipaddress
import json
import struct
from dataclasses import dataclass
from typing import Any

from ..keys import KEY_LEN, NodePublic
from .errors import LocalProtocolError, RemoteProtocolError
from .frames import (
    MAX_PACKET_SIZE,
    PROTOCOL_VERSION,
    FrameType,
    PeerGoneReason,
    encode_frame,
    u32,
)

DISCO_MAGIC = b"TS\xf0\x9f\x92\xac"  # "TS💬"
DISCO_MIN_LEN = 62  # magic(6) + sender disco key(32) + nonce(24)
_ZERO_KEY = bytes(KEY_LEN)
_V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


def looks_like_disco(buf: bytes, at: int = 0) -> bool:
    """True iff the packet at ``buf[at:]`` starts like a Tailscale disco message (spec 5.3):
    the magic and at least a sender key and a nonce after it.  The relay's one disco test: the
    router inlines it (derpd/relay/router.py) and tests/derpd/test_router.py holds it to this."""
    return len(buf) - at >= DISCO_MIN_LEN and buf.startswith(DISCO_MAGIC, at)


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class SendPacket:
    dst: NodePublic
    data: bytes


@dataclass(frozen=True, slots=True)
class RecvPacket:
    src: NodePublic
    data: bytes


@dataclass(frozen=True, slots=True)
class ForwardPacket:
    src: NodePublic
    dst: NodePublic
    data: bytes


@dataclass(frozen=True, slots=True)
class KeepAlive:
    pass


@dataclass(frozen=True, slots=True)
class NotePreferred:
    preferred: bool


@dataclass(frozen=True, slots=True)
class PeerGone:
    peer: NodePublic
    reason: int = PeerGoneReason.DISCONNECTED


@dataclass(frozen=True, slots=True)
class PeerPresent:
    peer: NodePublic
    ip: str | None = None
    port: int = 0
    flags: int = 0


@dataclass(frozen=True, slots=True)
class WatchConns:
    pass


@dataclass(frozen=True, slots=True)
class ClosePeer:
    target: NodePublic


@dataclass(frozen=True, slots=True)
class Ping:
    data: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    data: bytes


@dataclass(frozen=True, slots=True)
class Health:
    problem: str


@dataclass(frozen=True, slots=True)
class Restarting:
    reconnect_in_ms: int
    try_for_ms: int


@dataclass(frozen=True, slots=True)
class ServerKey:
    key: NodePublic


@dataclass(frozen=True, slots=True)
class UnknownFrame:
    """A frame a server ignores after login (Pong from a client, undefined types...)."""

    frame_type: int


ClientFrame = SendPacket | ForwardPacket | NotePreferred | WatchConns | ClosePeer | Ping | UnknownFrame
ServerFrame = (
    RecvPacket | KeepAlive | PeerGone | PeerPresent | Ping | Pong | Health | Restarting | ServerKey
)


# --------------------------------------------------------------------------- JSON payloads


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """The sealed JSON a client sends in ClientInfo (spec 3.3)."""

    mesh_key: bytes | None = None
    version: int = PROTOCOL_VERSION
    can_ack_pings: bool = False
    is_prober: bool = False
    app_name: str = ""

    def to_json(self) -> bytes:
        """Go's field order and omitempty rules; ``CanAckPings`` is always present (P-6)."""
        d: dict[str, Any] = {}
        if self.mesh_key is not None and self.mesh_key != _ZERO_KEY:
            d["meshKey"] = self.mesh_key.hex()
        if self.version:
            d["version"] = self.version
        d["CanAckPings"] = self.can_ack_pings
        if self.is_prober:
            d["IsProber"] = True
        if self.app_name:
            d["AppName"] = self.app_name
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ClientInfo:
        """Decode like Go's encoding/json: keys match case-insensitively, unknown keys are
        ignored, later duplicates win, ``null`` leaves a plain field at its default.

        Raises:
            RemoteProtocolError: not JSON, not an object, a wrongly typed field, or a
                ``meshKey`` that is not 64 hex digits (reason ``bad_client_info``).
        """
        if raw == _last_client_info[0]:  # every client of one build sends the same bytes
            return _last_client_info[1]
        obj = _decode_object(raw, "ClientInfo")
        mesh_key: bytes | None = None
        version = 0
        can_ack = False
        is_prober = False
        app_name = ""
        for k, v in obj.items():
            match k.lower():
                case "meshkey":
                    mesh_key = _mesh_key_field(v)
                case "version":
                    version = _typed(v, int, "version", version)
                case "canackpings":
                    can_ack = _typed(v, bool, "CanAckPings", can_ack)
                case "isprober":
                    is_prober = _typed(v, bool, "IsProber", is_prober)
                case "appname":
                    app_name = _typed(v, str, "AppName", app_name)
        if mesh_key == _ZERO_KEY:
            mesh_key = None
        info = cls(mesh_key, version, can_ack, is_prober, app_name)
        if cls is ClientInfo and len(raw) <= _REMEMBER_CLIENT_INFO:
            _last_client_info[:] = (bytes(raw), info)
        return info


# The last ClientInfo decoded and its JSON: one entry, replaced by the next different one (a
# ClientInfo is immutable, so equal bytes give an equal value; no state grows).
_last_client_info: list[Any] = [None, None]
_REMEMBER_CLIENT_INFO = 256


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """The sealed JSON a server sends in ServerInfo (spec 3.4)."""

    version: int = PROTOCOL_VERSION
    token_bucket_bytes_per_second: int = 0
    token_bucket_bytes_burst: int = 0

    def to_json(self) -> bytes:
        d: dict[str, int] = {}
        if self.version:
            d["version"] = self.version
        if self.token_bucket_bytes_per_second:
            d["TokenBucketBytesPerSecond"] = self.token_bucket_bytes_per_second
        if self.token_bucket_bytes_burst:
            d["TokenBucketBytesBurst"] = self.token_bucket_bytes_burst
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ServerInfo:
        """Raises: RemoteProtocolError (reason ``bad_server_info``)."""
        obj = _decode_object(raw, "ServerInfo", reason="bad_server_info")
        version = rate = burst = 0
        for k, v in obj.items():
            match k.lower():
                case "version":
                    version = _typed(v, int, "version", version, "bad_server_info")
                case "tokenbucketbytespersecond":
                    rate = _typed(v, int, "TokenBucketBytesPerSecond", rate, "bad_server_info")
                case "tokenbucketbytesburst":
                    burst = _typed(v, int, "TokenBucketBytesBurst", burst, "bad_server_info")
        return cls(version, rate, burst)


def _decode_object(raw: bytes, what: str, reason: str = "bad_client_info") -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise RemoteProtocolError(f"{what} is not valid JSON", reason) from e
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"{what} JSON is not an object", reason)
    return obj


def _typed(value: Any, typ: type, name: str, default: Any, reason: str = "bad_client_info") -> Any:
    if value is None:
        return default
    # bool is a subclass of int in Python, but not in JSON.
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise RemoteProtocolError(f"field {name} must be an integer", reason)
    if not isinstance(value, typ):
        raise RemoteProtocolError(f"field {name} has the wrong type", reason)
    if typ is int and not -(1 << 63) <= value < (1 << 63):
        raise RemoteProtocolError(f"field {name} is out of range", reason)
    return value


def _mesh_key_field(value: Any) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * KEY_LEN:
        raise RemoteProtocolError("meshKey must be 64 hex digits", "bad_client_info")
    try:
        return bytes.fromhex(value)
    except ValueError as e:
        raise RemoteProtocolError("meshKey must be 64 hex digits", "bad_client_info") from e


# --------------------------------------------------------------------------- parsing


def parse_client_frame(frame_type: int, payload: bytes) -> ClientFrame:
    """Interpret a frame a logged-in client sent to the server.

    Raises:
        RemoteProtocolError: a known frame with a size the server must reject (spec 5.11).
    """
    n = len(payload)
    match frame_type:
        case FrameType.SEND_PACKET:
            if n < KEY_LEN or n > KEY_LEN + MAX_PACKET_SIZE:
                raise RemoteProtocolError(f"SendPacket of {n} bytes", "bad_send_packet")
            return SendPacket(NodePublic(payload[:KEY_LEN]), payload[KEY_LEN:])
        case FrameType.FORWARD_PACKET:
            if n < 2 * KEY_LEN or n > 2 * KEY_LEN + MAX_PACKET_SIZE:
                raise RemoteProtocolError(f"ForwardPacket of {n} bytes", "bad_forward_packet")
            return ForwardPacket(
                NodePublic(payload[:KEY_LEN]), NodePublic(payload[KEY_LEN : 2 * KEY_LEN]), payload[2 * KEY_LEN :]
            )
        case FrameType.NOTE_PREFERRED:
            if n != 1:
                raise RemoteProtocolError(f"NotePreferred of {n} bytes", "bad_note_preferred")
            return NotePreferred(payload[0] != 0)
        case FrameType.WATCH_CONNS:
            if n != 0:
                raise RemoteProtocolError(f"WatchConns of {n} bytes", "bad_watch_conns")
            return WatchConns()
        case FrameType.CLOSE_PEER:
            if n != KEY_LEN:
                raise RemoteProtocolError(f"ClosePeer of {n} bytes", "bad_close_peer")
            return ClosePeer(NodePublic(payload))
        case FrameType.PING:
            if n < 8 or n > 1000:
                raise RemoteProtocolError(f"Ping of {n} bytes", "bad_ping")
            return Ping(payload[:8])
        case _:
            return UnknownFrame(frame_type)


def parse_server_frame(frame_type: int, payload: bytes) -> ServerFrame | None:
    """Interpret a frame a server sent to a client.

    Returns ``None`` for frames a client skips: unknown types and short known frames
    (spec 2.4).  ServerInfo is handled by the client handshake, not here.
    """
    n = len(payload)
    match frame_type:
        case FrameType.RECV_PACKET:
            if n < KEY_LEN:
                return None
            return RecvPacket(NodePublic(payload[:KEY_LEN]), payload[KEY_LEN:])
        case FrameType.KEEP_ALIVE:
            return KeepAlive()
        case FrameType.PEER_GONE:
            if n < KEY_LEN:
                return None
            reason = payload[KEY_LEN] if n > KEY_LEN else PeerGoneReason.DISCONNECTED
            return PeerGone(NodePublic(payload[:KEY_LEN]), reason)
        case FrameType.PEER_PRESENT:
            if n < KEY_LEN:
                return None
            ip: str | None = None
            port = 0
            flags = 0
            if n >= KEY_LEN + 18:
                raw_ip = payload[KEY_LEN : KEY_LEN + 16]
                port = int.from_bytes(payload[KEY_LEN + 16 : KEY_LEN + 18], "big")
                if raw_ip != bytes(16):
                    addr = ipaddress.IPv6Address(bytes(raw_ip))
                    ip = str(addr.ipv4_mapped or addr)
                if n >= KEY_LEN + 19:
                    flags = payload[KEY_LEN + 18]
            return PeerPresent(NodePublic(payload[:KEY_LEN]), ip, port, flags)
        case FrameType.PING:
            return Ping(payload[:8]) if n >= 8 else None
        case FrameType.PONG:
            return Pong(payload[:8]) if n >= 8 else None
        case FrameType.HEALTH:
            return Health(payload.decode("utf-8", "replace"))
        case FrameType.RESTARTING:
            if n < 8:
                return None
            a, b = struct.unpack_from(">II", payload)
            return Restarting(a, b)
        case FrameType.SERVER_KEY:
            if n < 40 or payload[:8] != b"DERP\xf0\x9f\x94\x91":
                return None
            return ServerKey(NodePublic(payload[8:40]))
        case _:
            return None


# --------------------------------------------------------------------------- encoding


def encode_peer_present(peer: NodePublic | bytes, ip: str | None, port: int, flags: int) -> bytes:
    """The 51-byte PeerPresent frame (P-9); IPv4 is encoded v4-mapped."""
    raw_ip = bytes(16)
    if ip:
        addr = ipaddress.ip_address(ip)
        raw_ip = _V4_MAPPED_PREFIX + addr.packed if addr.version == 4 else addr.packed
    key = peer.raw if isinstance(peer, NodePublic) else peer
    return encode_frame(FrameType.PEER_PRESENT, key + raw_ip + struct.pack(">HB", port & 0xFFFF, flags))


def encode_peer_gone(peer: NodePublic | bytes, reason: int) -> bytes:
    key = peer.raw if isinstance(peer, NodePublic) else peer
    return encode_frame(FrameType.PEER_GONE, key + bytes((reason,)))


def encode_restarting(reconnect_in_ms: int, try_for_ms: int) -> bytes:
    return encode_frame(FrameType.RESTARTING, u32(reconnect_in_ms) + u32(try_for_ms))


def encode_send_packet(dst: NodePublic, data: bytes) -> bytes:
    """Raises: LocalProtocolError if ``data`` is over 64 KiB."""
    if len(data) > MAX_PACKET_SIZE:
        raise LocalProtocolError(f"packet of {len(data)} bytes is over {MAX_PACKET_SIZE}")
    return encode_frame(FrameType.SEND_PACKET, dst.raw + data)


def encode_recv_packet(src: NodePublic, data: bytes) -> bytes:
    return encode_frame(FrameType.RECV_PACKET, src.raw + data)


def encode_forward_packet(src: NodePublic | bytes, dst: NodePublic | bytes, data: bytes) -> bytes:
    s = src.raw if isinstance(src, NodePublic) else src
    d = dst.raw if isinstance(dst, NodePublic) else dst
    return encode_frame(FrameType.FORWARD_PACKET, s + d + data)


KEEP_ALIVE_FRAME = encode_frame(FrameType.KEEP_ALIVE)
WATCH_CONNS_FRAME = encode_frame(FrameType.WATCH_CONNS)
