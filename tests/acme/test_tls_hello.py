"""The sans-IO ClientHello reader (derpd.protocol.tls_hello) on real hellos from OpenSSL,
split every way, and on garbage."""

from __future__ import annotations

import functools
import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derpd.protocol.tls_hello import MAX_HELLO_BYTES, ClientHello, HelloError, parse_client_hello


@functools.cache
def client_hello(server_name: str | None = "derp.example.com", alpn: tuple[str, ...] = ()) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if server_name is None:
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def rerecord(hello: bytes, size: int) -> bytes:
    """The same handshake message split over records of at most ``size`` bytes."""
    assert hello[0] == 22
    payload = hello[5:]
    out = b""
    for i in range(0, len(payload), size):
        part = payload[i:i + size]
        out += hello[:3] + len(part).to_bytes(2, "big") + part
    return out


def test_reads_sni_and_alpn():
    hello = client_hello("Derp.Example.com", ("acme-tls/1",))
    assert parse_client_hello(hello) == ClientHello("derp.example.com", (b"acme-tls/1",))
    assert parse_client_hello(client_hello(None, ("h2", "http/1.1"))) == ClientHello(None, (b"h2", b"http/1.1"))
    assert parse_client_hello(client_hello("x.test")) == ClientHello("x.test", ())


def test_needs_more_until_complete_byte_by_byte_and_over_many_records():
    hello = client_hello("derp.test", ("acme-tls/1",))
    for cut in range(len(hello)):
        assert parse_client_hello(hello[:cut]) is None
    split = rerecord(hello, 100)
    for cut in range(0, len(split), 5):
        assert parse_client_hello(split[:cut]) is None
    assert parse_client_hello(split + b"extra") == ClientHello("derp.test", (b"acme-tls/1",))


@pytest.mark.parametrize("data, reason", [
    (b"GET / HTTP/1.1\r\n\r\n", "not_tls"),
    (b"\x16\x03\x01\x00\x00", "bad_record"),
    (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "not_client_hello"),
    (b"\x16\x03\x01\x00\x04\x01\xff\xff\xff", "hello_too_large"),
    (b"\x16\x03\x01\x00\x06\x01\x00\x00\x02\x03\x03", "truncated_hello"),
])
def test_garbage_is_refused_with_a_reason(data, reason):
    with pytest.raises(HelloError) as e:
        parse_client_hello(data)
    assert e.value.reason == reason


def test_bounded_in_bytes_and_records():
    hello = client_hello("derp.test")
    with pytest.raises(HelloError, match="hello_too_fragmented"):
        parse_client_hello(rerecord(hello, 1))
    # A stream of records that never completes a hello stops at the byte bound.
    head = b"\x16\x03\x01\x40\x00\x01\x00\xff\xff" + bytes(16384 - 4)
    with pytest.raises(HelloError):
        parse_client_hello(head + bytes(MAX_HELLO_BYTES))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 600))
def test_never_fails_other_than_hello_error(data, cut):
    hello = client_hello("derp.test", ("acme-tls/1",))
    mutated = bytearray(hello)
    for i, b in enumerate(data[:len(mutated)]):
        if b % 7 == 0:
            mutated[i] = b
    for candidate in (bytes(mutated), data, bytes(mutated[:cut])):
        try:
            parse_client_hello(candidate)
        except HelloError:
            pass
