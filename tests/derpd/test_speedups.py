"""The compiled per-packet loops (derpd/_speedups.c) against their pure-Python twins: the same
frames, errors and routing decisions for the spec's Appendix A vectors and for Hypothesis-made
buffers.  Both paths are called in one process, whatever DERPD_PURE says."""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from derpd.metrics import RelayStats
from derpd.protocol import frames as frames_mod
from derpd.protocol.errors import RemoteProtocolError
from derpd.protocol.frames import CLIENT_MAX_FRAME_LEN, CLIENT_READ_LIMITS, SERVER_READ_LIMITS, FrameDecoder
from derpd.protocol.messages import DISCO_MAGIC
from derpd.relay import client_connection as cc_mod
from derpd.relay.client_connection import ClientConnection

from . import vectors as v

try:
    from derpd import _speedups
except ImportError:  # no C compiler when the package was built
    _speedups = None
    if os.environ.get("DERPD_REQUIRE_SPEEDUPS") == "1":
        raise ImportError("derpd._speedups is not built: install a C compiler (gcc) and reinstall derpd") from None

needs_c = pytest.mark.skipif(_speedups is None, reason="derpd._speedups not built (no C compiler)")


def test_the_process_runs_the_path_it_was_asked_for():
    import stund.server

    from derpd import accel

    if os.environ.get("DERPD_PURE", "") not in ("", "0"):
        assert accel.speedups is None and stund.server._mmsg is None and accel.dataplane is None
        assert frames_mod._split_frames is None and cc_mod._route_packets is None
    elif os.environ.get("DERPD_REQUIRE_SPEEDUPS") == "1":
        assert accel.speedups is _speedups and stund.server._mmsg is not None
        assert accel.dataplane is not None, "derpd._dataplane is not built: install gcc and reinstall derpd"
        assert frames_mod._split_frames is _speedups.split_frames
    else:
        assert (accel.speedups is None) == (_speedups is None)

APPENDIX_A = [v.SERVER_KEY, v.CLIENT_INFO, v.SERVER_INFO, v.SEND_PACKET, v.RECV_PACKET, v.KEEP_ALIVE,
              v.NOTE_PREFERRED, v.PEER_GONE, v.PEER_PRESENT, v.PING, v.PONG, v.RESTARTING]
LIMITS = [(SERVER_READ_LIMITS, None), (SERVER_READ_LIMITS, 100), (CLIENT_READ_LIMITS, CLIENT_MAX_FRAME_LEN),
          ({4: 40, 0x12: 8}, 0)]


@contextmanager
def path(compiled: bool):
    saved = frames_mod._split_frames, cc_mod._route_packets
    frames_mod._split_frames = _speedups.split_frames if compiled else None
    cc_mod._route_packets = _speedups.route_packets if compiled else None
    try:
        yield
    finally:
        frames_mod._split_frames, cc_mod._route_packets = saved


def decode_trace(chunks: list[bytes], limits, max_unknown, most: int, compiled: bool) -> list:
    """Everything a decoder says while fed ``chunks`` then EOF."""
    trace: list = []
    with path(compiled):
        d = FrameDecoder(limits, max_unknown)
        for chunk in [*chunks, b""]:
            d.receive_data(chunk)
            try:
                while True:
                    got = d.frames(most)
                    trace.append(("frames", got, d.skipped_frames, d.buffered(), d.eof))
                    if not got:
                        break
            except RemoteProtocolError as e:
                trace.append(("error", e.reason, str(e), d.buffered()))
                break
    return trace


def both_decoders_agree(chunks, limits, max_unknown, most=-1):
    pure = decode_trace(chunks, limits, max_unknown, most, compiled=False)
    compiled = decode_trace(chunks, limits, max_unknown, most, compiled=True)
    assert compiled == pure
    return pure


@needs_c
@pytest.mark.parametrize("limits,max_unknown", LIMITS)
def test_appendix_a_vectors_split_the_same(limits, max_unknown):
    whole = b"".join(APPENDIX_A)
    for most in (-1, 1, 3):
        trace = both_decoders_agree([whole], limits, max_unknown, most)
        assert trace
    bytewise = both_decoders_agree([whole[i : i + 1] for i in range(len(whole))], limits, max_unknown)
    assert bytewise
    # Each vector alone, and cut short (EOF mid-frame).
    for frame in APPENDIX_A:
        assert both_decoders_agree([frame], limits, max_unknown)
        assert both_decoders_agree([frame[:-1]], limits, max_unknown)[-1][0] == "error"


@needs_c
def test_appendix_a_send_packet_decodes_to_the_vector():
    trace = both_decoders_agree([v.SEND_PACKET], SERVER_READ_LIMITS, None)
    assert trace[0][1] == [(4, v.SEND_PACKET[5:])]


frame_st = st.builds(
    lambda t, payload, lie: bytes([t]) + ((len(payload) + lie) % (1 << 32)).to_bytes(4, "big") + payload,
    st.sampled_from([1, 2, 3, 4, 6, 7, 9, 0x0A, 0x10, 0x11, 0x12, 0x20, 0xFF]),
    st.binary(max_size=80),
    st.sampled_from([0, 0, 0, 0, 1, -1, 5, 1 << 20, (1 << 32) - 81]),
)


@needs_c
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    frames=st.lists(frame_st, max_size=12),
    garbage=st.binary(max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
    which=st.sampled_from(range(len(LIMITS))),
    most=st.sampled_from([-1, 1, 2]),
)
def test_hypothesis_buffers_split_the_same(frames, garbage, cuts, which, most):
    data = b"".join(frames) + garbage
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]
    limits, max_unknown = LIMITS[which]
    both_decoders_agree(chunks, limits, max_unknown, most)


# ------------------------------------------------------------------- routing


class FakeDest:
    def __init__(self, name: str, log: list, full_every: int) -> None:
        self.name, self.log, self.full_every, self.n = name, log, full_every, 0
        self.saw_src: set[bytes] = set()

    def enqueue(self, frame: bytes, disco: bool) -> bool:
        self.n += 1
        self.log.append(("enqueue", self.name, frame, disco))
        return self.full_every > 0 and self.n % self.full_every == 0


class FakeRegistry:
    def __init__(self, log: list) -> None:
        self.active: dict[bytes, FakeDest] = {}
        self.log = log

    def watch_peer_gone(self, receiver: FakeDest, src: bytes) -> None:
        receiver.saw_src.add(src)
        self.log.append(("watch", receiver.name, src))


class FakeServer:
    def __init__(self, log: list) -> None:
        self.registry = FakeRegistry(log)
        self.stats = RelayStats()
        self.log = log

    def route_elsewhere(self, sender, src, dst, packet, disco, *, forwarded):
        self.log.append(("elsewhere", src, dst, packet, disco, forwarded))
        return "congested" if len(packet) % 7 == 3 else None


SRC = v.CLIENT_PUBLIC
KEYS = [bytes([i]) * 32 for i in range(1, 4)]
UNKNOWN = bytes([9]) * 32


def route_trace(frames: list[tuple[int, bytes]], full_every: int, compiled: bool) -> tuple:
    log: list = []
    server = FakeServer(log)
    for i, k in enumerate(KEYS):
        server.registry.active[k] = FakeDest(f"d{i}", log, full_every)
    conn = ClientConnection.__new__(ClientConnection)
    conn.server, conn.key, conn.can_mesh, conn.is_dup = server, SRC, False, False
    conn.rx_packets = conn.rx_bytes = 0
    conn._congested = None
    conn._pong = None
    conn._engine = None
    conn._parked = False
    conn._ctl_tokens = 0.0
    steps: list = []
    with path(compiled):
        done = 0
        try:
            while done < len(frames):
                done = conn._handle_frames(frames, done)
                steps.append((done, conn._congested))
                conn._congested = None
        except RemoteProtocolError as e:
            steps.append(("error", e.reason))
    stats = {k: val for k, val in vars(server.stats).items()}
    return steps, log, stats, {d.name: sorted(d.saw_src) for d in server.registry.active.values()}


send_st = st.builds(
    lambda dst, disco, body: (4, dst + (DISCO_MAGIC + body if disco else body)),
    st.sampled_from([*KEYS, UNKNOWN]),
    st.booleans(),
    st.binary(max_size=80),
)
other_st = st.one_of(
    st.builds(lambda d: (0x12, d), st.binary(min_size=8, max_size=8)),
    st.builds(lambda d: (4, d), st.binary(max_size=31)),  # too short: a protocol error
    st.just((6, b"")),
)


@needs_c
@settings(max_examples=300, deadline=None)
@given(frames=st.lists(st.one_of(send_st, send_st, send_st, other_st), max_size=20),
       full_every=st.sampled_from([0, 1, 3]))
def test_hypothesis_frames_route_the_same(frames, full_every):
    assert route_trace(frames, full_every, compiled=True) == route_trace(frames, full_every, compiled=False)


@needs_c
def test_appendix_a_send_packet_routes_to_the_recv_packet_vector():
    # Appendix A: SendPacket from the client to the server key becomes this RecvPacket.
    frames = [(4, v.SEND_PACKET[5:])]
    for compiled in (False, True):
        log: list = []
        server = FakeServer(log)
        server.registry.active[v.CLIENT_PUBLIC] = FakeDest("client", log, 0)
        conn = ClientConnection.__new__(ClientConnection)
        conn.server, conn.key, conn.can_mesh, conn.is_dup = server, v.SERVER_PUBLIC, False, False
        conn.rx_packets = conn.rx_bytes = 0
        conn._congested = None
        with path(compiled):
            assert conn._handle_frames(frames, 0) == 1
        assert log == [("watch", "client", v.SERVER_PUBLIC), ("enqueue", "client", v.RECV_PACKET, False)]
        assert server.stats.packets_received == 1 and server.stats.bytes_received == 5


@needs_c
def test_route_packets_survives_callbacks_that_change_its_frames():
    """A callback that empties the frame list under route_packets: the frame being routed is
    still whole (route_packets holds its own reference) and the loop stops at the list's new
    end instead of reading past it."""
    dst, src = bytes(range(32)), bytes(32)
    frames = [(4, dst + b"first" + bytes(100)), (4, dst + b"second")]
    enqueued = []

    class Dest:
        saw_src: set = set()

        def enqueue(self, frame, disco):
            enqueued.append(frame)
            return False

    def watch(conn, key):
        frames.clear()  # drops the last reference to the payload being routed

    got = _speedups.route_packets(frames, 0, {dst: Dest()}, src, watch, DISCO_MAGIC, 0)
    assert got == (1, 1, 105, 0, 0)
    assert enqueued == [bytes([5, 0, 0, 0, 137]) + src + b"first" + bytes(100)]
    assert _speedups.route_packets([(4, dst + b"x")], -1, {dst: Dest()}, src, watch, DISCO_MAGIC, 0)[0] == -1


# Points of small order and their non-canonical encodings (u, u + p): no shared secret.
SMALL_ORDER = [bytes.fromhex(h) for h in (
    "0000000000000000000000000000000000000000000000000000000000000000",  # u = 0
    "0100000000000000000000000000000000000000000000000000000000000000",  # u = 1
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",  # order 8
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",  # order 8
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # u = p - 1
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # u = p (= 0)
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # u = p + 1 (= 1)
)]


@needs_c
@settings(max_examples=200, deadline=None)
@given(sk=st.binary(min_size=32, max_size=32), seed=st.binary(min_size=32, max_size=32))
def test_box_key_after_openssl_x25519_is_crypto_box_beforenm(sk, seed):
    """The compiled login's key agreement (OpenSSL X25519, then ``box_key``) gives libsodium's
    ``crypto_box_beforenm`` key for any private key (clamped or not) and any public key."""
    import nacl.bindings
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    pk = nacl.bindings.crypto_scalarmult_base(seed)
    shared = X25519PrivateKey.from_private_bytes(sk).exchange(X25519PublicKey.from_public_bytes(pk))
    assert _speedups.box_key(shared) == nacl.bindings.crypto_box_beforenm(pk, sk)


@needs_c
def test_box_key_refuses_anything_but_32_bytes():
    for bad in (b"", bytes(31), bytes(33)):
        with pytest.raises(ValueError):
            _speedups.box_key(bad)


@pytest.mark.parametrize("point", SMALL_ORDER)
def test_both_key_agreements_refuse_points_of_small_order(point, monkeypatch):
    """Whichever path ``NodePrivate.box`` takes, a small-order peer key is a KeyFormatError
    (libsodium checks a list of such points; OpenSSL refuses the all-zero secret they give)."""
    import nacl.bindings
    import nacl.exceptions

    from derpd import keys
    from derpd.keys import KeyFormatError, NodePrivate, NodePublic

    me = NodePrivate.generate()
    peer = NodePrivate.generate().public
    with pytest.raises(nacl.exceptions.CryptoError):
        nacl.bindings.crypto_box_beforenm(point, me.raw)
    paths = [None] + ([_speedups.box_key] if _speedups is not None else [])
    boxes = []
    for box_key in paths:
        monkeypatch.setattr(keys, "_box_key", box_key)
        key = NodePrivate(me.raw)  # built under the patched path
        assert (key._x25519 is not None) == (box_key is not None)
        with pytest.raises(KeyFormatError):
            key.box(NodePublic(point))
        boxes.append(key.box(peer).seal(b"same box", bytes(24)))
    assert len(set(boxes)) == 1 and len(boxes) == len(paths)
