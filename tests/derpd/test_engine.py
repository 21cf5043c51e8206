"""The compiled data plane's Engine (derpd/_dataplane.c) driven directly, over socketpairs:
what it refuses (a second ``__init__``, an Engine never initialised, re-entry from a callback),
and how it fails (an exception in a callback closes that connection alone, a TLS write that
fails outside ``poll()`` is reported and counted, TLS output the client does not read is
bounded).  The module is imported directly, so this file runs whatever DERPD_PURE says."""

from __future__ import annotations

import os
import socket
import ssl

import pytest

from derpd.metrics import RelayStats
from derpd.protocol.frames import FrameType, encode_frame
from derpd.protocol.messages import DISCO_MAGIC, DISCO_MIN_LEN
from tests.compiled import optional

_dataplane = optional("derpd._dataplane")

pytestmark = pytest.mark.skipif(_dataplane is None, reason="derpd._dataplane not built (no C compiler)")

SEND_LIMIT = 64 * 1024
KIND_DATA, KIND_EOF, KIND_CLOSED, KIND_FAILED = 0, 1, 2, 3


class Conn:
    """A connection: the engine reads nothing of it; ``key`` and ``saw_src`` go to add(), and a
    destination the engine does not own is queued on through the ``enqueue`` callback."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.saw_src: set[bytes] = set()
        self.engine_slot = -1
        self.enqueued: list[tuple[bytes, bool]] = []

    def enqueue(self, frame: bytes, disco: bool) -> bool:
        self.enqueued.append((frame, disco))
        return False


class Clock:
    """The relay's clock, as the engine sees it: set by hand."""

    def __init__(self) -> None:
        self.now = 0.0  # as trio's MockClock starts

    def __call__(self) -> float:
        return self.now


def make_engine(active: dict, *, stats: RelayStats | None = None, watch=None, note_activity=None, clock=None,
                depth: int = 8, recv_size: int = 65536):
    """An Engine with the callbacks the relay gives it (derpd/relay/dataplane.py), by name."""
    stats = stats if stats is not None else RelayStats()
    watch = watch or (lambda conn, src: conn.saw_src.add(src))

    def enqueue(conn, src, frame, disco):
        if src not in conn.saw_src:
            watch(conn, src)
        return conn.enqueue(frame, disco)

    def count(pk_in, by_in, disco_in, pk_out, by_out):
        stats.packets_received += pk_in
        stats.bytes_received += by_in
        stats.disco_packets_received += disco_in
        stats.packets_sent += pk_out
        stats.bytes_sent += by_out

    return _dataplane.Engine(active, watch=watch, note_activity=note_activity or (lambda conn: None),
                             enqueue=enqueue, count=count, drop=stats.drop, clock=clock or Clock(),
                             disco_magic=DISCO_MAGIC, disco_min_len=DISCO_MIN_LEN, send_limit=SEND_LIMIT,
                             depth=depth, recv_size=recv_size)


def add(engine, fd: int, conn, tls=None) -> int:
    return engine.add(fd, conn, conn.key, conn.saw_src, tls)


class Rig:
    """An Engine and the connections it serves, each a socketpair: ``ours`` is the engine's
    end, ``peer`` the client's."""

    def __init__(self, *, watch=None, note_activity=None, depth: int = 8, recv_size: int = 65536) -> None:
        self.active: dict[bytes, Conn] = {}
        self.stats = RelayStats()
        self.clock = Clock()
        self.watch_calls: list[tuple[Conn, bytes]] = []
        self.engine = make_engine(self.active, stats=self.stats, watch=watch or self._watch,
                                  note_activity=note_activity, clock=self.clock, depth=depth, recv_size=recv_size)
        self.socks: list[socket.socket] = []

    def _watch(self, conn: Conn, src: bytes) -> None:
        conn.saw_src.add(src)
        self.watch_calls.append((conn, src))

    def join(self, key: bytes, tls=None) -> tuple[Conn, socket.socket]:
        ours, peer = socket.socketpair()
        ours.setblocking(False)
        peer.settimeout(5)
        self.socks += [ours, peer]
        conn = Conn(key)
        conn.engine_slot = add(self.engine, ours.fileno(), conn, tls)
        self.active[key] = conn
        self.engine.resume(conn.engine_slot, b"")
        return conn, peer

    def poll_until(self, want, rounds: int = 200) -> list:
        """poll() until ``want(events)``; every event seen."""
        seen: list = []
        for _ in range(rounds):
            seen += self.engine.poll(False) or []
            if want(seen):
                return seen
        raise AssertionError(f"not seen after {rounds} polls: {seen!r}")

    def close(self) -> None:
        for s in self.socks:
            s.close()


@pytest.fixture
def rig():
    made: list[Rig] = []

    def make(**kw) -> Rig:
        made.append(Rig(**kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


def send_packet(dst: bytes, payload: bytes) -> bytes:
    return encode_frame(FrameType.SEND_PACKET, dst + payload)


def recv_packet(src: bytes, payload: bytes) -> bytes:
    return encode_frame(FrameType.RECV_PACKET, src + payload)


def key(i: int) -> bytes:
    return bytes([i]) * 32


# ------------------------------------------------------------------ construction


def test_a_second_init_on_a_live_engine_is_refused(rig):
    r = rig(depth=2)
    conn, peer = r.join(key(1))
    with pytest.raises(RuntimeError, match="already initialised"):
        r.engine.__init__(r.active, watch=r._watch, note_activity=print, enqueue=print, count=print, drop=print,
                          clock=r.clock, disco_magic=DISCO_MAGIC, disco_min_len=DISCO_MIN_LEN, send_limit=SEND_LIMIT,
                          depth=4096, recv_size=65536)
    # the engine still works with the depth it was made with: two packets kept, the oldest dropped
    peer.shutdown(socket.SHUT_RD)  # nothing is read: the queue fills
    for i in range(5):
        r.engine.enqueue(conn.engine_slot, recv_packet(key(2), b"%d" % i + bytes(200000 if i == 0 else 10)), False)
    assert r.engine.pending(conn.engine_slot)


def test_an_engine_never_initialised_refuses_every_method():
    e = _dataplane.Engine.__new__(_dataplane.Engine)
    calls = [
        lambda: e.poll(False), lambda: e.expire(1.0), lambda: e.fileno(), lambda: e.count(), lambda: e.backlogged(),
        lambda: add(e, 0, Conn(key(1))), lambda: e.resume(0, b""), lambda: e.remove(0),
        lambda: e.enqueue(0, recv_packet(key(1), b"x"), False), lambda: e.send_control(0, b"x"),
        lambda: e.pending(0),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="not initialised"):
            call()
    del e  # and it can be freed


def test_a_failed_init_leaves_an_engine_that_refuses_too():
    e = _dataplane.Engine.__new__(_dataplane.Engine)
    with pytest.raises(ValueError):
        e.__init__({}, watch=print, note_activity=print, enqueue=print, count=print, drop=print, clock=print,
                   disco_magic=DISCO_MAGIC, disco_min_len=DISCO_MIN_LEN, send_limit=SEND_LIMIT, depth=0,
                   recv_size=65536)
    with pytest.raises(RuntimeError, match="not initialised"):
        e.poll(False)


# ------------------------------------------------------------------ failure policy


def test_an_exception_in_a_callback_closes_only_the_connection_being_served(rig):
    hostile = key(9)

    def watch(conn, src):
        if src == hostile:
            raise LookupError("injected")
        conn.saw_src.add(src)

    r = rig(watch=watch)
    b, b_peer = r.join(key(2))
    a, a_peer = r.join(hostile)
    c, c_peer = r.join(key(3))
    a_peer.sendall(send_packet(key(2), b"from a"))
    c_peer.sendall(send_packet(key(2), b"from c"))
    events = r.poll_until(lambda ev: any(k == KIND_FAILED for _, k, _ in ev) and b_peer in _readable([b_peer]))
    failed = [(conn, data) for conn, kind, data in events if kind == KIND_FAILED]
    assert len(failed) == 1 and failed[0][0] is a and isinstance(failed[0][1], LookupError)
    assert b_peer.recv(1000) == recv_packet(key(3), b"from c")
    # the others go on: c sends again, b answers c
    c_peer.sendall(send_packet(key(2), b"again"))
    b_peer.sendall(send_packet(key(3), b"answer"))
    r.poll_until(lambda ev: _readable([b_peer, c_peer]) == [b_peer, c_peer])
    assert b_peer.recv(1000) == recv_packet(key(3), b"again")
    assert c_peer.recv(1000) == recv_packet(key(2), b"answer")
    assert r.engine.count() == 3  # a's slot stays until Python removes it
    r.engine.remove(a.engine_slot)
    assert r.engine.count() == 2


def _readable(socks: list[socket.socket]) -> list[socket.socket]:
    import select

    ready, _, _ = select.select(socks, [], [], 0.01)
    return [s for s in socks if s in ready]


def test_a_callback_cannot_reenter_the_engine(rig):
    holder: list = []

    def watch(conn, src):
        holder[0].engine.remove(conn.engine_slot)  # would free the slot poll() is writing to

    r = rig(watch=watch)
    holder.append(r)
    b, b_peer = r.join(key(2))
    a, a_peer = r.join(key(1))
    a_peer.sendall(send_packet(key(2), b"x"))
    events = r.poll_until(lambda ev: any(k == KIND_FAILED for _, k, _ in ev))
    (exc,) = [data for _, kind, data in events if kind == KIND_FAILED]
    assert isinstance(exc, RuntimeError) and "re-enter" in str(exc)
    assert r.engine.count() == 2


# ------------------------------------------------------------------ TLS


class BrokenTLS:
    """An SSLObject whose session broke: every write raises (as after a fatal alert)."""

    def __init__(self) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()

    def pending(self) -> int:
        return 0

    def write(self, data) -> int:
        raise ssl.SSLError("injected: session broken")

    def read(self, n, buf=None):
        raise ssl.SSLWantReadError()


def test_a_tls_write_that_fails_outside_poll_is_counted_and_closes_the_path(rig):
    r = rig()
    tls = BrokenTLS()
    conn, peer = r.join(key(2), (tls, tls.incoming, tls.outgoing))
    r.engine.enqueue(conn.engine_slot, recv_packet(key(1), b"lost"), False)  # from Python: outside poll()
    assert r.stats.packets_sent == 0
    assert r.stats.dropped_packets["write_error", "other"] == 1
    events = r.poll_until(lambda ev: ev)
    assert events == [(conn, KIND_CLOSED, "write_error")]


class ChattyTLS:
    """An SSLObject that answers every record it reads with ciphertext of its own, as OpenSSL
    answers a TLS 1.3 KeyUpdate with update_requested."""

    ANSWER = 1000

    def __init__(self) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()

    def pending(self) -> int:
        return 0

    def write(self, data) -> int:
        self.outgoing.write(bytes(len(data)))
        return len(data)

    def read(self, n, buf=None):
        if self.incoming.pending:
            self.incoming.read()
            self.outgoing.write(b"K" * self.ANSWER)
        raise ssl.SSLWantReadError()


def test_tls_output_a_client_does_not_read_is_bounded(rig):
    r = rig(depth=4)
    tls = ChattyTLS()
    conn, peer = r.join(key(2), (tls, tls.incoming, tls.outgoing))
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    # the client reads nothing: fill the socket until the engine's writes wait
    while not r.engine.pending(conn.engine_slot):
        r.engine.enqueue(conn.engine_slot, recv_packet(key(1), bytes(60000)), False)
    for i in range(1000):  # 1000 answers of 1000 bytes asked for: far past the bound
        peer.send(b"r")
        events = r.engine.poll(False)
        if events:
            break
    assert events == [(conn, KIND_CLOSED, "tls_output_limit")]
    assert i < 100  # closed once 64 KiB wait, not after every answer was kept


# ------------------------------------------------------------------ the modules


def test_an_engine_in_a_reference_cycle_is_collected():
    """An Engine holds its connections, and a relay's connections lead back to the engine:
    the garbage collector sees the engine's references and breaks the cycle."""
    import gc
    import weakref

    class Owner(Conn):
        pass

    engine = make_engine({}, depth=4)
    assert gc.is_tracked(engine)
    ours, peer = socket.socketpair()
    with ours, peer:
        conn = Owner(key(1))
        conn.engine = engine  # the cycle: engine -> slot -> conn -> engine
        conn.engine_slot = add(engine, ours.fileno(), conn)
        alive = weakref.ref(conn)
        del conn, engine
        gc.collect()
        assert alive() is None


@pytest.mark.parametrize("name", ["derpd._speedups", "derpd._dataplane", "stund._mmsg"])
def test_each_import_of_an_extension_has_its_own_state(name):
    """Multi-phase initialisation: a second module object made from the same extension has
    types and state of its own (nothing mutable lives in C globals), and works."""
    import importlib
    import importlib.util

    try:
        first = importlib.import_module(name)
    except ImportError:
        pytest.skip(f"{name} not built")
    spec = importlib.util.find_spec(name)
    second = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(second)
    assert second is not first
    if name == "derpd._dataplane":
        assert second.Engine is not first.Engine
        callbacks = {name: print for name in second.CONTRACT["callbacks"]} | {"clock": lambda: 0.0}
        e = second.Engine({}, **callbacks, disco_magic=DISCO_MAGIC, disco_min_len=DISCO_MIN_LEN,
                          send_limit=SEND_LIMIT, depth=4, recv_size=65536)
        assert e.count() == 0 and e.poll(False) is None
    elif name == "stund._mmsg":
        assert second.FastStun is not first.FastStun
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            assert second.recv_batch(s.fileno(), 4) == []
    else:
        dst = bytes(32)
        assert second.split_frames(b"\x04\x00\x00\x00\x21" + dst + b"x", 0, (64,) * 256, -1, -1)[0] == [(4, dst + b"x")]



def _openssl_key_update():
    """``key_update(sslobject)``: OpenSSL's SSL_key_update(ssl, SSL_KEY_UPDATE_REQUESTED) on the
    SSL* under a Python ``ssl.SSLObject`` (Python's ssl module has no call for it), or None
    where the SSL* cannot be found safely.  CPython keeps the SSL* right after the object head
    and a weak reference (PySSLSocket, Modules/_ssl.c); the pointer is checked before use."""
    import ctypes

    try:
        libssl = ctypes.CDLL(next(line.split()[-1] for line in open("/proc/self/maps") if "/libssl" in line))
    except (OSError, StopIteration):
        return None
    libssl.SSL_is_server.argtypes = [ctypes.c_void_p]
    libssl.SSL_key_update.argtypes = [ctypes.c_void_p, ctypes.c_int]
    libssl.SSL_get_ex_data.argtypes = [ctypes.c_void_p, ctypes.c_int]
    libssl.SSL_get_ex_data.restype = ctypes.c_void_p
    head = ctypes.sizeof(ctypes.c_ssize_t) + ctypes.sizeof(ctypes.c_void_p)

    def ssl_pointer(obj: ssl.SSLObject) -> int | None:
        inner = obj._sslobj  # the _ssl._SSLSocket
        ptr = ctypes.c_void_p.from_address(id(inner) + head + ctypes.sizeof(ctypes.c_void_p)).value
        # _ssl stores the _SSLSocket itself as the SSL's application data (index 0)
        if not ptr or libssl.SSL_get_ex_data(ptr, 0) != id(inner):
            return None
        return ptr

    def key_update(obj: ssl.SSLObject) -> bool:
        ptr = ssl_pointer(obj)
        return ptr is not None and libssl.SSL_key_update(ptr, 1) == 1

    return key_update


def test_a_tls_client_asking_for_key_updates_it_never_reads_is_closed(rig):
    """A TLS 1.3 client that reads nothing asks, again and again, for a KeyUpdate (OpenSSL's
    own KeyUpdate with update_requested): each request makes the relay's OpenSSL answer, behind
    ciphertext the client does not take.  The engine closes it once 64 KiB of answers wait,
    instead of keeping them all (and copying the pending record for each)."""
    import select
    import tempfile

    import trustme

    key_update = _openssl_key_update()
    ca = trustme.CA()
    server_ctx, client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with tempfile.TemporaryDirectory() as d:
        pem = os.path.join(d, "server.pem")
        ca.issue_cert("derp.test").private_key_and_cert_chain_pem.write_to_path(pem)
        server_ctx.load_cert_chain(pem)
    ca.configure_trust(client_ctx)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    sin, sout, cin, cout = (ssl.MemoryBIO() for _ in range(4))
    srv = server_ctx.wrap_bio(sin, sout, server_side=True)
    cli = client_ctx.wrap_bio(cin, cout, server_hostname="derp.test")
    for _ in range(10):  # the handshake, in memory
        for obj in (cli, srv):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        if cout.pending:
            sin.write(cout.read())
        if sout.pending:
            cin.write(sout.read())
    assert srv.version() == "TLSv1.3"
    if key_update is None or not key_update(cli):
        pytest.skip("cannot reach OpenSSL's SSL* under this Python's ssl.SSLObject")
    r = rig(depth=4)
    ours, peer = socket.socketpair()
    r.socks += [ours, peer]
    ours.setblocking(False)
    peer.settimeout(5)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    conn = Conn(key(2))
    conn.engine_slot = add(r.engine, ours.fileno(), conn, (srv, sin, sout))
    r.active[conn.key] = conn
    r.engine.resume(conn.engine_slot, b"")
    for _ in range(100):  # the client reads nothing: fill its socket until the engine's writes wait
        r.engine.enqueue(conn.engine_slot, recv_packet(key(1), bytes(60000)), False)
        if r.engine.pending(conn.engine_slot) and not select.select([], [ours], [], 0.05)[1]:
            break
    events: list = []
    for i in range(10000):
        if i:
            assert key_update(cli)
        cli.do_handshake()  # sends the KeyUpdate
        peer.sendall(cout.read())
        assert select.select([ours], [], [], 5)[0]
        events = r.engine.poll(False) or []
        if events:
            break
    assert events == [(conn, KIND_CLOSED, "tls_output_limit")]
    assert 1000 < i < 5000  # each answer is a few dozen bytes: closed at 64 KiB of them


# ------------------------------------------------------------------ the relay's clock


def _fill(r: Rig, conn: Conn, peer: socket.socket) -> None:
    """Queue until the engine's writes to ``conn`` wait (its client reads nothing)."""
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    while not r.engine.pending(conn.engine_slot):
        r.engine.enqueue(conn.engine_slot, recv_packet(key(1), bytes(60000)), False)


def test_the_write_timeout_runs_on_the_clock_the_engine_is_given(rig):
    r = rig(depth=4)
    conn, peer = r.join(key(2))
    r.clock.now = 100.0
    _fill(r, conn, peer)  # waiting since 100.0 on the relay's clock
    r.clock.now = 109.5
    assert r.engine.expire(10.0) is None
    r.clock.now = 110.0
    assert r.engine.expire(10.0) == [(conn, KIND_CLOSED, "write_timeout")]
    assert r.stats.dropped_packets["write_error", "other"] >= 1


def test_a_write_that_waits_since_time_zero_still_times_out(rig):
    """trio's MockClock starts at 0: a wait stamped 0.0 is a wait like any other."""
    r = rig(depth=4)
    conn, peer = r.join(key(2))
    _fill(r, conn, peer)
    r.clock.now = 5.0
    assert r.engine.expire(5.0) == [(conn, KIND_CLOSED, "write_timeout")]


def test_a_clock_that_fails_makes_the_call_raise_and_changes_nothing(rig):
    r = rig(depth=4)
    conn, peer = r.join(key(2))
    r.clock.now = "not a time"
    with pytest.raises(TypeError):
        r.engine.enqueue(conn.engine_slot, recv_packet(key(1), b"x"), False)
    with pytest.raises(TypeError):
        r.engine.poll(False)
    assert not r.engine.pending(conn.engine_slot)
    r.clock.now = 1.0
    r.engine.enqueue(conn.engine_slot, recv_packet(key(1), b"x"), False)
    assert peer.recv(100) == recv_packet(key(1), b"x")
