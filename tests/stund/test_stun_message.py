"""Codec tests: golden vectors (spec Appendix A, Tailscale's stun_test.go), validation, Hypothesis."""

import subprocess
import sys
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from . import stun_vectors as V
from stund.binding import IGNORE_REASONS
from stund.client import parse_response
from stund.message import (
    FINGERPRINT_XOR,
    Attribute,
    AttrType,
    LocalProtocolError,
    MessageClass,
    Method,
    RemoteProtocolError,
    decode_address,
    decode_change_request,
    decode_error_code,
    decode_response_port,
    decode_unknown_attributes,
    decode_xor_address,
    encode_change_request,
    encode_error_code,
    encode_message,
    encode_response_port,
    encode_unknown_attributes,
    encode_xor_address,
    message_type,
    pack_ip,
    parse_message,
    split_message_type,
    tailscale_request,
    tailscale_response,
    unpack_ip,
)


def test_appendix_a_request():
    assert tailscale_request(V.TXID) == V.APPENDIX_A_REQUEST
    msg = parse_message(V.APPENDIX_A_REQUEST)
    assert (msg.method, msg.cls, msg.transaction_id) == (Method.BINDING, MessageClass.REQUEST, V.TXID)
    assert msg.get(AttrType.SOFTWARE) == b"tailnode"
    assert msg.attributes[-1].type == AttrType.FINGERPRINT
    crc = zlib.crc32(V.APPENDIX_A_REQUEST[:32]) ^ FINGERPRINT_XOR
    assert V.APPENDIX_A_REQUEST[36:] == crc.to_bytes(4, "big")


@pytest.mark.parametrize(
    "ip, port, wire",
    [
        ("192.0.2.1", 54321, V.APPENDIX_A_RESPONSE_V4),
        ("2001:db8::1", 54321, V.APPENDIX_A_RESPONSE_V6),
    ],
)
def test_appendix_a_responses(ip, port, wire):
    assert tailscale_response(V.TXID, pack_ip(ip), port) == wire
    assert parse_response(wire, V.TXID).address == (ip, port)


def test_appendix_a_mapped_response_is_unmapped_by_client():
    # The Go server's dual-stack form (family 2, ::ffff:192.0.2.1) reads as plain IPv4.
    assert parse_response(V.APPENDIX_A_RESPONSE_MAPPED, V.TXID).address == ("192.0.2.1", 54321)
    # and we never build it: pack_ip un-maps.
    assert tailscale_response(V.TXID, pack_ip("::ffff:192.0.2.1"), 54321) == V.APPENDIX_A_RESPONSE_V4


@pytest.mark.parametrize("name, wire, txid, ip, port", V.TAILSCALE_RESPONSES, ids=[v[0] for v in V.TAILSCALE_RESPONSES])
def test_tailscale_response_vectors(name, wire, txid, ip, port):
    data = bytes.fromhex(wire)
    parsed = parse_response(data, bytes.fromhex(txid))
    assert parsed.address == (ip, port)


@pytest.mark.parametrize(
    "txid, ip, port",
    [(bytes([n]) * 12, ip, port) for n, (ip, port) in enumerate(
        [("1.2.3.4", 254), ("1.2.3.4", 257), ("1::4", 254), ("1::4", 257)], start=1)],
)
def test_tailscale_response_round_trip(txid, ip, port):
    # Tailscale's TestResponse table.
    assert parse_response(tailscale_response(txid, pack_ip(ip), port), txid).address == (ip, port)


def test_message_type_interleaving():
    assert message_type(Method.BINDING, MessageClass.REQUEST) == 0x0001
    assert message_type(Method.BINDING, MessageClass.INDICATION) == 0x0011
    assert message_type(Method.BINDING, MessageClass.SUCCESS) == 0x0101
    assert message_type(Method.BINDING, MessageClass.ERROR) == 0x0111
    assert split_message_type(0x0111) == (1, MessageClass.ERROR)
    assert split_message_type(message_type(0xFFF, 3)) == (0xFFF, MessageClass.ERROR)
    with pytest.raises(LocalProtocolError):
        message_type(0x1000, 0)


def test_fingerprint_round_trip_and_tamper():
    data = encode_message(Method.BINDING, MessageClass.REQUEST, V.TXID,
                          [Attribute(AttrType.SOFTWARE, b"abc")], add_fingerprint=True)
    msg = parse_message(data)
    assert [a.type for a in msg.attributes] == [AttrType.SOFTWARE, AttrType.FINGERPRINT]
    assert msg.get(AttrType.SOFTWARE) == b"abc"
    bad = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(RemoteProtocolError) as info:
        parse_message(bad)
    assert info.value.reason == "bad_fingerprint"


def test_fingerprint_must_be_last():
    fp_first = encode_message(Method.BINDING, MessageClass.REQUEST, V.TXID, [
        Attribute(AttrType.FINGERPRINT, b"\0\0\0\0"), Attribute(AttrType.SOFTWARE, b"x")])
    with pytest.raises(RemoteProtocolError) as info:
        parse_message(fp_first)
    assert info.value.reason == "bad_fingerprint"


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "too_short"),
        (b"\x00\x01\x00\x00\x21\x12\xa4\x42" + b"\0" * 11, "too_short"),
        (b"\xc0\x01\x00\x00\x21\x12\xa4\x42" + b"\0" * 12, "not_stun"),
        (b"\x00\x01\x00\x04\x21\x12\xa4\x42" + b"\0" * 12, "bad_length"),  # header says 4, has 0
        (b"\x00\x01\x00\x02\x21\x12\xa4\x42" + b"\0" * 14, "bad_length"),  # not a multiple of 4
        (b"\x00\x01\x00\x04\x21\x12\xa4\x42" + b"\0" * 12 + b"\x80\x22\x00\x08", "malformed"),
        (b"\x00\x01\x00\x08\x21\x12\xa4\x42" + b"\0" * 12 + b"\x80\x22\x00\x05abcd", "malformed"),
    ],
)
def test_rejections(data, reason):
    with pytest.raises(RemoteProtocolError) as info:
        parse_message(data)
    assert info.value.reason == reason


def test_trailing_garbage_strict_vs_lenient():
    data = V.APPENDIX_A_RESPONSE_V4 + b"junk"
    with pytest.raises(RemoteProtocolError):
        parse_message(data)
    assert parse_message(data, strict=False).transaction_id == V.TXID


def test_padding_is_respected():
    data = encode_message(Method.BINDING, MessageClass.REQUEST, V.TXID, [
        Attribute(AttrType.SOFTWARE, b"a"), Attribute(AttrType.PADDING, b"xyz"), Attribute(AttrType.USERNAME, b"")])
    assert len(data) == 20 + 8 + 8 + 4
    assert [a.value for a in parse_message(data).attributes] == [b"a", b"xyz", b""]


def test_classic_rfc3489_message():
    txid16 = bytes(range(16))
    data = encode_message(Method.BINDING, MessageClass.REQUEST, txid16,
                          [Attribute(AttrType.CHANGE_REQUEST, encode_change_request(False, False))])
    msg = parse_message(data)
    assert msg.classic and msg.transaction_id == txid16
    assert decode_change_request(msg.get(AttrType.CHANGE_REQUEST)) == decode_change_request(b"\0\0\0\0")
    with pytest.raises(LocalProtocolError):
        encode_message(Method.BINDING, MessageClass.REQUEST, txid16, add_fingerprint=True)


def test_attribute_value_codecs():
    assert decode_error_code(encode_error_code(420, "Unknown Attribute")) == (420, "Unknown Attribute")
    assert decode_unknown_attributes(encode_unknown_attributes([0x7FFF, 0x0002])) == [0x7FFF, 0x0002]
    assert decode_response_port(encode_response_port(4242)) == 4242
    cr = decode_change_request(encode_change_request(True, False))
    assert (cr.change_ip, cr.change_port) == (True, False)
    for ip in ("203.0.113.9", "2001:db8::7"):
        packed = pack_ip(ip)
        assert decode_xor_address(encode_xor_address(packed, 9, V.TXID), V.TXID) == (packed, 9)
        assert unpack_ip(packed) == ip
    with pytest.raises(RemoteProtocolError):
        decode_address(b"\x00\x03\x00\x01" + b"\0" * 16)
    with pytest.raises(RemoteProtocolError):
        decode_address(b"\x00\x01\x00\x01\x7f")
    with pytest.raises(RemoteProtocolError):
        decode_error_code(b"\x00\x00\x09\x00")
    with pytest.raises(LocalProtocolError):
        encode_error_code(200, "")


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=120))
def test_garbage_raises_only_remote_protocol_error(data):
    try:
        msg = parse_message(data)
    except RemoteProtocolError as exc:
        assert exc.reason in IGNORE_REASONS
        return
    assert len(data) == 20 + sum(4 + len(a.value) + (-len(a.value) % 4) for a in msg.attributes)


@settings(max_examples=1500, deadline=None)
@given(
    st.sampled_from([b"\x00\x01", b"\x01\x01", b"\x01\x11", b"\x00\x11"]),
    st.binary(min_size=12, max_size=12),
    st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=24)), max_size=6),
    st.binary(max_size=8),
)
def test_structured_garbage_raises_only_remote_protocol_error(head, txid, attrs, tail):
    # Well-framed attributes with hostile values, plus trailing bytes: the server and client
    # parsers raise only RemoteProtocolError (or StunErrorResponse, a StunError, for errors).
    from stund.client import StunErrorResponse

    body = b"".join(t.to_bytes(2, "big") + len(v).to_bytes(2, "big") + v + b"\0" * (-len(v) % 4) for t, v in attrs)
    data = head + len(body).to_bytes(2, "big") + b"\x21\x12\xa4\x42" + txid + body + tail
    for strict in (True, False):
        try:
            parse_message(data, strict=strict)
        except RemoteProtocolError:
            pass
    try:
        parse_response(data, txid)
    except (RemoteProtocolError, StunErrorResponse):
        pass


@settings(max_examples=500, deadline=None)
@given(
    st.binary(min_size=12, max_size=12),
    st.lists(st.tuples(st.integers(0, 0xFFFF).filter(lambda t: t != AttrType.FINGERPRINT), st.binary(max_size=40)),
             max_size=5),
    st.booleans(),
)
def test_encode_parse_round_trip(txid, attrs, fp):
    data = encode_message(Method.BINDING, MessageClass.SUCCESS, txid, [Attribute(t, v) for t, v in attrs],
                          add_fingerprint=fp)
    msg = parse_message(data)
    got = [(a.type, a.value) for a in msg.attributes]
    if fp:
        assert got[-1][0] == AttrType.FINGERPRINT
        got = got[:-1]
    assert got == attrs and msg.transaction_id == txid


def test_codec_is_sans_io():
    # Import the codec and the binding policy with trio/socket/asyncio blocked.  The package
    # __init__ pulls in the server, so a bare package object stands in for it.
    code = """
import importlib.util, sys, types
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('trio', 'socket', 'asyncio'):
            raise ImportError('blocked ' + name)
spec = importlib.util.find_spec('stund')
sys.meta_path.insert(0, Block())
pkg = types.ModuleType('stund')
pkg.__path__ = list(spec.submodule_search_locations)
sys.modules['stund'] = pkg
import stund.message, stund.binding
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
