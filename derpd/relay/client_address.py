"""Who a connection really comes from, when it arrives through a proxy.

Behind an SNI router on a shared :443 or a TCP load balancer, every connection comes from the
proxy.  Two ways to learn the client's address, both believed only from ``--trusted-proxies``:

* the PROXY protocol, v1 or v2, on the relay listener (``--proxy-protocol``): the proxy's
  first bytes name the client (``derpd.protocol.proxy``).  A connection from a trusted proxy
  must start with a header; a header from anyone else closes the connection (it would let any
  client claim any address);
* ``X-Forwarded-For`` on plain-HTTP requests from a trusted proxy (a TLS-terminating proxy in
  front): the client is the right-most address that is not itself a trusted proxy.

The address found feeds the per-IP limit, admission's ``Source``, the logs and the
``/metrics`` loopback check; a connection relayed by a proxy is never "local".
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import trio

from ..protocol.errors import RemoteProtocolError
from ..settings import parse_networks
from ..protocol.proxy import looks_like_proxy_header, parse_proxy_header
from ..transport.prefixed_stream import PrefixedStream

_READ = 4096 + 16

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_cidrs(text: str | Iterable[str]) -> tuple[IPNetwork, ...]:
    """``"10.0.0.0/8,127.0.0.1"`` (or a list) -> networks; a bare address is a /32 or /128.

    Raises:
        SettingsError: an entry that is not an address or a network (the message names it).
    """
    return parse_networks("--trusted-proxies", text if isinstance(text, str) else ",".join(text))


def plain_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_trusted(ip: str, trusted: tuple[IPNetwork, ...]) -> bool:
    addr = plain_address(ip)
    return addr is not None and any(addr in net for net in trusted)


def client_from_forwarded_for(values: list[bytes], trusted: tuple[IPNetwork, ...]) -> str | None:
    """The client address in ``X-Forwarded-For`` headers (all of them, in order): the right-most
    entry that is not a trusted proxy.  None when there is no usable entry (then the request
    is the proxy's own, still never "local")."""
    entries = [e.strip() for v in values for e in v.decode("latin-1").split(",")]
    for entry in reversed(entries):
        addr = plain_address(entry)
        if addr is None:
            return None  # garbage in the chain: believe nothing left of it
        if not any(addr in net for net in trusted):
            return str(addr)
    return None


async def read_proxy_header(
    stream: trio.abc.Stream, remote: tuple[str, int], trusted: tuple[IPNetwork, ...]
) -> tuple[trio.abc.Stream, tuple[str, int], bool]:
    """Read the PROXY header of a connection on a ``--proxy-protocol`` listener.

    Returns ``(stream, client, via_proxy)``: the stream to go on with (bytes read past the
    header are put back), the client's address (the connection's own for a direct client, or
    for a proxy's LOCAL/UNKNOWN health check), and whether a proxy relayed it.  The caller
    bounds the time.

    Raises:
        RemoteProtocolError: ``proxy_header`` (a trusted proxy sent no valid header),
            ``proxy_header_untrusted`` (someone else sent one), ``eof``.
    """
    buf = b""
    if is_trusted(remote[0], trusted):
        while (got := parse_proxy_header(buf)) is None:
            data = await stream.receive_some(_READ)
            if not data:
                raise RemoteProtocolError("connection closed in the PROXY header", "eof")
            buf += data
        header, used = got
        rest = buf[used:]
        return (PrefixedStream(stream, rest) if rest else stream), header.source or remote, True
    while (verdict := looks_like_proxy_header(buf)) is None:
        data = await stream.receive_some(_READ)
        if not data:
            break
        buf += data
    if verdict:
        raise RemoteProtocolError(f"PROXY header from {remote[0]}, which is not in --trusted-proxies",
                                  "proxy_header_untrusted")
    return (PrefixedStream(stream, buf) if buf else stream), remote, False


__all__ = [
    "client_from_forwarded_for",
    "is_trusted",
    "parse_cidrs",
    "plain_address",
    "read_proxy_header",
]
