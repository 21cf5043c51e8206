"""The sans-IO PROXY protocol parser: vectors from HAProxy's proxy-protocol.txt, byte-at-a-time
feeding, and garbage that may raise only RemoteProtocolError."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derpd.protocol.errors import RemoteProtocolError
from derpd.protocol.proxy import (
    MAX_V1_LEN,
    ProxyHeader,
    encode_v1,
    encode_v2,
    looks_like_proxy_header,
    parse_proxy_header,
)

SIG = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
FFFF6 = ":".join(["ffff"] * 8)

# (wire bytes, expected header): the examples and the worst cases named in proxy-protocol.txt,
# and v2 blocks laid out by hand from its section 2.2.
VECTORS = [
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
     ProxyHeader(1, ("192.168.0.1", 56324), ("192.168.0.11", 443))),
    (b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
     ProxyHeader(1, ("255.255.255.255", 65535), ("255.255.255.255", 65535))),
    (b"PROXY TCP6 %s %s 65535 65535\r\n" % (FFFF6.encode(), FFFF6.encode()),
     ProxyHeader(1, (FFFF6, 65535), (FFFF6, 65535))),
    (b"PROXY TCP6 2001:db8::1 ::1 40000 443\r\n", ProxyHeader(1, ("2001:db8::1", 40000), ("::1", 443))),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(1, None, None)),
    (b"PROXY UNKNOWN %s %s 65535 65535\r\n" % (FFFF6.encode(), FFFF6.encode()), ProxyHeader(1, None, None)),
    # v2 PROXY, TCP over IPv4: 203.0.113.7:51234 -> 192.0.2.1:443
    (SIG + b"\x21\x11\x00\x0c" + bytes([203, 0, 113, 7, 192, 0, 2, 1]) + b"\xc8\x22\x01\xbb",
     ProxyHeader(2, ("203.0.113.7", 51234), ("192.0.2.1", 443))),
    # v2 PROXY, TCP over IPv6, with a PP2_TYPE_ALPN TLV after the addresses (ignored)
    (SIG + b"\x21\x21\x00\x29" + bytes.fromhex("20010db8" + "00" * 11 + "05") + bytes(15) + b"\x01"
     + b"\x9c\x40\x01\xbb" + b"\x01\x00\x02h2",
     ProxyHeader(2, ("2001:db8::5", 40000), ("::1", 443))),
    # v2 LOCAL (a health check of the proxy itself), no address block
    (SIG + b"\x20\x00\x00\x00", ProxyHeader(2, None, None)),
    # v2 PROXY with AF_UNSPEC: no address; use the connection's own
    (SIG + b"\x21\x00\x00\x00", ProxyHeader(2, None, None)),
    # v2 AF_UNIX (216 bytes of paths): no IP address
    (SIG + b"\x21\x31\x00\xd8" + bytes(216), ProxyHeader(2, None, None)),
]


@pytest.mark.parametrize("wire,expected", VECTORS)
def test_vectors_whole_and_byte_at_a_time(wire, expected):
    tail = b"\x16\x03\x01 then TLS"
    assert parse_proxy_header(wire + tail) == (expected, len(wire))
    for i in range(len(wire)):  # every proper prefix asks for more, never errs
        assert parse_proxy_header(wire[:i]) is None, i


def test_encoders_round_trip():
    for src, dst in ((("198.51.100.2", 1), ("192.0.2.1", 443)), (("2001:db8::2", 65535), ("::1", 443))):
        for wire, version in ((encode_v1(src, dst), 1), (encode_v2(src, dst), 2)):
            assert parse_proxy_header(wire) == (ProxyHeader(version, src, dst), len(wire))
    assert parse_proxy_header(encode_v2(None))[0].source is None


@pytest.mark.parametrize("bad", [
    b"GET /derp HTTP/1.1\r\n",  # an HTTP client on a PROXY listener
    b"\x16\x03\x01\x02\x00",  # a TLS ClientHello
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # LF only
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
    b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",  # not canonical
    b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",  # family mismatch
    b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY " + b"A" * MAX_V1_LEN,  # no CRLF within 107 bytes
    SIG + b"\x11\x11\x00\x0c" + bytes(12),  # version 1 in a v2 header
    SIG + b"\x22\x11\x00\x0c" + bytes(12),  # command 2
    SIG + b"\x21\x41\x00\x0c" + bytes(12),  # family 4
    SIG + b"\x21\x13\x00\x0c" + bytes(12),  # protocol 3
    SIG + b"\x21\x11\x00\x08" + bytes(8),  # INET block too short
    SIG + b"\x21\x21\x00\x0c" + bytes(12),  # INET6 block too short
    SIG + b"\x21\x11\xff\xff",  # 64 KiB of TLVs: over our cap, refused at the length field
])
def test_garbage_is_refused_early(bad):
    with pytest.raises(RemoteProtocolError) as e:
        parse_proxy_header(bad)
    assert e.value.reason == "proxy_header"


def test_looks_like():
    assert looks_like_proxy_header(b"PROXY TCP4") is True
    assert looks_like_proxy_header(SIG + b"\x21") is True
    assert looks_like_proxy_header(b"PRO") is None
    assert looks_like_proxy_header(b"\r\n\r") is None
    assert looks_like_proxy_header(b"") is None
    assert looks_like_proxy_header(b"GET /") is False
    assert looks_like_proxy_header(b"\x16\x03\x01") is False
    assert looks_like_proxy_header(b"\r\n\r\nX") is False


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.binary(max_size=200).map(lambda b: b"PROXY " + b),
                 st.binary(max_size=200).map(lambda b: SIG + b)))
def test_garbage_raises_only_remote_protocol_error(data):
    try:
        parse_proxy_header(data)
    except RemoteProtocolError as e:
        assert e.reason == "proxy_header"


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([w for w, _ in VECTORS]), st.binary(max_size=64), st.data())
def test_split_anywhere_gives_the_same_answer(wire, tail, data):
    """Feeding a growing buffer (as a reader would, in any chunking) gives None until the
    header is complete, then the header and exactly its length."""
    buf = wire + tail
    cut = data.draw(st.integers(0, len(buf)))
    got = parse_proxy_header(buf[:cut])
    if cut < len(wire):
        assert got is None
    else:
        assert got is not None and got[1] == len(wire)
