"""The router (derpd/relay/router.py) and its declared acceleration.

A per-frame reference model, written with the protocol's own encoder and ``looks_like_disco``,
says what routing must do.  ``_speedups.route_packets`` must do what the model's SendPacket run
does -- the same result, the same calls (``watch``, ``enqueue``) in the same order -- and
``router.route`` must make the model's decisions (local, elsewhere, errors, counters) with the
compiled run, without it, and with the model's run in its place.  Fixed vectors (Appendix A of
the protocol description, disco boundaries) and Hypothesis-made frame lists."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derpd.metrics import RelayStats
from derpd.protocol.errors import RemoteProtocolError
from derpd.protocol.frames import FrameType, encode_frame
from derpd.protocol.messages import DISCO_MAGIC, DISCO_MIN_LEN, looks_like_disco
from derpd.relay import router
from tests.compiled import optional

from . import vectors as v

_speedups = optional("derpd._speedups")

needs_c = pytest.mark.skipif(_speedups is None, reason="derpd._speedups not built (no C compiler)")

SRC = v.CLIENT_PUBLIC
KEYS = [bytes([i]) * 32 for i in range(1, 4)]
UNKNOWN = bytes([9]) * 32


class FakeDest:
    """A registry member: records what it is given; ``full_every``-th enqueue says "full"."""

    def __init__(self, name: str, log: list, full_every: int) -> None:
        self.name, self.log, self.full_every, self.n = name, log, full_every, 0
        self.key = b""
        self.saw_src: set[bytes] = set()

    def enqueue(self, frame: bytes, disco: bool) -> bool:
        self.n += 1
        self.log.append(("enqueue", self.name, frame, disco))
        return self.full_every > 0 and self.n % self.full_every == 0


def make_active(log: list, full_every: int) -> dict[bytes, FakeDest]:
    return {k: FakeDest(f"d{i}", log, full_every) for i, k in enumerate(KEYS)}


def watcher(log: list):
    def watch(receiver: FakeDest, src: bytes) -> None:
        receiver.saw_src.add(src)
        log.append(("watch", receiver.name, src))
    return watch


def reference_send(frames, start, active, src, watch, magic, min_len):
    """SendPacket by the book, one frame at a time (spec 5.1-5.3): what the runs must do."""
    assert (magic, min_len) == (DISCO_MAGIC, DISCO_MIN_LEN)
    i, npk, nbytes, ndisco = start, 0, 0, 0
    while 0 <= i < len(frames):
        ftype, payload = frames[i]
        if ftype != FrameType.SEND_PACKET or len(payload) < 32 or payload[:32] not in active:
            break
        dst, packet = payload[:32], payload[32:]
        conn = active[dst]
        if src not in conn.saw_src:
            watch(conn, src)
        disco = looks_like_disco(packet)
        npk, nbytes, ndisco, i = npk + 1, nbytes + len(packet), ndisco + disco, i + 1
        if conn.enqueue(encode_frame(FrameType.RECV_PACKET, src + packet), disco):
            return i, npk, nbytes, ndisco, 1
    return i, npk, nbytes, ndisco, 0


SEND_RUNS = [("reference", reference_send)]
if _speedups is not None:
    SEND_RUNS.append(("compiled", _speedups.route_packets))


def run_trace(run, frames, full_every: int, start: int = 0) -> tuple:
    """Call ``run`` repeatedly (resuming after full, skipping the frame it stopped at)."""
    log: list = []
    active = make_active(log, full_every)
    watch = watcher(log)
    results = []
    i = start
    while 0 <= i < len(frames):
        got = run(frames, i, active, SRC, watch, DISCO_MAGIC, DISCO_MIN_LEN)
        results.append(tuple(int(x) for x in got))
        i = got[0] if got[-1] else got[0] + 1
    return results, log


def all_send_runs_agree(frames, full_every: int, start: int = 0) -> tuple:
    traces = {name: run_trace(run, frames, full_every, start) for name, run in SEND_RUNS}
    first = traces["reference"]
    for name, trace in traces.items():
        assert trace == first, name
    return first


disco_body = st.binary(min_size=DISCO_MIN_LEN - 6 - 2, max_size=DISCO_MIN_LEN - 6 + 20)
send_st = st.builds(
    lambda dst, disco, body: (4, dst + (DISCO_MAGIC + body if disco else body)),
    st.sampled_from([*KEYS, UNKNOWN]),
    st.booleans(),
    st.one_of(st.binary(max_size=80), disco_body),
)
forward_st = st.builds(
    lambda src, dst, disco, body: (0x0A, src + dst + (DISCO_MAGIC + body if disco else body)),
    st.sampled_from([SRC, *KEYS]),
    st.sampled_from([*KEYS, UNKNOWN]),
    st.booleans(),
    st.one_of(st.binary(max_size=80), disco_body),
)
other_st = st.one_of(
    st.builds(lambda d: (0x12, d), st.binary(min_size=8, max_size=8)),
    st.builds(lambda d: (4, d), st.binary(max_size=31)),  # too short: a protocol error
    st.builds(lambda d: (0x0A, d), st.binary(max_size=63)),  # too short (from a mesh peer: an error)
    st.just((6, b"")),
)


# ------------------------------------------------------------------- the SendPacket run


def test_appendix_a_send_packet_becomes_the_recv_packet_vector():
    # Appendix A: SendPacket from the server key to the client key becomes this RecvPacket.
    for name, run in SEND_RUNS:
        log: list = []
        dest = FakeDest("client", log, 0)
        got = run([(4, v.SEND_PACKET[5:])], 0, {v.CLIENT_PUBLIC: dest}, v.SERVER_PUBLIC, watcher(log), DISCO_MAGIC,
                  DISCO_MIN_LEN)
        assert tuple(got) == (1, 1, 5, 0, 0), name
        assert log == [("watch", "client", v.SERVER_PUBLIC), ("enqueue", "client", v.RECV_PACKET, False)], name


@pytest.mark.parametrize("packet,disco", [
    (DISCO_MAGIC + bytes(DISCO_MIN_LEN - 6), True),  # the shortest disco message
    (DISCO_MAGIC + bytes(DISCO_MIN_LEN - 7), False),  # one byte short of a nonce
    (DISCO_MAGIC + bytes(200), True),
    (b"XS" + DISCO_MAGIC[2:] + bytes(100), False),  # wrong magic
    (DISCO_MAGIC, False),
    (b"", False),
])
def test_disco_boundaries_are_looks_like_disco(packet, disco):
    assert looks_like_disco(packet) is disco
    assert looks_like_disco(bytes(32) + packet, 32) is disco
    frames = [(4, KEYS[0] + packet), (0x0A, SRC + KEYS[1] + packet)]
    results, log = all_send_runs_agree(frames, 0)
    assert results[0][3] == int(disco)
    assert log[-1] == ("enqueue", "d0", encode_frame(FrameType.RECV_PACKET, SRC + packet), disco)
    for run in ROUTE_RUNS:  # and route, for both packet types
        _steps, log, stats, *_ = route_trace(frames, 0, True, run)
        assert [e[3] for e in log if e[0] == "enqueue"] == [disco, disco]
        assert stats["disco_packets_received"] == int(disco)


def test_runs_stop_where_they_must():
    frames = [(4, KEYS[0] + b"a"), (4, KEYS[1] + b"b"), (4, UNKNOWN + b"c"), (4, KEYS[2] + b"d"), (4, b"short"),
              (0x12, bytes(8)), (4, KEYS[0] + b"e")]
    results, log = all_send_runs_agree(frames, 0)
    assert [r[0] for r in results] == [2, 4, 5, 7]
    assert [e[1] for e in log if e[0] == "enqueue"] == ["d0", "d1", "d2", "d0"]
    results, _ = all_send_runs_agree(frames, 1)  # every enqueue says full: one packet per call
    assert [r[:2] for r in results[:2]] == [(1, 1), (2, 1)]
    assert all_send_runs_agree(frames, 0, start=len(frames))[0] == []
    for _name, run in SEND_RUNS:
        assert tuple(run(frames, -1, {}, SRC, print, DISCO_MAGIC, DISCO_MIN_LEN))[0] == -1


@needs_c
@settings(max_examples=300, deadline=None)
@given(frames=st.lists(st.one_of(send_st, send_st, send_st, forward_st, other_st), max_size=24),
       full_every=st.sampled_from([0, 1, 3]))
def test_hypothesis_route_packets_is_the_reference(frames, full_every):
    all_send_runs_agree(frames, full_every)


# ------------------------------------------------------------------- route()


class FakeRegistry:
    def __init__(self, log: list, full_every: int) -> None:
        self.log = log
        self.active = make_active(log, full_every)
        self.watch_peer_gone = watcher(log)

    def note_activity(self, conn) -> None:
        self.log.append(("activity",))


class FakeHost:
    def __init__(self, log: list, full_every: int) -> None:
        self.registry = FakeRegistry(log, full_every)
        self.stats = RelayStats()
        self.log = log

    def route_elsewhere(self, sender, src, dst, packet, disco, *, forwarded):
        self.log.append(("elsewhere", src, dst, packet, disco, forwarded))
        return "congested" if len(packet) % 7 == 3 and not forwarded else None


class FakeSender:
    def __init__(self, log: list, mesh: bool) -> None:
        self.key, self.can_mesh, self.is_dup = SRC, mesh, mesh
        self.rx_packets = self.rx_bytes = 0
        self.congested = None
        self.log = log

    def handle_other(self, ftype: int, payload: bytes) -> None:
        self.log.append(("other", ftype, payload))
        if ftype == 0x0A:
            raise RemoteProtocolError("ForwardPacket from a client without the mesh key", "mesh_only_frame")


def reference_route(host, sender, frames, start):
    """``route`` by the book, one frame at a time."""
    stats, registry, i = host.stats, host.registry, start
    try:
        while i < len(frames):
            ftype, payload = frames[i]
            i += 1
            if ftype == FrameType.SEND_PACKET:
                if len(payload) < 32:
                    raise RemoteProtocolError("short", "bad_send_packet")
                src, dst, packet = sender.key, payload[:32], payload[32:]
                disco = looks_like_disco(packet)
                stats.packets_received += 1
                stats.bytes_received += len(packet)
                stats.disco_packets_received += disco
            elif ftype == FrameType.FORWARD_PACKET and sender.can_mesh:
                if len(payload) < 64:
                    raise RemoteProtocolError("short", "bad_forward_packet")
                src, dst, packet = payload[:32], payload[32:64], payload[64:]
                disco = looks_like_disco(packet)
                stats.packets_forwarded_in += 1
                stats.bytes_forwarded_in += len(packet)
            else:
                sender.handle_other(ftype, payload)
                continue
            sender.rx_packets += 1
            sender.rx_bytes += len(packet)
            conn = registry.active.get(dst)
            if conn is None:
                congested = host.route_elsewhere(sender, src, dst, packet, disco,
                                                 forwarded=ftype == FrameType.FORWARD_PACKET)
                if congested is not None and ftype == FrameType.SEND_PACKET:
                    sender.congested = congested
                    return i
                continue
            if src not in conn.saw_src:
                registry.watch_peer_gone(conn, src)
            if conn.enqueue(encode_frame(FrameType.RECV_PACKET, src + packet), disco):
                return i
        return i
    finally:
        if sender.is_dup:
            registry.note_activity(sender)


@contextmanager
def send_run(run):
    saved = router.route_send_packets
    router.route_send_packets = run
    try:
        yield
    finally:
        router.route_send_packets = saved


def route_trace(frames, full_every: int, mesh: bool, run) -> tuple:
    """Everything ``route`` (with ``run`` as its SendPacket run; "reference": the model instead)
    does to a batch, resumed wherever it stops."""
    log: list = []
    host = FakeHost(log, full_every)
    sender = FakeSender(log, mesh)
    steps: list = []
    route = reference_route if run == "reference" else router.route
    with send_run(None if run == "reference" else run):
        done = 0
        try:
            while done < len(frames):
                done = route(host, sender, frames, done)
                steps.append((done, sender.congested))
                sender.congested = None
        except RemoteProtocolError as e:
            steps.append(("error", e.reason))
    return steps, log, dict(vars(host.stats)), sender.rx_packets, sender.rx_bytes


def test_route_sends_forwards_and_hands_on_the_rest():
    frames = [(4, KEYS[0] + b"a"), (4, UNKNOWN + DISCO_MAGIC + bytes(56)), (0x0A, KEYS[1] + KEYS[2] + b"fw"),
              (0x0A, KEYS[1] + UNKNOWN + b"gone"), (0x12, bytes(8)), (4, KEYS[2] + b"b")]
    steps, log, stats, rx_packets, rx_bytes = route_trace(frames, 0, True, None)
    assert steps == [(6, None)]
    assert [e[0] for e in log] == ["watch", "enqueue", "elsewhere", "watch", "enqueue", "elsewhere", "other", "watch",
                                   "enqueue", "activity"]
    assert log[2] == ("elsewhere", SRC, UNKNOWN, DISCO_MAGIC + bytes(56), True, False)
    assert log[4] == ("enqueue", "d2", encode_frame(FrameType.RECV_PACKET, KEYS[1] + b"fw"), False)
    assert log[5] == ("elsewhere", KEYS[1], UNKNOWN, b"gone", False, True)
    assert (stats["packets_received"], stats["bytes_received"], stats["disco_packets_received"]) == (3, 64, 1)
    assert (stats["packets_forwarded_in"], stats["bytes_forwarded_in"]) == (2, 6)
    assert (rx_packets, rx_bytes) == (5, 70)
    # Not a mesh peer: a ForwardPacket is handed on (and refused there).
    steps, log, *_ = route_trace(frames, 0, False, None)
    assert steps == [("error", "mesh_only_frame")] and log[-1][:2] == ("other", 0x0A)


def test_route_errors_on_packets_too_short_for_their_keys():
    for frames, reason in (([(4, bytes(31))], "bad_send_packet"), ([(0x0A, bytes(63))], "bad_forward_packet")):
        steps, _log, stats, *_ = route_trace([(4, KEYS[0] + b"x"), *frames], 0, True, None)
        assert steps == [("error", reason)] and stats["packets_received"] == 1


ROUTE_RUNS = ["reference", None, reference_send] + ([_speedups.route_packets] if _speedups is not None else [])


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(st.one_of(send_st, send_st, forward_st, other_st), max_size=20),
       full_every=st.sampled_from([0, 1, 3]), mesh=st.booleans())
def test_hypothesis_route_decides_the_same_with_every_send_run(frames, full_every, mesh):
    traces = [route_trace(frames, full_every, mesh, run) for run in ROUTE_RUNS]
    assert all(t == traces[0] for t in traces)


@needs_c
def test_the_compiled_run_is_in_use_unless_pure():
    from derpd import accel

    assert router.route_send_packets is (None if accel.PURE else _speedups.route_packets)
