"""Sans-IO protocol core: frames, messages, handshake, against the spec's Appendix A vectors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derpd.keys import NodePrivate, NodePublic
from derpd.protocol.errors import LocalProtocolError, RemoteProtocolError
from derpd.protocol.frames import (
    CLIENT_MAX_FRAME_LEN,
    CLIENT_READ_LIMITS,
    MAX_PACKET_SIZE,
    SERVER_READ_LIMITS,
    FrameDecoder,
    FrameType,
    PeerGoneReason,
    PeerPresentFlags,
    encode_frame,
)
from derpd.protocol.handshake import (
    NEED_DATA,
    ClientAuthenticated,
    ClientHandshake,
    LoginComplete,
    ServerHandshake,
    ServerKeyReceived,
)
from derpd.protocol.messages import (
    ClientInfo,
    ClosePeer,
    ForwardPacket,
    Health,
    KeepAlive,
    NotePreferred,
    PeerGone,
    PeerPresent,
    Ping,
    Pong,
    RecvPacket,
    Restarting,
    SendPacket,
    ServerInfo,
    ServerKey,
    UnknownFrame,
    WatchConns,
    encode_peer_gone,
    encode_peer_present,
    encode_recv_packet,
    encode_restarting,
    encode_send_packet,
    looks_like_disco,
    parse_client_frame,
    parse_server_frame,
)

from . import vectors as v

SERVER = NodePrivate(v.SERVER_PRIVATE)
CLIENT = NodePrivate(v.CLIENT_PRIVATE)


def feed_three_ways(data: bytes, limits=SERVER_READ_LIMITS, max_unknown=None):
    """Yields the frames decoded when ``data`` is fed whole, one byte at a time, and with
    trailing garbage (the garbage must stay buffered, not decoded)."""
    results = []
    whole = FrameDecoder(limits, max_unknown)
    whole.receive_data(data)
    results.append(whole.frames())
    byte = FrameDecoder(limits, max_unknown)
    got = []
    for i in range(len(data)):
        byte.receive_data(data[i : i + 1])
        got.extend(byte.frames())
    results.append(got)
    trailing = FrameDecoder(limits, max_unknown)
    trailing.receive_data(data + b"\x04\x00\x00")
    results.append(trailing.frames())
    assert trailing.buffered() == b"\x04\x00\x00"
    return results


# ------------------------------------------------------------------- keys


def test_appendix_a_keys():
    assert SERVER.public.raw == v.SERVER_PUBLIC
    assert CLIENT.public.raw == v.CLIENT_PUBLIC
    assert str(CLIENT.public) == "nodekey:" + v.CLIENT_PUBLIC.hex()
    assert NodePublic.parse(str(CLIENT.public)) == CLIENT.public
    assert NodePublic.parse("nodekey:" + v.CLIENT_PUBLIC.hex().upper()) == CLIENT.public
    assert NodePrivate.parse(str(SERVER)).raw == v.SERVER_PRIVATE
    assert "privkey" not in repr(SERVER)


@pytest.mark.parametrize("text", ["nodekey:", "nodekey:zz" + "0" * 62, "NODEKEY:" + "0" * 64, "0" * 64,
                                  "nodekey:" + "0" * 63, "mkey:" + "0" * 64])
def test_bad_key_text(text):
    with pytest.raises(ValueError):
        NodePublic.parse(text)


def test_generated_keys_are_clamped():
    k = NodePrivate.generate().raw
    assert k[0] & 7 == 0 and k[31] & 0x80 == 0 and k[31] & 0x40


# ------------------------------------------------------------------- frames


@pytest.mark.parametrize(
    "frame, limits, expected",
    [
        (v.SEND_PACKET, SERVER_READ_LIMITS, SendPacket(CLIENT.public, b"hello")),
        (v.NOTE_PREFERRED, SERVER_READ_LIMITS, NotePreferred(True)),
        (v.PING, SERVER_READ_LIMITS, Ping(bytes(range(1, 9)))),
        (v.RECV_PACKET, CLIENT_READ_LIMITS, RecvPacket(SERVER.public, b"hello")),
        (v.KEEP_ALIVE, CLIENT_READ_LIMITS, KeepAlive()),
        (v.PEER_GONE, CLIENT_READ_LIMITS, PeerGone(CLIENT.public, PeerGoneReason.DISCONNECTED)),
        (v.PEER_PRESENT, CLIENT_READ_LIMITS, PeerPresent(CLIENT.public, "203.0.113.7", 41641, 1)),
        (v.PONG, CLIENT_READ_LIMITS, Pong(bytes(range(1, 9)))),
        (v.RESTARTING, CLIENT_READ_LIMITS, Restarting(1500, 10000)),
        (v.SERVER_KEY, CLIENT_READ_LIMITS, ServerKey(SERVER.public)),
    ],
)
def test_golden_frames_decode(frame, limits, expected):
    parse = parse_client_frame if limits is SERVER_READ_LIMITS else parse_server_frame
    for frames in feed_three_ways(frame, limits):
        assert len(frames) == 1
        assert parse(*frames[0]) == expected


def test_golden_frames_encode():
    assert encode_send_packet(CLIENT.public, b"hello") == v.SEND_PACKET
    assert encode_recv_packet(SERVER.public, b"hello") == v.RECV_PACKET
    assert encode_frame(FrameType.KEEP_ALIVE) == v.KEEP_ALIVE
    assert encode_frame(FrameType.NOTE_PREFERRED, b"\x01") == v.NOTE_PREFERRED
    assert encode_peer_gone(CLIENT.public, PeerGoneReason.DISCONNECTED) == v.PEER_GONE
    assert encode_peer_present(CLIENT.public, "203.0.113.7", 41641, PeerPresentFlags.IS_REGULAR) == v.PEER_PRESENT
    assert encode_frame(FrameType.PING, bytes(range(1, 9))) == v.PING
    assert encode_frame(FrameType.PONG, bytes(range(1, 9))) == v.PONG
    assert encode_restarting(1500, 10000) == v.RESTARTING


def test_all_frames_in_one_buffer():
    stream = v.SEND_PACKET + v.NOTE_PREFERRED + v.PING + encode_frame(FrameType.WATCH_CONNS)
    for frames in feed_three_ways(stream):
        assert [t for t, _ in frames] == [4, 7, 0x12, 0x10]


def test_oversize_length_rejected_at_header():
    d = FrameDecoder(SERVER_READ_LIMITS)
    d.receive_data(b"\x04\xff\xff\xff\xf0")  # nothing of the payload has arrived
    with pytest.raises(RemoteProtocolError) as e:
        d.frames()
    assert e.value.reason == "frame_too_large"


def test_packet_over_64k_rejected():
    d = FrameDecoder(SERVER_READ_LIMITS)
    d.receive_data(encode_frame(FrameType.SEND_PACKET, bytes(32 + MAX_PACKET_SIZE + 1))[:5])
    with pytest.raises(RemoteProtocolError):
        d.frames()


def test_unknown_frame_skipped_by_streaming_without_buffering():
    d = FrameDecoder(SERVER_READ_LIMITS)
    length = 10 << 20  # any length is accepted for an unknown type...
    d.receive_data(b"\x0b" + length.to_bytes(4, "big"))
    chunk = b"y" * (1 << 20)
    for _ in range(10):
        d.receive_data(chunk)
        assert d.frames() == []
        assert d.buffered() == b""  # ...and its payload is discarded as it arrives, never buffered
    d.receive_data(v.PING)
    assert d.frames() == [(0x12, bytes(range(1, 9)))]
    assert d.skipped_frames == 1
    huge = FrameDecoder(SERVER_READ_LIMITS)
    huge.receive_data(b"\x0b\xff\xff\xff\xf0" + b"z" * 100)
    assert huge.frames() == [] and huge.buffered() == b""


def test_client_decoder_caps_unknown_frames_at_1mib():
    d = FrameDecoder(CLIENT_READ_LIMITS, max_unknown=CLIENT_MAX_FRAME_LEN)
    d.receive_data(b"\x7f\x00\x10\x00\x01")
    with pytest.raises(RemoteProtocolError):
        d.frames()


def test_eof_mid_frame_is_an_error():
    d = FrameDecoder(SERVER_READ_LIMITS)
    d.receive_data(v.SEND_PACKET[:10])
    d.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as e:
        d.frames()
    assert e.value.reason == "truncated_frame"


@pytest.mark.parametrize(
    "ftype, payload, reason",
    [
        (FrameType.SEND_PACKET, bytes(31), "bad_send_packet"),
        (FrameType.FORWARD_PACKET, bytes(63), "bad_forward_packet"),
        (FrameType.NOTE_PREFERRED, b"", "bad_note_preferred"),
        (FrameType.WATCH_CONNS, b"x", "bad_watch_conns"),
        (FrameType.CLOSE_PEER, bytes(31), "bad_close_peer"),
        (FrameType.PING, bytes(7), "bad_ping"),
        (FrameType.PING, bytes(1001), "bad_ping"),
    ],
)
def test_server_rejects_bad_sizes(ftype, payload, reason):
    with pytest.raises(RemoteProtocolError) as e:
        parse_client_frame(ftype, payload)
    assert e.value.reason == reason


def test_server_side_frame_kinds():
    k = CLIENT.public
    assert parse_client_frame(FrameType.FORWARD_PACKET, k.raw + SERVER.public.raw + b"p") == ForwardPacket(
        k, SERVER.public, b"p")
    assert parse_client_frame(FrameType.WATCH_CONNS, b"") == WatchConns()
    assert parse_client_frame(FrameType.CLOSE_PEER, k.raw) == ClosePeer(k)
    assert parse_client_frame(FrameType.PING, bytes(range(1, 11)) * 10) == Ping(bytes(range(1, 9)))
    assert parse_client_frame(FrameType.PONG, bytes(8)) == UnknownFrame(FrameType.PONG)
    assert parse_client_frame(0x0B, b"") == UnknownFrame(0x0B)


def test_client_skips_short_frames_and_accepts_short_forms():
    k = CLIENT.public
    assert parse_server_frame(FrameType.RECV_PACKET, bytes(31)) is None
    assert parse_server_frame(FrameType.PEER_GONE, k.raw) == PeerGone(k, 0)
    assert parse_server_frame(FrameType.PEER_PRESENT, k.raw) == PeerPresent(k)
    ipv6 = encode_peer_present(k, "2001:db8::1", 443, 2)[5:]
    assert parse_server_frame(FrameType.PEER_PRESENT, ipv6) == PeerPresent(k, "2001:db8::1", 443, 2)
    assert parse_server_frame(FrameType.HEALTH, b"bad things") == Health("bad things")
    assert parse_server_frame(FrameType.RESTARTING, bytes(7)) is None
    assert parse_server_frame(0x7F, b"whatever") is None


def test_disco_detection():
    assert looks_like_disco(b"TS\xf0\x9f\x92\xac" + bytes(56))
    assert not looks_like_disco(b"TS\xf0\x9f\x92\xac" + bytes(55))
    assert not looks_like_disco(b"XS\xf0\x9f\x92\xac" + bytes(56))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 64))
def test_garbage_only_raises_remote_protocol_error(data, chunk):
    for limits, max_unknown in ((SERVER_READ_LIMITS, None), (CLIENT_READ_LIMITS, CLIENT_MAX_FRAME_LEN)):
        d = FrameDecoder(limits, max_unknown)
        try:
            for i in range(0, len(data), chunk):
                d.receive_data(data[i : i + chunk])
                for ftype, payload in d.frames():
                    if limits is SERVER_READ_LIMITS:
                        parse_client_frame(ftype, payload)
                    else:
                        parse_server_frame(ftype, payload)
            d.receive_data(b"")
            d.frames()
        except RemoteProtocolError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(list(SERVER_READ_LIMITS)), st.binary(max_size=64)), max_size=20))
def test_round_trip(frames):
    frames = [(t, p[: SERVER_READ_LIMITS[t]]) for t, p in frames]
    data = b"".join(encode_frame(t, p) for t, p in frames)
    d = FrameDecoder(SERVER_READ_LIMITS)
    d.receive_data(data)
    assert d.frames() == frames


# ------------------------------------------------------------------- JSON


def test_client_info_json_exact_spelling():
    assert ClientInfo(version=2, can_ack_pings=True).to_json() == b'{"version":2,"CanAckPings":true}'
    mesh = bytes(range(32))
    assert ClientInfo(mesh_key=mesh, version=2).to_json() == (
        b'{"meshKey":"' + mesh.hex().encode() + b'","version":2,"CanAckPings":false}')
    assert ClientInfo(version=2, is_prober=True).to_json() == b'{"version":2,"CanAckPings":false,"IsProber":true}'
    assert ServerInfo().to_json() == b'{"version":2}'


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b"{}", ClientInfo(version=0)),
        (b"null", ClientInfo(version=0)),
        (b'{"Version":2,"canackpings":true,"ISPROBER":true,"appname":"x","extra":[1]}',
         ClientInfo(None, 2, True, True, "x")),
        (b'{"MeshKey":"' + b"AB" * 32 + b'"}', ClientInfo(bytes([0xAB]) * 32, 0)),
        (b'{"version":null}', ClientInfo(version=0)),
        (b'{"version":1,"VERSION":3}', ClientInfo(version=3)),
    ],
)
def test_client_info_decodes_like_go(raw, expected):
    assert ClientInfo.from_json(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [b"", b"[]", b"{", b'{"meshKey":""}', b'{"meshKey":null}', b'{"meshKey":"abcd"}',
     b'{"meshKey":"' + b"zz" * 32 + b'"}', b'{"version":"2"}', b'{"version":true}', b'{"version":2.5}',
     b'{"CanAckPings":1}', b"\xff\xfe"],
)
def test_client_info_rejects(raw):
    with pytest.raises(RemoteProtocolError) as e:
        ClientInfo.from_json(raw)
    assert e.value.reason == "bad_client_info"


# ------------------------------------------------------------------- handshake


def _server() -> ServerHandshake:
    return ServerHandshake(SERVER, nonce=lambda: v.SERVER_INFO_NONCE)


def test_golden_login():
    s = _server()
    c = ClientHandshake(CLIENT, ClientInfo(version=2, can_ack_pings=True), nonce=lambda: v.CLIENT_INFO_NONCE)
    assert s.server_key_frame() == v.SERVER_KEY
    c.receive_data(v.SERVER_KEY)
    ev = c.next_event()
    assert ev == ServerKeyReceived(SERVER.public)
    assert c.client_info_frame(ev.key) == v.CLIENT_INFO
    for data in (v.CLIENT_INFO,):
        s.receive_data(data)
    auth = s.next_event()
    assert auth == ClientAuthenticated(CLIENT.public, ClientInfo(version=2, can_ack_pings=True))
    assert s.server_info_frame() == v.SERVER_INFO
    c.receive_data(v.SERVER_INFO + v.RECV_PACKET)
    assert c.next_event() == LoginComplete(SERVER.public, ServerInfo(version=2))
    assert c.decoder.frames() == [(5, v.RECV_PACKET[5:])]  # bytes after ServerInfo are kept


def test_server_login_byte_at_a_time_keeps_pipelined_frames():
    s = _server()
    data = v.CLIENT_INFO + v.SEND_PACKET
    for i in range(len(data) - 1):
        s.receive_data(data[i : i + 1])
        if i < len(v.CLIENT_INFO) - 1:
            assert s.next_event() is NEED_DATA
    s.receive_data(data[-1:])
    assert isinstance(s.next_event(), ClientAuthenticated)
    assert s.decoder.frames() == [(4, v.SEND_PACKET[5:])]


def test_fast_start_client_checks_server_key():
    c = ClientHandshake(CLIENT, ClientInfo(), server_key=SERVER.public)
    c.client_info_frame()
    c.receive_data(v.SERVER_KEY)
    assert c.next_event() is NEED_DATA  # ServerKey skipped silently
    other = ClientHandshake(CLIENT, ClientInfo(), server_key=CLIENT.public)
    other.client_info_frame()
    other.receive_data(v.SERVER_KEY)
    with pytest.raises(RemoteProtocolError) as e:
        other.next_event()
    assert e.value.reason == "server_key_mismatch"


@pytest.mark.parametrize(
    "data, reason",
    [
        (v.SEND_PACKET, "bad_frame_type"),
        (encode_frame(FrameType.CLIENT_INFO, bytes(55)), "bad_client_info"),
        (encode_frame(FrameType.CLIENT_INFO, bytes(32) + bytes(40)), "zero_key"),
        # points of small order: libsodium refuses the key agreement (it used to escape as
        # nacl's RuntimeError, which ended the whole relay); u = 1 and u = p - 1
        (encode_frame(FrameType.CLIENT_INFO, b"\x01" + bytes(31) + bytes(40)), "small_order_key"),
        (encode_frame(FrameType.CLIENT_INFO, bytes.fromhex("ec" + "ff" * 30 + "7f") + bytes(40)), "small_order_key"),
        (v.CLIENT_INFO[:-1] + b"\x00", "box_open_failed"),
        (b"\x02\x00\x04\x00\x01", "frame_too_large"),
    ],
)
def test_server_login_failures(data, reason):
    s = _server()
    s.receive_data(data)
    with pytest.raises(RemoteProtocolError) as e:
        s.next_event()
    assert e.value.reason == reason


def test_client_refuses_a_server_key_of_small_order():
    from derpd.protocol.frames import MAGIC

    c = ClientHandshake(NodePrivate.generate(), ClientInfo())
    c.receive_data(encode_frame(FrameType.SERVER_KEY, MAGIC + b"\x01" + bytes(31)))
    with pytest.raises(RemoteProtocolError) as e:
        c.next_event()
    assert e.value.reason == "bad_server_key"


def test_server_info_needs_login():
    with pytest.raises(LocalProtocolError):
        _server().server_info_frame()


def test_client_info_that_is_not_json():
    sealed = CLIENT.box(SERVER.public).seal(b"not json")
    s = _server()
    s.receive_data(encode_frame(FrameType.CLIENT_INFO, CLIENT.public.raw + sealed))
    with pytest.raises(RemoteProtocolError) as e:
        s.next_event()
    assert e.value.reason == "bad_client_info"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_login_garbage_only_raises_remote_protocol_error(data):
    s = _server()
    s.receive_data(data)
    s.receive_data(b"")
    try:
        s.next_event()
    except RemoteProtocolError:
        pass
    c = ClientHandshake(CLIENT, ClientInfo(), server_key=SERVER.public)
    c.client_info_frame()
    c.receive_data(data)
    c.receive_data(b"")
    try:
        while c.next_event() is not NEED_DATA:
            pass
    except RemoteProtocolError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=12), st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=70),
                                                        st.lists(st.integers(), max_size=3)), max_size=6))
def test_client_info_json_fuzz(obj):
    try:
        ClientInfo.from_json(json.dumps(obj).encode())
    except RemoteProtocolError:
        pass


def test_protocol_core_is_sans_io():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('trio', 'socket', 'ssl', 'asyncio'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import derpd.protocol.frames, derpd.protocol.messages, derpd.protocol.handshake, derpd.protocol.upgrade\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_client_info_remembers_only_the_last_json_and_only_equal_bytes():
    """from_json keeps one (bytes, value) pair: equal bytes give the remembered value, other
    bytes are decoded (a mesh key never carries over to another client's JSON)."""
    mesh = bytes(range(1, 33))
    with_key = ClientInfo(mesh_key=mesh, version=2, can_ack_pings=True).to_json()
    plain = ClientInfo(version=2, can_ack_pings=True).to_json()
    a = ClientInfo.from_json(with_key)
    assert ClientInfo.from_json(with_key) is a and a.mesh_key == mesh
    b = ClientInfo.from_json(plain)
    assert b.mesh_key is None and b.version == 2
    assert ClientInfo.from_json(bytearray(with_key)) == a  # a new decode, the same value
    with pytest.raises(RemoteProtocolError):
        ClientInfo.from_json(b'{"version": "2"}')
    assert ClientInfo.from_json(plain) == b


def _server_info_nonce(server: NodePrivate, client_info: bytes) -> bytes:
    hs = ServerHandshake(server)
    hs.receive_data(client_info)
    assert isinstance(hs.next_event(), ClientAuthenticated)
    return hs.server_info_frame()[5 : 5 + 24]  # header, then nonce || box


def test_server_info_nonces_never_repeat_across_refills_and_forks():
    import os

    server, client = NodePrivate.generate(), NodePrivate.generate()
    info = ClientHandshake(client, ClientInfo(), server_key=server.public).client_info_frame()
    nonces = {_server_info_nonce(server, info) for _ in range(600)}  # more than one pool of 256
    assert len(nonces) == 600
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child's first nonce must not be the parent's next one
        try:
            os.write(w, _server_info_nonce(server, info))
        finally:
            os._exit(0)
    os.close(w)
    child = os.read(r, 24)
    os.close(r)
    os.waitpid(pid, 0)
    parent = _server_info_nonce(server, info)
    assert len(child) == 24 and child != parent and child not in nonces
