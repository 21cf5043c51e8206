"""The PROXY protocol, versions 1 and 2 (HAProxy's proxy-protocol.txt), sans-IO.

A proxy in front of the relay (an SNI router on a shared :443, a TCP load balancer) opens its
connection to us with one header that names the real client.  ``parse_proxy_header(buf)``
looks at the first bytes of a connection and returns:

* ``None``: not enough bytes yet; read more (never more than ``MAX_V1_LEN`` / the v2 length);
* ``(ProxyHeader, consumed)``: the header and how many bytes of ``buf`` it took; whatever
  follows belongs to the proxied stream (TLS, HTTP).

Anything that is not a valid header raises ``RemoteProtocolError`` with reason
``proxy_header`` as soon as the bytes seen rule it out, so a client that does not speak the
protocol is refused after its first bytes, not after a timeout.  ``looks_like_proxy_header``
tells whether some first bytes *could* start a header (used to refuse headers from peers that
are not trusted proxies).

v1: ``PROXY TCP4 1.2.3.4 5.6.7.8 1234 443\\r\\n`` (also ``TCP6`` and ``UNKNOWN``), at most 107
bytes.  v2: a 12-byte signature, version/command, family/protocol, a 16-bit length, the
addresses and TLVs (ignored).  ``LOCAL`` (v2) and ``UNKNOWN`` (v1) carry no client address:
the proxy's own connection (a health check); ``ProxyHeader.source`` is then ``None``.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from .errors import RemoteProtocolError

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_V1_LEN = 107  # including the CRLF
V2_HEADER_LEN = 16
MAX_V2_PAYLOAD = 4096  # addresses plus TLVs; HAProxy sends far less
_V2_FIXED = struct.Struct(">BBH")
_V4 = struct.Struct(">4s4sHH")
_V6 = struct.Struct(">16s16sHH")
_REASON = "proxy_header"


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    version: int  # 1 or 2
    source: tuple[str, int] | None  # the real client; None for LOCAL / UNKNOWN
    destination: tuple[str, int] | None


def looks_like_proxy_header(first: bytes) -> bool | None:
    """True if ``first`` starts a PROXY header, False if it cannot, None if too short to tell."""
    for sig in (V1_PREFIX, V2_SIGNATURE):
        n = min(len(first), len(sig))
        if first[:n] == sig[:n]:
            if n == len(sig):
                return True
            return None if n == len(first) else False
    return False


def _bad(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"PROXY header: {message}", _REASON)


def _port(raw: bytes) -> int:
    if not raw.isdigit() or len(raw) > 5 or (len(raw) > 1 and raw[0:1] == b"0"):
        raise _bad(f"bad port {raw[:8]!r}")
    port = int(raw)
    if port > 65535:
        raise _bad(f"port {port} out of range")
    return port


def _addr(raw: bytes, family: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]) -> str:
    try:
        return str(family(raw.decode("ascii")))
    except (UnicodeDecodeError, ValueError):
        raise _bad(f"bad address {raw[:40]!r}") from None


def _parse_v1(buf: bytes) -> tuple[ProxyHeader, int] | None:
    end = buf.find(b"\r\n", 0, MAX_V1_LEN)
    if end < 0:
        if len(buf) >= MAX_V1_LEN or b"\n" in buf[:MAX_V1_LEN]:
            raise _bad("v1 line without CRLF in 107 bytes")
        return None
    parts = buf[len(V1_PREFIX):end].split(b" ")
    proto = parts[0]
    if proto == b"UNKNOWN":
        return ProxyHeader(1, None, None), end + 2
    if proto not in (b"TCP4", b"TCP6") or len(parts) != 5:
        raise _bad(f"bad v1 line {buf[:end][:60]!r}")
    family = ipaddress.IPv4Address if proto == b"TCP4" else ipaddress.IPv6Address
    src, dst = _addr(parts[1], family), _addr(parts[2], family)
    return ProxyHeader(1, (src, _port(parts[3])), (dst, _port(parts[4]))), end + 2


def _parse_v2(buf: bytes) -> tuple[ProxyHeader, int] | None:
    sig = len(V2_SIGNATURE)
    if len(buf) > sig and (buf[sig] >> 4 != 2 or buf[sig] & 0x0F > 1):
        raise _bad(f"v2 version/command byte {buf[sig]:#04x}")
    if len(buf) > sig + 1 and (buf[sig + 1] >> 4 > 3 or buf[sig + 1] & 0x0F > 2):
        raise _bad(f"v2 family/protocol byte {buf[sig + 1]:#04x}")
    if len(buf) < V2_HEADER_LEN:
        return None
    ver_cmd, fam, length = _V2_FIXED.unpack_from(buf, sig)
    if length > MAX_V2_PAYLOAD:
        raise _bad(f"v2 length {length} over {MAX_V2_PAYLOAD}")
    total = V2_HEADER_LEN + length
    if len(buf) < total:
        return None
    body = buf[V2_HEADER_LEN:total]
    if ver_cmd & 0x0F == 0x0:  # LOCAL: the proxy speaking for itself (health checks)
        return ProxyHeader(2, None, None), total
    family, proto = fam >> 4, fam & 0x0F
    if family == 0x1 and proto:
        if length < _V4.size:
            raise _bad(f"v2 INET block of {length} bytes")
        s, d, sp, dp = _V4.unpack_from(body)
        return ProxyHeader(2, (str(ipaddress.IPv4Address(s)), sp), (str(ipaddress.IPv4Address(d)), dp)), total
    if family == 0x2 and proto:
        if length < _V6.size:
            raise _bad(f"v2 INET6 block of {length} bytes")
        s, d, sp, dp = _V6.unpack_from(body)
        return ProxyHeader(2, (str(ipaddress.IPv6Address(s)), sp), (str(ipaddress.IPv6Address(d)), dp)), total
    # UNSPEC or UNIX: no IP address to report; the spec says to use the connection's own.
    return ProxyHeader(2, None, None), total


def parse_proxy_header(buf: bytes) -> tuple[ProxyHeader, int] | None:
    """Parse the PROXY header at the start of ``buf``.

    Returns:
        ``None`` if more bytes are needed, else the header and the number of bytes it used.

    Raises:
        RemoteProtocolError: ``buf`` does not start with a valid v1 or v2 header
            (reason ``proxy_header``).
    """
    match looks_like_proxy_header(buf):
        case None:
            return None
        case False:
            raise _bad(f"no PROXY header: {buf[:16]!r}")
    if buf.startswith(V1_PREFIX):
        return _parse_v1(buf)
    return _parse_v2(buf)


def encode_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A v1 header (for tests and clients)."""
    proto = b"TCP6" if ":" in source[0] else b"TCP4"
    return b"PROXY %s %s %s %d %d\r\n" % (proto, source[0].encode(), destination[0].encode(), source[1],
                                          destination[1])


def encode_v2(source: tuple[str, int] | None, destination: tuple[str, int] | None = None) -> bytes:
    """A v2 header: PROXY over TCP, or LOCAL when ``source`` is None (for tests and clients)."""
    if source is None:
        return V2_SIGNATURE + _V2_FIXED.pack(0x20, 0x00, 0)
    dst = destination or (("::" if ":" in source[0] else "0.0.0.0"), 0)
    s, d = ipaddress.ip_address(source[0]), ipaddress.ip_address(dst[0])
    if s.version == 4:
        body = _V4.pack(s.packed, d.packed, source[1], dst[1])
        return V2_SIGNATURE + _V2_FIXED.pack(0x21, 0x11, len(body)) + body
    body = _V6.pack(s.packed, d.packed, source[1], dst[1])
    return V2_SIGNATURE + _V2_FIXED.pack(0x21, 0x21, len(body)) + body


__all__ = [
    "MAX_V1_LEN",
    "ProxyHeader",
    "encode_v1",
    "encode_v2",
    "looks_like_proxy_header",
    "parse_proxy_header",
]
