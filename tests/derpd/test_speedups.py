"""The compiled per-packet loops (derpd/_speedups.c) against their pure-Python twins: the same
frames and errors for the spec's Appendix A vectors and for Hypothesis-made buffers (routing:
tests/derpd/test_router.py).  Both paths are called in one process, whatever DERPD_PURE says."""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from derpd.protocol import frames as frames_mod
from derpd.protocol.errors import RemoteProtocolError
from derpd.protocol.frames import CLIENT_MAX_FRAME_LEN, CLIENT_READ_LIMITS, SERVER_READ_LIMITS, FrameDecoder
from derpd.protocol.messages import DISCO_MAGIC
from derpd.relay import router as router_mod
from tests.compiled import optional

from . import vectors as v

_speedups = optional("derpd._speedups")

needs_c = pytest.mark.skipif(_speedups is None, reason="derpd._speedups not built (no C compiler)")


def test_the_process_runs_the_path_it_was_asked_for():
    import stund.server

    from derpd import accel

    if os.environ.get("DERPD_PURE", "") not in ("", "0"):
        assert accel.speedups is None and stund.server._mmsg is None and accel.dataplane is None
        assert frames_mod._split_frames is None and router_mod.route_send_packets is None
    elif os.environ.get("DERPD_REQUIRE_SPEEDUPS") == "1":
        assert accel.speedups is _speedups and stund.server._mmsg is not None
        assert accel.dataplane is not None, "derpd._dataplane is not built: install gcc and reinstall derpd"
        assert frames_mod._split_frames is _speedups.split_frames
        assert router_mod.route_send_packets is _speedups.route_packets
    else:
        assert (accel.speedups is None) == (_speedups is None)

APPENDIX_A = [v.SERVER_KEY, v.CLIENT_INFO, v.SERVER_INFO, v.SEND_PACKET, v.RECV_PACKET, v.KEEP_ALIVE,
              v.NOTE_PREFERRED, v.PEER_GONE, v.PEER_PRESENT, v.PING, v.PONG, v.RESTARTING]
LIMITS = [(SERVER_READ_LIMITS, None), (SERVER_READ_LIMITS, 100), (CLIENT_READ_LIMITS, CLIENT_MAX_FRAME_LEN),
          ({4: 40, 0x12: 8}, 0)]


@contextmanager
def path(compiled: bool):
    saved = frames_mod._split_frames, router_mod.route_send_packets
    frames_mod._split_frames = _speedups.split_frames if compiled else None
    router_mod.route_send_packets = _speedups.route_packets if compiled else None
    try:
        yield
    finally:
        frames_mod._split_frames, router_mod.route_send_packets = saved


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
# route_packets against the router and its reference model: tests/derpd/test_router.py.


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
