"""Sans-IO STUN codec: RFC 8489 (and 5389), classic RFC 3489 and the RFC 5780 attributes.

Theory of operation
-------------------
A STUN message is a 20-byte header followed by TLV attributes, all big-endian::

     0                   1                   2                   3
    |0 0|     STUN Message Type     |         Message Length        |
    |                         Magic Cookie 0x2112A442               |
    |                     Transaction ID (96 bits)                  |
    |   Attribute Type              |   Attribute Length (unpadded) |
    |   Value ... padded with zeros to a multiple of 4 bytes        |

The message type interleaves a 12-bit method with a 2-bit class (request, indication,
success response, error response).  RFC 3489 ("classic") messages have no magic cookie:
bytes 4..19 are a 128-bit transaction id instead.  :func:`parse_message` accepts both and
records which one it saw in :attr:`Message.classic`.

Attributes below 0x8000 are *comprehension-required*: a server that does not understand
one must answer 420 (Unknown Attribute) listing it.  FINGERPRINT, when present, must be the
last attribute and hold CRC-32 of everything before it XOR 0x5354554E; the length in the
header already counts the FINGERPRINT attribute when the CRC is computed.

This module never touches sockets or clocks: addresses are passed in as packed bytes
(4 bytes for IPv4, 16 for IPv6) plus a port, and every function is a pure transformation
from bytes to values or back.  Remote garbage raises :class:`RemoteProtocolError` (with a
short machine-readable ``reason`` used as a metric label) and nothing else.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

__all__ = [
    "HEADER_LEN",
    "MAGIC_COOKIE",
    "MAGIC_COOKIE_BYTES",
    "FINGERPRINT_XOR",
    "TAILSCALE_SOFTWARE",
    "AttrType",
    "MessageClass",
    "Method",
    "Attribute",
    "Message",
    "StunError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "ChangeRequest",
    "parse_message",
    "encode_message",
    "message_type",
    "split_message_type",
    "fingerprint",
    "encode_address",
    "decode_address",
    "encode_xor_address",
    "decode_xor_address",
    "encode_error_code",
    "decode_error_code",
    "encode_unknown_attributes",
    "decode_unknown_attributes",
    "decode_change_request",
    "encode_change_request",
    "decode_response_port",
    "encode_response_port",
    "tailscale_request",
    "tailscale_response",
    "pack_ip",
    "unpack_ip",
]

HEADER_LEN = 20
MAGIC_COOKIE = 0x2112A442
MAGIC_COOKIE_BYTES = b"\x21\x12\xa4\x42"
#: FINGERPRINT = CRC-32(message up to the FINGERPRINT attribute) XOR this ("STUN" in ASCII).
FINGERPRINT_XOR = 0x5354554E
#: SOFTWARE value Tailscale clients send (8 bytes, so no padding).
TAILSCALE_SOFTWARE = b"tailnode"

_HEADER = struct.Struct("!HH")  # type, length
_ATTR_HEADER = struct.Struct("!HH")  # type, length
_U32 = struct.Struct("!I")


class StunError(Exception):
    """Base class of every error stund raises."""


class ProtocolError(StunError):
    """A STUN message could not be built or understood."""


class LocalProtocolError(ProtocolError):
    """We were asked to build something STUN cannot express (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not an acceptable STUN message.

    ``reason`` is a short snake_case label, suitable as a Prometheus label value.
    """

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class MessageClass(enum.IntEnum):
    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


class Method(enum.IntEnum):
    BINDING = 0x001


class AttrType(enum.IntEnum):
    """Attribute types (RFC 8489 §18.3, RFC 5780 §7, RFC 3489 §11.2)."""

    # comprehension-required (0x0000-0x7FFF)
    MAPPED_ADDRESS = 0x0001  # 0, family, port, address (not XORed)
    RESPONSE_ADDRESS = 0x0002  # RFC 3489 only; never honoured (reflection vector)
    CHANGE_REQUEST = 0x0003  # RFC 5780/3489: 4 bytes, flags 0x04 change IP, 0x02 change port
    SOURCE_ADDRESS = 0x0004  # RFC 3489: address the response was sent from
    CHANGED_ADDRESS = 0x0005  # RFC 3489: the other IP and port
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009  # 0, 0, class (hundreds), number (0-99), UTF-8 reason
    UNKNOWN_ATTRIBUTES = 0x000A  # list of 16-bit types
    REALM = 0x0014
    NONCE = 0x0015
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    USERHASH = 0x001E
    XOR_MAPPED_ADDRESS = 0x0020  # like MAPPED-ADDRESS, port ^ 0x2112, address ^ cookie||txid
    PADDING = 0x0026  # RFC 5780: any bytes
    RESPONSE_PORT = 0x0027  # RFC 5780: port, 2 reserved bytes
    # comprehension-optional (0x8000-0xFFFF)
    XOR_MAPPED_ADDRESS_ALT = 0x8020  # non-standard, sent by some old servers
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028
    RESPONSE_ORIGIN = 0x802B  # RFC 5780: address the response was sent from
    OTHER_ADDRESS = 0x802C  # RFC 5780: the other IP and port


@dataclass(frozen=True, slots=True)
class Attribute:
    type: int
    value: bytes


@dataclass(frozen=True, slots=True)
class ChangeRequest:
    change_ip: bool
    change_port: bool


@dataclass(frozen=True, slots=True)
class Message:
    """A parsed STUN message.

    ``transaction_id`` is 12 bytes for RFC 5389+ messages and 16 bytes (bytes 4..19 of the
    header) for classic RFC 3489 messages, which have no magic cookie.
    """

    method: int
    cls: MessageClass
    transaction_id: bytes
    attributes: tuple[Attribute, ...] = ()

    @property
    def classic(self) -> bool:
        return len(self.transaction_id) == 16

    def get(self, attr_type: int) -> bytes | None:
        """Returns the value of the first attribute of this type, or None."""
        for attr in self.attributes:
            if attr.type == attr_type:
                return attr.value
        return None

    def has(self, attr_type: int) -> bool:
        return any(attr.type == attr_type for attr in self.attributes)


def message_type(method: int, cls: int) -> int:
    """Returns the 14-bit message type for a method and class (RFC 8489 §5)."""
    if not 0 <= method <= 0xFFF:
        raise LocalProtocolError(f"method {method:#x} does not fit in 12 bits")
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((cls & 0b01) << 4)
        | ((cls & 0b10) << 7)
    )


def split_message_type(msg_type: int) -> tuple[int, MessageClass]:
    """Returns (method, class) of a 14-bit message type."""
    method = (msg_type & 0x000F) | ((msg_type & 0x00E0) >> 1) | ((msg_type & 0x3E00) >> 2)
    cls = ((msg_type >> 4) & 0b01) | ((msg_type >> 7) & 0b10)
    return method, MessageClass(cls)


def fingerprint(data: bytes) -> int:
    """FINGERPRINT value for ``data`` (the message up to, excluding, the attribute)."""
    return zlib.crc32(data) ^ FINGERPRINT_XOR


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def parse_message(data: bytes, *, strict: bool = True) -> Message:
    """Parses one STUN message.

    ``strict=True`` (servers) requires the header length to match the datagram exactly.
    ``strict=False`` (clients, like Tailscale's parser) reads attributes only up to the header
    length and ignores trailing bytes.  In both modes every attribute must fit with its
    padding, and a FINGERPRINT (RFC 5389+ messages only) must be last and correct.

    Returns:
        the parsed :class:`Message`.
    Raises:
        RemoteProtocolError: with ``reason`` one of ``too_short``, ``not_stun``,
            ``bad_length``, ``malformed``, ``bad_fingerprint``.
    """
    n = len(data)
    if n < HEADER_LEN:
        raise RemoteProtocolError(f"{n}-byte datagram is shorter than a STUN header", "too_short")
    msg_type, length = _HEADER.unpack_from(data, 0)
    if msg_type & 0xC000:
        raise RemoteProtocolError("top two bits of the message type are not zero", "not_stun")
    if length & 3:
        raise RemoteProtocolError(f"message length {length} is not a multiple of 4", "bad_length")
    end = HEADER_LEN + length
    if end > n or (strict and end != n):
        raise RemoteProtocolError(
            f"header says {length} attribute bytes, datagram has {n - HEADER_LEN}", "bad_length"
        )
    classic = data[4:8] != MAGIC_COOKIE_BYTES
    txid = bytes(data[4:20]) if classic else bytes(data[8:20])
    method, cls = split_message_type(msg_type)

    attrs: list[Attribute] = []
    pos = HEADER_LEN
    while pos < end:
        if end - pos < 4:
            raise RemoteProtocolError("truncated attribute header", "malformed")
        a_type, a_len = _ATTR_HEADER.unpack_from(data, pos)
        start = pos + 4
        stop = start + a_len
        if start + _pad4(a_len) > end:
            raise RemoteProtocolError(f"attribute {a_type:#06x} overruns the message", "malformed")
        if a_type == AttrType.FINGERPRINT and not classic:
            if stop != end or start + _pad4(a_len) != end:
                raise RemoteProtocolError("FINGERPRINT is not the last attribute", "bad_fingerprint")
            if a_len != 4:
                raise RemoteProtocolError("FINGERPRINT value is not 4 bytes", "bad_fingerprint")
            want = fingerprint(data[:pos])
            if _U32.unpack_from(data, start)[0] != want:
                raise RemoteProtocolError("FINGERPRINT does not match", "bad_fingerprint")
        attrs.append(Attribute(a_type, bytes(data[start:stop])))
        pos = start + _pad4(a_len)
    return Message(method, cls, txid, tuple(attrs))


def encode_message(
    method: int,
    cls: int,
    transaction_id: bytes,
    attributes: tuple[Attribute, ...] | list[Attribute] = (),
    *,
    add_fingerprint: bool = False,
) -> bytes:
    """Serializes a message; a 16-byte transaction id makes a classic RFC 3489 message.

    Returns:
        the datagram bytes.
    Raises:
        LocalProtocolError: bad transaction id length, oversized attribute, or
            FINGERPRINT requested on a classic message.
    """
    if len(transaction_id) == 12:
        head_id = MAGIC_COOKIE_BYTES + transaction_id
    elif len(transaction_id) == 16:
        if add_fingerprint:
            raise LocalProtocolError("RFC 3489 messages cannot carry FINGERPRINT")
        head_id = bytes(transaction_id)
    else:
        raise LocalProtocolError("transaction id must be 12 (RFC 5389) or 16 (RFC 3489) bytes")
    parts = []
    for attr in attributes:
        if len(attr.value) > 0xFFFF:
            raise LocalProtocolError(f"attribute {attr.type:#06x} value is too long")
        parts.append(_ATTR_HEADER.pack(attr.type, len(attr.value)))
        parts.append(attr.value)
        parts.append(b"\x00" * (_pad4(len(attr.value)) - len(attr.value)))
    body = b"".join(parts)
    msg_type = message_type(method, cls)
    if add_fingerprint:
        head = _HEADER.pack(msg_type, len(body) + 8) + head_id
        crc = fingerprint(head + body)
        return head + body + _ATTR_HEADER.pack(AttrType.FINGERPRINT, 4) + _U32.pack(crc)
    if len(body) > 0xFFFF:
        raise LocalProtocolError("message is too long")
    return _HEADER.pack(msg_type, len(body)) + head_id + body


# --- addresses ---------------------------------------------------------------------------

_FAMILY_LEN = {1: 4, 2: 16}


def pack_ip(ip: str | IPv4Address | IPv6Address) -> bytes:
    """Packed form of an IP; IPv4-mapped IPv6 addresses become 4 bytes (RFC 8489 clients
    expect family 1 for IPv4 peers, spec P-26)."""
    addr = ip_address(ip) if isinstance(ip, str) else ip
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.packed


def unpack_ip(packed: bytes) -> str:
    """Text form of a packed 4- or 16-byte IP; IPv4-mapped IPv6 is un-mapped."""
    addr = ip_address(packed)
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def encode_address(ip: bytes, port: int) -> bytes:
    """MAPPED-ADDRESS style value (also RESPONSE-ORIGIN, OTHER-ADDRESS, 3489 addresses)."""
    if len(ip) == 4:
        return b"\x00\x01" + port.to_bytes(2, "big") + ip
    if len(ip) == 16:
        return b"\x00\x02" + port.to_bytes(2, "big") + ip
    raise LocalProtocolError("packed IP must be 4 or 16 bytes")


def decode_address(value: bytes) -> tuple[bytes, int]:
    """Returns (packed IP, port) of a MAPPED-ADDRESS style value.

    Raises:
        RemoteProtocolError: unknown family or truncated value.
    """
    if len(value) < 4:
        raise RemoteProtocolError("address attribute is too short", "malformed")
    addr_len = _FAMILY_LEN.get(value[1])
    if addr_len is None:
        raise RemoteProtocolError(f"unknown address family {value[1]}", "malformed")
    if len(value) < 4 + addr_len:
        raise RemoteProtocolError("address attribute is truncated", "malformed")
    return bytes(value[4 : 4 + addr_len]), int.from_bytes(value[2:4], "big")


def _xor_key(transaction_id: bytes) -> bytes:
    return MAGIC_COOKIE_BYTES + transaction_id[-12:]


def encode_xor_address(ip: bytes, port: int, transaction_id: bytes) -> bytes:
    """XOR-MAPPED-ADDRESS value: port ^ 0x2112, address ^ (cookie || transaction id)."""
    key = _xor_key(transaction_id)
    if len(ip) == 4:
        fam = b"\x00\x01"
    elif len(ip) == 16:
        fam = b"\x00\x02"
    else:
        raise LocalProtocolError("packed IP must be 4 or 16 bytes")
    xip = (int.from_bytes(ip, "big") ^ int.from_bytes(key[: len(ip)], "big")).to_bytes(len(ip), "big")
    return fam + (port ^ 0x2112).to_bytes(2, "big") + xip


def decode_xor_address(value: bytes, transaction_id: bytes) -> tuple[bytes, int]:
    """Returns (packed IP, port) of an XOR-MAPPED-ADDRESS value.

    Raises:
        RemoteProtocolError: unknown family or truncated value.
    """
    xip, xport = decode_address(value)
    key = _xor_key(transaction_id)
    ip = (int.from_bytes(xip, "big") ^ int.from_bytes(key[: len(xip)], "big")).to_bytes(len(xip), "big")
    return ip, xport ^ 0x2112


# --- other attribute values ----------------------------------------------------------------


def encode_error_code(code: int, reason: str) -> bytes:
    if not 300 <= code <= 699:
        raise LocalProtocolError(f"error code {code} is outside 300-699")
    return b"\x00\x00" + bytes((code // 100, code % 100)) + reason.encode("utf-8")


def decode_error_code(value: bytes) -> tuple[int, str]:
    """Returns (code, reason).  Raises RemoteProtocolError if malformed."""
    if len(value) < 4 or not 3 <= (value[2] & 7) <= 6 or value[3] > 99:
        raise RemoteProtocolError("malformed ERROR-CODE", "malformed")
    return (value[2] & 7) * 100 + value[3], value[4:].decode("utf-8", "replace")


def encode_unknown_attributes(types: list[int] | tuple[int, ...]) -> bytes:
    return b"".join(t.to_bytes(2, "big") for t in types)


def decode_unknown_attributes(value: bytes) -> list[int]:
    if len(value) % 2:
        raise RemoteProtocolError("UNKNOWN-ATTRIBUTES has an odd length", "malformed")
    return [int.from_bytes(value[i : i + 2], "big") for i in range(0, len(value), 2)]


def encode_change_request(change_ip: bool, change_port: bool) -> bytes:
    return _U32.pack((4 if change_ip else 0) | (2 if change_port else 0))


def decode_change_request(value: bytes) -> ChangeRequest:
    if len(value) != 4:
        raise RemoteProtocolError("CHANGE-REQUEST is not 4 bytes", "malformed")
    flags = value[3]
    return ChangeRequest(bool(flags & 4), bool(flags & 2))


def encode_response_port(port: int) -> bytes:
    return port.to_bytes(2, "big") + b"\x00\x00"


def decode_response_port(value: bytes) -> int:
    if len(value) != 4:
        raise RemoteProtocolError("RESPONSE-PORT is not 4 bytes", "malformed")
    port = int.from_bytes(value[:2], "big")
    if port == 0:
        raise RemoteProtocolError("RESPONSE-PORT is zero", "malformed")
    return port


# --- Tailscale's exact forms (spec §14.1, §14.2) ---------------------------------------------

_TS_ATTRS = b"\x80\x22\x00\x08" + TAILSCALE_SOFTWARE  # SOFTWARE "tailnode"
_TS_HEAD = b"\x00\x01\x00\x14" + MAGIC_COOKIE_BYTES  # Binding Request, length 20, cookie


def tailscale_request(transaction_id: bytes) -> bytes:
    """The 40-byte request Tailscale clients send: SOFTWARE "tailnode" then FINGERPRINT."""
    if len(transaction_id) != 12:
        raise LocalProtocolError("transaction id must be 12 bytes")
    body = _TS_HEAD + transaction_id + _TS_ATTRS
    return body + b"\x80\x28\x00\x04" + _U32.pack(fingerprint(body))


_TS_RESP4 = b"\x01\x01\x00\x0c" + MAGIC_COOKIE_BYTES
_TS_RESP6 = b"\x01\x01\x00\x18" + MAGIC_COOKIE_BYTES


def tailscale_response(transaction_id: bytes, ip: bytes, port: int, *, with_fingerprint: bool = False) -> bytes:
    """derper's answer: a success response with exactly one XOR-MAPPED-ADDRESS (32 or 44 bytes).

    With ``with_fingerprint`` (the request carried one, RFC 8489 section 14.7) a FINGERPRINT
    follows, 8 bytes more; Tailscale's clients read the first attribute and ignore the rest."""
    head = _TS_RESP4 if len(ip) == 4 else _TS_RESP6
    xor = encode_xor_address(ip, port, transaction_id)
    body = b"\x00\x20" + len(xor).to_bytes(2, "big") + xor
    if not with_fingerprint:
        return head + transaction_id + body
    msg = head[:2] + (len(body) + 8).to_bytes(2, "big") + head[4:] + transaction_id + body
    return msg + b"\x80\x28\x00\x04" + _U32.pack(fingerprint(msg))
