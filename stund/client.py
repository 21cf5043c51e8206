"""Trio STUN client: one Binding query (``stund check``), and RFC 5780 NAT behaviour discovery.

Requests are retransmitted RFC 8489-style (after 0.5 s, then doubling) until ``timeout``.
Responses are matched on the transaction id and may come from any address (CHANGE-REQUEST
answers come from the other IP/port).  ``rtt`` is measured from the latest transmission
before the answer arrived.
"""

from __future__ import annotations

import os
import socket as _stdsocket
from dataclasses import dataclass, field

import trio

from .message import (
    Attribute,
    AttrType,
    MessageClass,
    Method,
    RemoteProtocolError,
    StunError,
    decode_address,
    decode_error_code,
    decode_xor_address,
    encode_change_request,
    encode_message,
    parse_message,
    tailscale_request,
    unpack_ip,
)

__all__ = [
    "StunResult",
    "StunTimeout",
    "StunErrorResponse",
    "NatReport",
    "parse_response",
    "stun_query",
    "nat_discovery",
]

INITIAL_RTO = 0.5


class StunTimeout(StunError):
    """No answer arrived in time."""


class StunErrorResponse(StunError):
    """The server answered with an error response."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"STUN error {code} {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class StunResult:
    address: tuple[str, int]
    rtt: float  # seconds
    other_address: tuple[str, int] | None = field(default=None, compare=False)
    response_origin: tuple[str, int] | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class _Parsed:
    address: tuple[str, int]
    other_address: tuple[str, int] | None
    response_origin: tuple[str, int] | None


def parse_response(data: bytes, transaction_id: bytes) -> _Parsed:
    """Parses a Binding response the way Tailscale's client does (spec §14.4): attributes up
    to the header length, XOR-MAPPED-ADDRESS (or 0x8020) preferred over MAPPED-ADDRESS,
    IPv4-mapped results un-mapped.

    Raises:
        RemoteProtocolError: not a response to ``transaction_id``, or no usable address.
        StunErrorResponse: the server answered with an error.
    """
    msg = parse_message(data, strict=False)
    if msg.transaction_id != transaction_id:
        raise RemoteProtocolError("transaction id does not match", "other_transaction")
    if msg.method != Method.BINDING:
        raise RemoteProtocolError("not a Binding response", "not_response")
    if msg.cls == MessageClass.ERROR:
        code, reason = decode_error_code(msg.get(AttrType.ERROR_CODE) or b"")
        raise StunErrorResponse(code, reason)
    if msg.cls != MessageClass.SUCCESS:
        raise RemoteProtocolError("not a success response", "not_response")
    xor = fallback = other = origin = None
    for attr in msg.attributes:
        if attr.type in (AttrType.XOR_MAPPED_ADDRESS, AttrType.XOR_MAPPED_ADDRESS_ALT) and xor is None:
            xor = decode_xor_address(attr.value, transaction_id)
        elif attr.type == AttrType.MAPPED_ADDRESS and fallback is None:
            fallback = decode_address(attr.value)
        elif attr.type in (AttrType.OTHER_ADDRESS, AttrType.CHANGED_ADDRESS) and other is None:
            other = decode_address(attr.value)
        elif attr.type in (AttrType.RESPONSE_ORIGIN, AttrType.SOURCE_ADDRESS) and origin is None:
            origin = decode_address(attr.value)
    found = xor or fallback
    if found is None:
        raise RemoteProtocolError("response has no mapped address", "malformed")

    def text(a: tuple[bytes, int] | None) -> tuple[str, int] | None:
        return None if a is None else (unpack_ip(a[0]), a[1])

    return _Parsed((unpack_ip(found[0]), found[1]), text(other), text(origin))


async def _resolve(host: str, port: int) -> tuple[int, tuple[str, int]]:
    infos = await trio.socket.getaddrinfo(host, port, type=_stdsocket.SOCK_DGRAM)
    if not infos:
        raise StunError(f"cannot resolve {host!r}")
    fam, _, _, _, sockaddr = infos[0]
    return fam, (sockaddr[0], sockaddr[1])


async def _transact(
    sock: trio.socket.SocketType,
    dest: tuple[str, int],
    request: bytes,
    txid: bytes,
    timeout: float,
) -> tuple[_Parsed, float]:
    deadline = trio.current_time() + timeout
    rto = INITIAL_RTO
    while True:
        sent_at = trio.current_time()
        await sock.sendto(request, dest)
        resend_at = min(deadline, sent_at + rto)
        rto *= 2
        with trio.move_on_at(resend_at):
            while True:
                data = await sock.recv(2048)
                try:
                    parsed = parse_response(data, txid)
                except RemoteProtocolError:
                    continue  # stray or garbage datagram: keep waiting
                return parsed, trio.current_time() - sent_at
        if trio.current_time() >= deadline:
            raise StunTimeout(f"no STUN answer from {dest[0]} port {dest[1]} within {timeout:g}s")


def _new_request(tailscale_style: bool, change: tuple[bool, bool] | None = None) -> tuple[bytes, bytes]:
    txid = os.urandom(12)
    if tailscale_style and change is None:
        return tailscale_request(txid), txid
    attrs = []
    if change is not None:
        attrs.append(Attribute(AttrType.CHANGE_REQUEST, encode_change_request(*change)))
    return encode_message(Method.BINDING, MessageClass.REQUEST, txid, attrs, add_fingerprint=True), txid


async def stun_query(
    host: str, port: int, *, timeout: float = 2.0, tailscale_style: bool = True
) -> StunResult:
    """Sends one Binding request and returns our reflexive address and the round-trip time.

    ``tailscale_style`` sends Tailscale's exact 40-byte request (which derper requires);
    otherwise a plain RFC 8489 request with FINGERPRINT.

    Raises:
        StunTimeout: no answer within ``timeout`` seconds.
        StunErrorResponse: the server answered with an error.
        StunError: ``host`` could not be resolved.
    """
    fam, dest = await _resolve(host, port)
    with trio.socket.socket(fam, _stdsocket.SOCK_DGRAM) as sock:
        request, txid = _new_request(tailscale_style)
        parsed, rtt = await _transact(sock, dest, request, txid, timeout)
    return StunResult(parsed.address, rtt, parsed.other_address, parsed.response_origin)


@dataclass(frozen=True, slots=True)
class NatReport:
    """RFC 5780 §4.3/§4.4 results.  Behaviours are ``endpoint-independent``,
    ``address-dependent``, ``address-and-port-dependent`` or ``no-nat``."""

    mapped: tuple[str, int]
    local: tuple[str, int]
    other_address: tuple[str, int]
    mapping: str
    filtering: str


async def nat_discovery(host: str, port: int, *, timeout: float = 2.0) -> NatReport:
    """Runs the RFC 5780 mapping and filtering tests against a server with an alternate address.

    Raises:
        StunError: the server does not return OTHER-ADDRESS (no RFC 5780 support), or a
            mandatory test got no answer (StunTimeout).
    """
    fam, dest = await _resolve(host, port)
    with trio.socket.socket(fam, _stdsocket.SOCK_DGRAM) as sock:
        await sock.bind(("::" if fam == _stdsocket.AF_INET6 else "0.0.0.0", 0))

        async def query(to: tuple[str, int], change: tuple[bool, bool] | None = None) -> _Parsed:
            request, txid = _new_request(False, change)
            parsed, _ = await _transact(sock, to, request, txid, timeout)
            return parsed

        first = await query(dest)
        if first.other_address is None:
            raise StunError(
                f"{host} port {port} did not send OTHER-ADDRESS: it does not support RFC 5780 "
                "(start stund with --alternate-addr)"
            )
        other_ip, other_port = first.other_address
        local_port = sock.getsockname()[1]
        # Mapping: test I is `first`; test II to the alternate IP, primary port; test III to both.
        if first.address[1] == local_port and await _is_local_ip(fam, first.address[0], dest):
            mapping = "no-nat"
        else:
            second = await query((other_ip, dest[1]))
            if second.address == first.address:
                mapping = "endpoint-independent"
            else:
                third = await query((other_ip, other_port))
                mapping = "address-dependent" if third.address == second.address else "address-and-port-dependent"
        # Filtering: test II asks for an answer from the other IP and port; test III other port.
        try:
            await query(dest, (True, True))
            filtering = "endpoint-independent"
        except StunTimeout:
            try:
                await query(dest, (False, True))
                filtering = "address-dependent"
            except StunTimeout:
                filtering = "address-and-port-dependent"
        return NatReport(first.address, (first.address[0], local_port), first.other_address, mapping, filtering)


async def _is_local_ip(fam: int, ip: str, dest: tuple[str, int]) -> bool:
    """True if ``ip`` is the source address this host uses to reach ``dest``."""
    with trio.socket.socket(fam, _stdsocket.SOCK_DGRAM) as probe:
        await probe.connect(dest)
        return bool(probe.getsockname()[0] == ip)
