"""Sans-IO decision for one received datagram: which bytes to answer, from where, or why not.

The server loop calls :func:`answer` with the datagram, the sender's packed IP and port, and
(in RFC 5780 mode) the grid position of the socket that received it.  It gets back either a
:class:`Reply` or an :class:`Ignore` carrying a metric label.  Nothing here does I/O.

Policy (see docs/stund.md):

* Tailscale requests (SOFTWARE "tailnode" + trailing FINGERPRINT) get derper's exact answer:
  one XOR-MAPPED-ADDRESS, 32 bytes (IPv4) or 44 bytes (IPv6).
* Other RFC 5389/8489 Binding requests get XOR-MAPPED-ADDRESS, plus OTHER-ADDRESS and
  RESPONSE-ORIGIN in RFC 5780 mode, plus FINGERPRINT when the request had one.
* Classic RFC 3489 Binding requests (no magic cookie) get MAPPED-ADDRESS, plus
  CHANGED-ADDRESS and SOURCE-ADDRESS in RFC 5780 mode.
* An unknown comprehension-required attribute gets 420 with UNKNOWN-ATTRIBUTES.
* Everything else (short or malformed datagrams, bad FINGERPRINT, responses, indications,
  other methods) is ignored.

Anti-amplification: a reply is never more than :data:`MAX_GROWTH` bytes longer than the
request.  Optional attributes that would break that budget are left out (RESPONSE-ORIGIN
first); the 420 reason phrase is shortened.  :data:`MAX_GROWTH` is what the smallest
possible request (20 bytes) needs for the bare answer over IPv6 (44 bytes).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .message import (
    HEADER_LEN,
    MAGIC_COOKIE_BYTES,
    TAILSCALE_SOFTWARE,
    Attribute,
    AttrType,
    Message,
    MessageClass,
    Method,
    RemoteProtocolError,
    decode_change_request,
    decode_response_port,
    encode_address,
    encode_error_code,
    encode_message,
    encode_unknown_attributes,
    encode_xor_address,
    fingerprint,
    parse_message,
    tailscale_response,
)

__all__ = [
    "MAX_GROWTH",
    "KIND_TAILSCALE",
    "KIND_RFC5389",
    "KIND_RFC3489",
    "IGNORE_REASONS",
    "Grid",
    "Reply",
    "Ignore",
    "answer",
]

#: A reply is at most this many bytes longer than its request.
MAX_GROWTH = 24

KIND_TAILSCALE = "tailscale"
KIND_RFC5389 = "rfc5389"
KIND_RFC3489 = "rfc3489"

#: Every reason an incoming datagram can be ignored for (closed set: metric label values).
IGNORE_REASONS = (
    "too_short",  # fewer than 20 bytes
    "not_stun",  # top bits set
    "bad_length",  # header length disagrees with the datagram
    "malformed",  # attributes overrun, bad attribute values
    "bad_fingerprint",  # FINGERPRINT not last or wrong
    "not_request",  # a response or an indication
    "unsupported_method",  # a request other than Binding
    "not_tailscale",  # --tailscale-only and not a Tailscale request
    "no_alternate",  # RFC 3489 CHANGE-REQUEST asked for a change we cannot make
)

# The understood comprehension-required attributes in a Binding request.  Authentication
# attributes are understood and ignored: stund has no credentials (RFC 8489 §9).
_KNOWN_REQUIRED = frozenset(
    {
        AttrType.MAPPED_ADDRESS,
        AttrType.CHANGE_REQUEST,
        AttrType.USERNAME,
        AttrType.MESSAGE_INTEGRITY,
        AttrType.MESSAGE_INTEGRITY_SHA256,
        AttrType.USERHASH,
        AttrType.REALM,
        AttrType.NONCE,
        AttrType.ERROR_CODE,
        AttrType.UNKNOWN_ATTRIBUTES,
        AttrType.XOR_MAPPED_ADDRESS,
        AttrType.PADDING,
        AttrType.RESPONSE_PORT,
    }
)

# Tailscale's 40-byte request, bytes 0..3 and 20..35 (spec §14.1).
_TS_PREFIX = b"\x00\x01\x00\x14" + MAGIC_COOKIE_BYTES
_TS_MIDDLE = b"\x80\x22\x00\x08" + TAILSCALE_SOFTWARE + b"\x80\x28\x00\x04"
_U32 = struct.Struct("!I")


@dataclass(frozen=True, slots=True)
class Grid:
    """RFC 5780 listening grid: socket (i, j) is bound to ``ips[i]``:``ports[j]``.

    Index 0 is the primary address/port, index 1 the alternate.
    """

    ips: tuple[bytes, bytes]
    ports: tuple[int, int]


@dataclass(frozen=True, slots=True)
class Reply:
    data: bytes
    kind: str
    port: int  # destination port (the source port unless RESPONSE-PORT asked otherwise)
    via: tuple[int, int] | None = None  # grid socket to send from; None = the receiving socket
    error: bool = False


@dataclass(frozen=True, slots=True)
class Ignore:
    reason: str
    kind: str | None = None


def answer(
    data: bytes,
    src_ip: bytes,
    src_port: int,
    *,
    tailscale_only: bool = False,
    grid: Grid | None = None,
    at: tuple[int, int] = (0, 0),
) -> Reply | Ignore:
    """Decides the answer to one datagram received from ``src_ip`` (packed, IPv4 un-mapped).

    ``at`` is the grid position of the receiving socket when ``grid`` is given.

    Returns:
        a :class:`Reply` to send, or an :class:`Ignore` with the reason.  Never raises for
        any input bytes.
    """
    # Fast path: Tailscale's fixed 40-byte request.
    if (
        len(data) == 40
        and data[:8] == _TS_PREFIX
        and data[20:36] == _TS_MIDDLE
        and _U32.unpack_from(data, 36)[0] == fingerprint(data[:32])
    ):
        return Reply(tailscale_response(data[8:20], src_ip, src_port, with_fingerprint=True), KIND_TAILSCALE,
                     src_port)
    try:
        msg = parse_message(data)
    except RemoteProtocolError as exc:
        return Ignore(exc.reason)
    kind = KIND_RFC3489 if msg.classic else KIND_RFC5389
    if msg.cls != MessageClass.REQUEST:
        return Ignore("not_request", kind)
    if msg.method != Method.BINDING:
        return Ignore("unsupported_method", kind)
    if not msg.classic and _is_tailscale(msg):
        kind = KIND_TAILSCALE
    if tailscale_only and kind != KIND_TAILSCALE:
        return Ignore("not_tailscale", kind)
    try:
        return _answer_binding(msg, len(data), src_ip, src_port, kind, grid, at)
    except RemoteProtocolError as exc:
        return Ignore(exc.reason, kind)


def _is_tailscale(msg: Message) -> bool:
    return (
        bool(msg.attributes)
        and msg.attributes[-1].type == AttrType.FINGERPRINT
        and any(a.type == AttrType.SOFTWARE and a.value == TAILSCALE_SOFTWARE for a in msg.attributes)
    )


def _answer_binding(
    msg: Message,
    req_len: int,
    src_ip: bytes,
    src_port: int,
    kind: str,
    grid: Grid | None,
    at: tuple[int, int],
) -> Reply | Ignore:
    budget = req_len + MAX_GROWTH
    unknown = [a.type for a in msg.attributes if a.type < 0x8000 and a.type not in _KNOWN_REQUIRED]
    if unknown:
        return _unknown_attributes(msg, src_port, kind, unknown, budget)

    txid = msg.transaction_id
    has_fp = msg.has(AttrType.FINGERPRINT) and not msg.classic
    reply_port = src_port
    via: tuple[int, int] | None = None
    change_value = msg.get(AttrType.CHANGE_REQUEST)
    if change_value is not None:
        change = decode_change_request(change_value)
        if grid is None:
            if msg.classic:
                if change.change_ip or change.change_port:
                    return Ignore("no_alternate", kind)
            else:
                # RFC 5780 §7.2: no alternate address => 420 for CHANGE-REQUEST.
                return _unknown_attributes(msg, src_port, kind, [AttrType.CHANGE_REQUEST], budget)
        elif change.change_ip or change.change_port:
            via = (at[0] ^ change.change_ip, at[1] ^ change.change_port)
    port_value = msg.get(AttrType.RESPONSE_PORT)
    if port_value is not None and not msg.classic:
        reply_port = decode_response_port(port_value)

    if kind == KIND_TAILSCALE and via is None:
        has_fp = bool(msg.attributes) and msg.attributes[-1].type == AttrType.FINGERPRINT
        return Reply(tailscale_response(txid, src_ip, src_port, with_fingerprint=has_fp), kind, reply_port)

    # Attribute list in priority order; optional ones are dropped to honour the budget.
    attrs: list[Attribute] = []
    optional: list[Attribute] = []
    if msg.classic:
        attrs.append(Attribute(AttrType.MAPPED_ADDRESS, encode_address(src_ip, src_port)))
    else:
        attrs.append(Attribute(AttrType.XOR_MAPPED_ADDRESS, encode_xor_address(src_ip, src_port, txid)))
    if grid is not None:
        sent_from = via if via is not None else at
        other = encode_address(grid.ips[1 - at[0]], grid.ports[1 - at[1]])
        origin = encode_address(grid.ips[sent_from[0]], grid.ports[sent_from[1]])
        if msg.classic:
            optional.append(Attribute(AttrType.CHANGED_ADDRESS, other))
            optional.append(Attribute(AttrType.SOURCE_ADDRESS, origin))
        else:
            optional.append(Attribute(AttrType.OTHER_ADDRESS, other))
            optional.append(Attribute(AttrType.RESPONSE_ORIGIN, origin))
    size = HEADER_LEN + sum(4 + len(a.value) for a in attrs) + (8 if has_fp else 0)
    if size > budget:  # cannot happen for well-formed requests; belt and braces
        has_fp = False
        size -= 8
    for attr in optional:
        cost = 4 + len(attr.value)
        if size + cost <= budget:
            attrs.append(attr)
            size += cost
    # RFC 5780 §7.6: answer a PADDING request with a reply padded to the request's size.
    if grid is not None and msg.has(AttrType.PADDING) and port_value is None:
        pad = (req_len - size - 4) & ~3
        if pad > 0:
            attrs.append(Attribute(AttrType.PADDING, bytes(pad)))
    data = encode_message(Method.BINDING, MessageClass.SUCCESS, txid, attrs, add_fingerprint=has_fp)
    return Reply(data, kind, reply_port, via)


_REASON_420 = "Unknown Attribute"


def _unknown_attributes(
    msg: Message, src_port: int, kind: str, unknown: list[int], budget: int
) -> Reply:
    listed = list(dict.fromkeys(unknown))
    has_fp = msg.has(AttrType.FINGERPRINT) and not msg.classic
    # Each unknown attribute took >= 4 request bytes, and is listed with 2 reply bytes.
    fixed = HEADER_LEN + 4 + 4 + 4 + ((2 * len(listed) + 3) & ~3) + (8 if has_fp else 0)
    room = max(0, budget - fixed) & ~3
    reason = _REASON_420[:room]
    attrs = [
        Attribute(AttrType.ERROR_CODE, encode_error_code(420, reason)),
        Attribute(AttrType.UNKNOWN_ATTRIBUTES, encode_unknown_attributes(listed)),
    ]
    data = encode_message(
        Method.BINDING, MessageClass.ERROR, msg.transaction_id, attrs, add_fingerprint=has_fp
    )
    return Reply(data, kind, src_port, None, error=True)
