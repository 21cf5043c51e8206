"""The compiled answering thread (stund._mmsg.FastStun) against the Python answer.

Sans-IO: ``_mmsg.answer`` (what the thread computes per datagram) gives stund.binding.answer's
bytes for every request it takes, and leaves everything else to Python.  Over real sockets:
serve_stun's replies on 127.0.0.1 and ::1 are byte-identical to stund.binding.answer's for a
table of requests, whichever path the process runs (DERPD_PURE=1 or compiled), the requests
the thread hands over get the Python answers and counts, and cancelling the server stops and
joins the thread."""

from __future__ import annotations

import os
import socket
import threading

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import stund.server
from stund.binding import KIND_RFC3489, KIND_RFC5389, KIND_TAILSCALE, Ignore, Reply, answer
from stund.message import (
    Attribute,
    AttrType,
    MessageClass,
    Method,
    encode_change_request,
    encode_message,
    encode_response_port,
    pack_ip,
    tailscale_request,
)
from stund.server import serve_stun
from tests.compiled import optional

from . import stun_vectors as V
from .test_stun_server import needs_ipv6, sample

_mmsg = optional("stund._mmsg")

needs_c = pytest.mark.skipif(_mmsg is None, reason="stund._mmsg not built (no C compiler)")
KINDS = (KIND_TAILSCALE, KIND_RFC5389, KIND_RFC3489)
TIMEOUT = 10


def req(attrs=(), *, fp=False, txid=None, classic=False, cls=MessageClass.REQUEST, method=Method.BINDING):
    txid = txid if txid is not None else os.urandom(16 if classic else 12)
    return encode_message(method, cls, txid, [Attribute(t, v) for t, v in attrs], add_fingerprint=fp)


def answered_by_thread() -> dict[str, bytes]:
    """Requests the thread answers itself: the kinds net/stun and RFC 5389/8489/3489 clients send."""
    return {
        "tailscale": tailscale_request(os.urandom(12)),
        "appendix_a": V.APPENDIX_A_REQUEST,
        "tailnode_extra_attribute": req([(AttrType.SOFTWARE, b"tailnode"), (AttrType.USERNAME, b"u")], fp=True),
        "rfc5389_bare": req(),
        "rfc5389_fingerprint": req(fp=True),
        "rfc5389_software": req([(AttrType.SOFTWARE, b"pion stun client")]),
        "rfc5389_software_fingerprint": req([(AttrType.SOFTWARE, b"abc")], fp=True),
        "tailnode_without_fingerprint": req([(AttrType.SOFTWARE, b"tailnode")]),
        "rfc5389_padding_optional": req([(AttrType.PADDING, bytes(8)), (0x8001, b"x")], fp=True),
        "rfc3489_classic": req(classic=True),
        "rfc3489_with_0x8028": req([(AttrType.FINGERPRINT, b"abcd")], classic=True),
    }


def left_to_python() -> dict[str, bytes]:
    """Requests the thread hands over: Python's answer (420, ignore, another port) applies."""
    return {
        "unknown_required_420": req([(0x7123, b"abcd")], fp=True),
        "change_request_420": req([(AttrType.CHANGE_REQUEST, encode_change_request(False, False))]),
        "classic_change_request": req([(AttrType.CHANGE_REQUEST, encode_change_request(False, False))],
                                      classic=True),
        "response_port": req([(AttrType.RESPONSE_PORT, encode_response_port(9))]),
        "bad_fingerprint": V.APPENDIX_A_REQUEST[:-1] + bytes([V.APPENDIX_A_REQUEST[-1] ^ 1]),
        "too_short": b"\x00\x01\x00",
        "bad_length": V.APPENDIX_A_REQUEST + b"\0\0\0\0",
        "not_request": V.APPENDIX_A_RESPONSE_V4,
        "indication": req(cls=MessageClass.INDICATION),
        "other_method": req(method=0x003),
        "malformed": b"\x00\x01\x00\x04\x21\x12\xa4\x42" + bytes(12) + b"\x80\x22\x00\x09",
    }


IPS = [pack_ip("192.0.2.1"), pack_ip("2001:db8::1"), pack_ip("127.0.0.1"), pack_ip("::1")]


def same_as_python(data: bytes, ip: bytes, port: int, tailscale_only: bool) -> bool:
    """True when the thread answers ``data`` itself (and then checks it is Python's answer)."""
    got = _mmsg.answer(data, ip, port, tailscale_only)
    if got is None:
        return False
    reply, kind = got
    want = answer(data, ip, port, tailscale_only=tailscale_only)
    assert isinstance(want, Reply), want
    assert (reply, KINDS[kind]) == (want.data, want.kind)
    assert (want.port, want.via, want.error) == (port, None, False)
    return True


@needs_c
@pytest.mark.parametrize("ip", IPS, ids=["v4", "v6", "v4-loopback", "v6-loopback"])
def test_the_thread_answers_plain_binding_requests_with_pythons_bytes(ip):
    for name, data in answered_by_thread().items():
        assert same_as_python(data, ip, 54321, False), name
    assert same_as_python(tailscale_request(os.urandom(12)), ip, 1, True)


@needs_c
@pytest.mark.parametrize("ip", IPS[:2], ids=["v4", "v6"])
def test_the_thread_leaves_everything_else_to_python(ip):
    for name, data in left_to_python().items():
        assert _mmsg.answer(data, ip, 54321, False) is None, name
    # --tailscale-only: only Tailscale requests are answered in the thread.
    for name, data in answered_by_thread().items():
        if answer(data, ip, 1).kind != KIND_TAILSCALE:
            assert _mmsg.answer(data, ip, 1, True) is None, name
            assert isinstance(answer(data, ip, 1, tailscale_only=True), Ignore)


_attr = st.tuples(
    st.sampled_from([AttrType.SOFTWARE, AttrType.PADDING, AttrType.USERNAME, AttrType.MESSAGE_INTEGRITY,
                     AttrType.XOR_MAPPED_ADDRESS, AttrType.CHANGE_REQUEST, AttrType.RESPONSE_PORT,
                     AttrType.FINGERPRINT, 0x7777, 0x8001]),
    st.one_of(st.just(b"tailnode"), st.binary(max_size=12)),
)


@needs_c
@settings(max_examples=1500, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=80),
        st.builds(lambda attrs, fp, classic, cls: req(attrs, fp=fp and not classic, classic=classic, cls=cls),
                  st.lists(_attr, max_size=4), st.booleans(), st.booleans(), st.sampled_from(list(MessageClass))),
        st.builds(lambda data, at, byte: data[:at] + bytes([byte]) + data[at + 1:],
                  st.just(V.APPENDIX_A_REQUEST), st.integers(0, 39), st.integers(0, 255)),
    ),
    st.sampled_from(IPS),
    st.integers(1, 65535),
    st.booleans(),
)
def test_whatever_the_thread_answers_is_pythons_answer(data, ip, port, tailscale_only):
    same_as_python(data, ip, port, tailscale_only)


def stun_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("stun ")]


@pytest.mark.parametrize("family", [socket.AF_INET, pytest.param(socket.AF_INET6, marks=needs_ipv6)],
                         ids=["127.0.0.1", "::1"])
async def test_replies_over_udp_are_pythons_bytes_on_this_path(family):
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    requests = {**answered_by_thread(), **left_to_python()}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            [addr] = await nursery.start(serve_stun, [(host, 0)])
            assert len(stun_threads()) == (1 if stund.server._mmsg is not None else 0)
            with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
                await sock.bind((host, 0))
                ip, port = pack_ip(host), sock.getsockname()[1]
                for name, data in requests.items():
                    want = answer(data, ip, port)
                    await sock.sendto(data, addr)
                    if isinstance(want, Reply) and want.port == port:
                        assert await sock.recv(4096) == want.data, name
                # RESPONSE-PORT 9 and the ignored ones got no reply here: one more request
                # shows nothing else is queued for us.
                txid = os.urandom(12)
                await sock.sendto(tailscale_request(txid), addr)
                assert await sock.recv(4096) == answer(tailscale_request(txid), ip, port).data
            nursery.cancel_scope.cancel()


async def test_handed_over_requests_are_counted_like_the_python_path():
    labels = [("ignored", {"reason": "bad_fingerprint"}), ("ignored", {"reason": "unsupported_method"}),
              ("responses", {"result": "error"}), ("responses", {"result": "success"}),
              ("requests", {"family": "ipv4", "kind": "rfc5389"}),
              ("requests", {"family": "ipv4", "kind": "tailscale"}),
              ("requests", {"family": "ipv4", "kind": "rfc3489"})]
    before = [sample(f"stun_{n}_total", **lab) for n, lab in labels]
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            [addr] = await nursery.start(serve_stun, [("127.0.0.1", 0)])
            with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                await sock.bind(("127.0.0.1", 0))
                # One batch, probably: the handed-over ones are counted before the replies go.
                data = left_to_python()
                for d in (data["bad_fingerprint"], data["other_method"], data["unknown_required_420"],
                          req(fp=True), req(classic=True)):
                    await sock.sendto(d, addr)
                txid = os.urandom(12)
                await sock.sendto(tailscale_request(txid), addr)
                for _ in range(4):  # 420, rfc5389, rfc3489, tailscale: in any order
                    await sock.recv(4096)
            nursery.cancel_scope.cancel()
    after = [sample(f"stun_{n}_total", **lab) for n, lab in labels]
    # bad_fingerprint, unsupported_method, 420, 3 successes; rfc5389 counts the other method
    # and the 420 as well as the plain request.
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1, 3, 3, 1, 1]


async def test_cancelling_the_server_stops_and_joins_its_threads():
    """Compiled: one answering thread per socket, joined on cancel.  Pure path (DERPD_PURE=1
    or no compiler): no thread at all, and the same busy cancel ends the trio loop."""
    before = set(stun_threads())
    hosts = [("127.0.0.1", 0), ("127.0.0.1", 0)]
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(serve_stun, hosts)
            mine = [t for t in stun_threads() if t not in before]
            expected = len(bound) if stund.server._mmsg is not None else 0
            assert len(mine) == expected and all(t.is_alive() for t in mine)
            # Busy when cancelled: datagrams keep arriving while the server stops.
            with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                for _ in range(200):
                    await sock.sendto(tailscale_request(os.urandom(12)), bound[0])
                    await sock.sendto(b"garbage", bound[0])
                nursery.cancel_scope.cancel()
    assert not any(t.is_alive() for t in mine)


def test_the_compiled_answering_thread_is_there_when_required():
    if os.environ.get("DERPD_PURE", "") not in ("", "0"):
        assert stund.server._mmsg is None
    elif os.environ.get("DERPD_REQUIRE_SPEEDUPS") == "1":
        assert stund.server._mmsg is not None and hasattr(stund.server._mmsg, "FastStun")
    else:
        assert (stund.server._mmsg is None) == (_mmsg is None)


def _fast(sock, callback, pending=None):
    from array import array

    counts = array("Q", bytes(8 * 30))
    return _mmsg.FastStun(sock.fileno(), counts, [0, 1, 2, 3, 4, 5], 6, 7, 8, False, callback,
                          pending if pending is not None else [0] * 30), counts


@pytest.fixture
def udp_pair():
    """(server, client) UDP sockets on 127.0.0.1; the server non-blocking, the client with a timeout."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as srv, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as cli:
        srv.bind(("127.0.0.1", 0))
        srv.setblocking(False)
        cli.bind(("127.0.0.1", 0))
        cli.settimeout(TIMEOUT)
        yield srv, cli


def _run_bounded(fast) -> BaseException | None:
    """fast.run() in a thread, stopped after TIMEOUT if it has not returned; its exception."""
    failure: list[BaseException] = []

    def run():
        try:
            fast.run()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(TIMEOUT)
    fast.stop()
    thread.join()
    return failure[0] if failure else None


@needs_c
def test_stop_before_run_returns_at_once_and_a_raising_callback_ends_run(udp_pair):
    srv, cli = udp_pair
    fast, _ = _fast(srv, lambda batch: None)
    fast.stop()
    assert _run_bounded(fast) is None  # returned: the eventfd was already readable

    def callback(batch):
        raise RuntimeError(f"handed {len(batch)}")

    fast, _ = _fast(srv, callback)
    cli.sendto(b"not stun at all", srv.getsockname())
    failure = _run_bounded(fast)
    assert isinstance(failure, RuntimeError) and str(failure) == "handed 1"


@needs_c
def test_the_thread_folds_what_the_callback_counted(udp_pair):
    srv, cli = udp_pair
    pending = [0] * 30
    got = []

    def callback(batch):
        got.extend(data for data, _, _, _ in batch)
        pending[20] += len(batch)
        fast.stop()

    fast, counts = _fast(srv, callback, pending)
    txid = os.urandom(12)
    cli.sendto(tailscale_request(txid), srv.getsockname())
    cli.sendto(b"garbage", srv.getsockname())
    assert _run_bounded(fast) is None  # the thread answers the request; the garbage stops it
    reply = cli.recv(4096)
    ip, port = pack_ip("127.0.0.1"), cli.getsockname()[1]
    assert reply == answer(tailscale_request(txid), ip, port).data
    assert got == [b"garbage"]
    assert (counts[0], counts[6], counts[20], pending[20]) == (1, 1, 1, 0)


@needs_c
def test_recv_batch_reports_no_address_when_the_kernel_gave_none(udp_pair):
    """A datagram socket whose sender has no address (an unnamed AF_UNIX socket: the kernel
    fills in fewer bytes than an IPv4 address): no IP and port 0, not whatever the address
    buffer held before (here: the IPv4 sender received just before, at the same place)."""
    srv, cli = udp_pair
    cli.sendto(b"v4", srv.getsockname())
    ((data, ip, port, _),) = _mmsg.recv_batch(srv.fileno(), 1)
    assert (data, ip, port) == (b"v4", pack_ip("127.0.0.1"), cli.getsockname()[1])
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        b.setblocking(False)
        a.send(b"unix")
        ((data, ip, port, name),) = _mmsg.recv_batch(b.fileno(), 1)
        assert (data, ip, port) == (b"unix", b"", 0) and len(name) <= 2


@needs_c
def test_recv_batch_keeps_each_callers_datagrams_apart_across_threads():
    """recv_batch's receive buffers belong to the module and are used with the GIL held from
    start to end: threads calling it at once on their own sockets each get their own bytes."""
    n_threads, rounds = 4, 200
    errors: list[str] = []

    def worker(tag: int) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as srv, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as cli:
            srv.bind(("127.0.0.1", 0))
            srv.setblocking(False)
            for r in range(rounds):
                want = [bytes([tag, r % 256, k]) * (100 + k) for k in range(8)]
                for d in want:
                    cli.sendto(d, srv.getsockname())
                got: list[bytes] = []
                for _ in range(1000):
                    got += [d for d, _, _, _ in _mmsg.recv_batch(srv.fileno(), 64)]
                    if len(got) >= len(want):
                        break
                if got != want:
                    errors.append(f"thread {tag} round {r}: {got[:1]!r}...")
                    return

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 3)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
