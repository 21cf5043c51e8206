"""The answer policy, sans-IO: which datagrams get which reply, and the amplification bound."""

import os
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from . import stun_vectors as V
from stund.binding import IGNORE_REASONS, MAX_GROWTH, Grid, Ignore, Reply, answer
from stund.client import StunErrorResponse, parse_response
from stund.message import (
    Attribute,
    AttrType,
    MessageClass,
    Method,
    decode_address,
    decode_unknown_attributes,
    encode_change_request,
    encode_message,
    encode_response_port,
    pack_ip,
    parse_message,
    tailscale_request,
)

V4 = pack_ip("192.0.2.1")
V6 = pack_ip("2001:db8::1")
GRID = Grid((pack_ip("127.0.0.1"), pack_ip("127.0.0.2")), (3478, 3479))


def req(attrs=(), *, fp=False, txid=V.TXID, cls=MessageClass.REQUEST, method=Method.BINDING):
    return encode_message(method, cls, txid, list(attrs), add_fingerprint=fp)


def with_fp(derper_wire: bytes) -> bytes:
    """derper's answer plus the FINGERPRINT we add because the request carried one."""
    body = derper_wire[:2] + (len(derper_wire) - 20 + 8).to_bytes(2, "big") + derper_wire[4:]
    return body + b"\x80\x28\x00\x04" + (zlib.crc32(body) ^ 0x5354554E).to_bytes(4, "big")


def test_tailscale_request_gets_derper_bytes_plus_fingerprint():
    for ip, wire in ((V4, V.APPENDIX_A_RESPONSE_V4), (V6, V.APPENDIX_A_RESPONSE_V6)):
        r = answer(V.APPENDIX_A_REQUEST, ip, 54321)
        assert isinstance(r, Reply) and r.kind == "tailscale" and r.port == 54321
        assert r.data == with_fp(wire)  # Appendix A's XOR-MAPPED-ADDRESS, then FINGERPRINT
        assert parse_message(r.data).attributes[-1].type == AttrType.FINGERPRINT  # strict parse
        assert len(r.data) <= len(V.APPENDIX_A_REQUEST) + 12  # no amplification


def test_tailscale_request_with_extra_attribute_takes_slow_path():
    data = req([Attribute(AttrType.SOFTWARE, b"tailnode"), Attribute(AttrType.USERNAME, b"u")], fp=True)
    r = answer(data, V4, 1)
    assert r.kind == "tailscale" and r.data == with_fp(V.APPENDIX_A_RESPONSE_V4.replace(b"\xf5\x23", b"\x21\x13"))


def test_rfc5389_request_gets_xor_mapped_and_fingerprint_when_asked():
    plain = answer(req(), V4, 54321)
    assert plain.kind == "rfc5389" and len(plain.data) == 32
    assert parse_response(plain.data, V.TXID).address == ("192.0.2.1", 54321)
    with_fp = answer(req(fp=True), V6, 54321)
    msg = parse_message(with_fp.data)  # strict parse checks the FINGERPRINT
    assert msg.attributes[-1].type == AttrType.FINGERPRINT
    assert parse_response(with_fp.data, V.TXID).address == ("2001:db8::1", 54321)


def test_rfc3489_request_gets_mapped_address():
    txid16 = os.urandom(16)
    r = answer(req(txid=txid16), V4, 4000)
    assert r.kind == "rfc3489"
    msg = parse_message(r.data)
    assert msg.transaction_id == txid16 and msg.cls == MessageClass.SUCCESS
    assert decode_address(msg.get(AttrType.MAPPED_ADDRESS)) == (V4, 4000)
    assert not msg.has(AttrType.XOR_MAPPED_ADDRESS)


def test_unknown_comprehension_required_attribute_gets_420():
    r = answer(req([Attribute(0x7777, b""), Attribute(0x8999, b"ok")]), V4, 1)
    assert r.error
    with pytest.raises(StunErrorResponse) as info:
        parse_response(r.data, V.TXID)
    assert info.value.code == 420
    assert decode_unknown_attributes(parse_message(r.data).get(AttrType.UNKNOWN_ATTRIBUTES)) == [0x7777]
    assert len(r.data) <= len(req([Attribute(0x7777, b""), Attribute(0x8999, b"ok")])) + MAX_GROWTH


def test_rfc3489_response_address_is_not_honoured():
    # RESPONSE-ADDRESS would make us reflect to a third party: it is "unknown" => 420 to the sender.
    r = answer(req([Attribute(AttrType.RESPONSE_ADDRESS, b"\0\x01\x00\x35\x08\x08\x08\x08")], txid=os.urandom(16)),
               V4, 1)
    assert r.error and r.port == 1 and r.via is None


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\x00\x01", "too_short"),
        (b"\xff" * 40, "not_stun"),
        (V.APPENDIX_A_REQUEST[:-1] + b"\x00", "bad_fingerprint"),
        (V.APPENDIX_A_RESPONSE_V4, "not_request"),
        (req(cls=MessageClass.INDICATION), "not_request"),
        (req(method=0x003), "unsupported_method"),
        (V.APPENDIX_A_REQUEST + b"\0\0\0\0", "bad_length"),
    ],
)
def test_ignored(data, reason):
    r = answer(data, V4, 1)
    assert isinstance(r, Ignore) and r.reason == reason


def test_tailscale_only():
    assert answer(V.APPENDIX_A_REQUEST, V4, 1, tailscale_only=True).kind == "tailscale"
    for other in (req(), req(fp=True), req(txid=os.urandom(16))):
        r = answer(other, V4, 1, tailscale_only=True)
        assert isinstance(r, Ignore) and r.reason == "not_tailscale"


def test_change_request_without_alternate():
    change = Attribute(AttrType.CHANGE_REQUEST, encode_change_request(True, True))
    zero = Attribute(AttrType.CHANGE_REQUEST, encode_change_request(False, False))
    assert answer(req([change]), V4, 1).error  # RFC 5780 §7.2: 420
    assert answer(req([change], txid=os.urandom(16)), V4, 1) == Ignore("no_alternate", "rfc3489")
    assert not answer(req([zero], txid=os.urandom(16)), V4, 1).error


@pytest.mark.parametrize("at", [(0, 0), (0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize("change_ip, change_port", [(False, False), (True, False), (False, True), (True, True)])
def test_rfc5780_grid(at, change_ip, change_port):
    # A padded request leaves room for both RFC 5780 attributes.
    data = req([Attribute(AttrType.CHANGE_REQUEST, encode_change_request(change_ip, change_port)),
                Attribute(0x8001, bytes(16))])
    r = answer(data, V4, 5000, grid=GRID, at=at)
    sent_from = (at[0] ^ change_ip, at[1] ^ change_port)
    assert r.via == (sent_from if (change_ip or change_port) else None)
    msg = parse_message(r.data)
    assert decode_address(msg.get(AttrType.RESPONSE_ORIGIN)) == (GRID.ips[sent_from[0]], GRID.ports[sent_from[1]])
    assert decode_address(msg.get(AttrType.OTHER_ADDRESS)) == (GRID.ips[1 - at[0]], GRID.ports[1 - at[1]])
    assert parse_response(r.data, V.TXID).address == ("192.0.2.1", 5000)


def test_rfc5780_small_request_keeps_other_address_drops_origin():
    r = answer(req(), V4, 5000, grid=GRID)
    msg = parse_message(r.data)
    assert msg.has(AttrType.OTHER_ADDRESS) and not msg.has(AttrType.RESPONSE_ORIGIN)
    assert len(r.data) <= 20 + MAX_GROWTH


def test_rfc5780_response_port_and_padding():
    data = req([Attribute(AttrType.RESPONSE_PORT, encode_response_port(7777))])
    assert answer(data, V4, 5000, grid=GRID).port == 7777
    padded = req([Attribute(AttrType.PADDING, bytes(1500))])
    r = answer(padded, V4, 5000, grid=GRID)
    assert len(padded) - 4 <= len(r.data) <= len(padded)


def test_rfc3489_in_grid_gets_changed_and_source_address():
    data = req([Attribute(AttrType.CHANGE_REQUEST, encode_change_request(False, False)), Attribute(0x8001, bytes(4))],
               txid=os.urandom(16))
    msg = parse_message(answer(data, V4, 5000, grid=GRID, at=(1, 0)).data)
    assert decode_address(msg.get(AttrType.CHANGED_ADDRESS)) == (GRID.ips[0], GRID.ports[1])
    assert decode_address(msg.get(AttrType.SOURCE_ADDRESS)) == (GRID.ips[1], GRID.ports[0])


_attr = st.tuples(
    st.sampled_from([AttrType.SOFTWARE, AttrType.CHANGE_REQUEST, AttrType.PADDING, AttrType.RESPONSE_PORT,
                     AttrType.USERNAME, 0x7777, 0x8001, 0x0002]),
    st.binary(max_size=12),
)


@settings(max_examples=2000, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=80),
        st.builds(
            lambda attrs, fp, classic, cls: req([Attribute(t, v) for t, v in attrs], fp=fp and not classic,
                                                txid=os.urandom(16 if classic else 12), cls=cls),
            st.lists(_attr, max_size=4), st.booleans(), st.booleans(), st.sampled_from(list(MessageClass)),
        ),
    ),
    st.sampled_from([V4, V6]),
    st.booleans(),
    st.sampled_from([(0, 0), (0, 1), (1, 0), (1, 1)]),
    st.booleans(),
)
def test_never_amplifies_and_never_raises(data, ip, use_grid, at, tailscale_only):
    r = answer(data, ip, 40000, grid=GRID if use_grid else None, at=at, tailscale_only=tailscale_only)
    if isinstance(r, Ignore):
        assert r.reason in IGNORE_REASONS
    else:
        assert len(r.data) <= len(data) + MAX_GROWTH
        assert len(data) >= 20
        parse_message(r.data)  # well-formed, FINGERPRINT (if any) correct
