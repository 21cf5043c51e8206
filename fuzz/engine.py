"""Fuzz target: the compiled data plane (derpd._dataplane.Engine) over real sockets.

The input is a program.  Three clients, each a socketpair whose one end the Engine serves
(one of them over TLS, its records made by a client-side ``ssl.SSLObject``), a fourth
destination that only Python serves, and a key nobody has.  Each step, picked by one byte,
is one of: bytes on a client's socket (raw, or SendPacket frames for any destination cut
at a chosen byte, with zero, short, oversize and wrong lengths), a TLS record split across
writes, ``poll()``, ``resume`` with leftovers, ``enqueue``, ``send_control``, ``remove``
and re-``add``, a client that half-closes or closes mid-frame, a client that reads (or
not), ``expire`` (the relay's clock moves on by 0 to 3.75 s a step), a duplicate connection
that takes a client's key over (the client's next packets make it the active one again).  The events poll() returns are answered as the relay would (handed-back
bytes resumed, closed paths removed).

Findings: a crash or sanitizer report in the C (build it with clang's
-fsanitize=fuzzer-no-link,address to let libFuzzer see its coverage: fuzz/run.sh), any
exception other than the documented refusals, and any event of kind 3 (an exception inside
poll(): with these well-behaved callbacks there must be none).
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DISCO = b"TS\xf0\x9f\x92\xac"
KIND_DATA, KIND_EOF, KIND_CLOSED, KIND_FAILED = 0, 1, 2, 3
SEND_LIMIT = 64 * 1024
MAX_STEPS = 64
_tls_contexts: list = []


def _modules() -> None:
    import derpd._dataplane  # noqa: F401


def _contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server and a client context (a throwaway certificate from trustme), made once."""
    if not _tls_contexts:
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("derp.test")
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "cert.pem")
            cert.private_key_and_cert_chain_pem.write_to_path(path)
            server.load_cert_chain(path)
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ca.configure_trust(client)
        _tls_contexts.extend([server, client])
    return _tls_contexts[0], _tls_contexts[1]


class Program:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise EOFError
        self.pos += 1
        return self.data[self.pos - 1]

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos:self.pos + n]
        self.pos += len(chunk)
        return chunk


class Conn:
    def __init__(self, key: bytes) -> None:
        self.key, self.saw_src, self.engine_slot = key, set(), -1
        self.queued = 0

    def enqueue(self, frame: bytes, disco: bool) -> bool:
        self.queued += 1
        return self.queued % 7 == 0  # "full" now and then: the engine hands back the rest


class Client:
    """One client: the engine's socket end, the client's end, TLS state when it has it."""

    def __init__(self, engine, active: dict, key: bytes, tls: bool) -> None:
        self.ours, self.peer = socket.socketpair()
        for s in (self.ours, self.peer):
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        self.conn = Conn(key)
        self.tls = self.cli = None
        parts = None
        if tls:
            server_ctx, client_ctx = _contexts()
            sin, sout, cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
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
            self.tls, self.cli, self.cout = (srv, sin, sout), cli, cout
            parts = self.tls
        self.conn.engine_slot = engine.add(self.ours.fileno(), self.conn, key, self.conn.saw_src, parts)
        active[key] = self.conn
        engine.resume(self.conn.engine_slot, b"")
        self.open = True

    def send(self, data: bytes, cut: int) -> None:
        """``data`` on the wire, in two writes at ``cut`` (TLS: one record each)."""
        if not self.open:
            return
        for piece in (data[:cut], data[cut:]):
            if not piece:
                continue
            if self.cli is not None:
                self.cli.write(piece)
                piece = self.cout.read()
            try:
                self.peer.send(piece)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                pass

    def drain(self) -> None:
        try:
            while self.peer.recv(65536):
                pass
        except (BlockingIOError, ConnectionResetError):
            pass

    def close(self) -> None:
        self.ours.close()
        self.peer.close()


def frame(prog: Program, keys: list[bytes]) -> bytes:
    """A SendPacket frame, or one that is subtly wrong."""
    how = prog.byte()
    dst = keys[how % len(keys)]
    body = prog.take(prog.byte() * (4 if how & 0x10 else 1))
    if how & 0x20:
        body = DISCO + body
    payload = dst + body
    n = len(payload)
    kind = (how >> 6) & 3
    if kind == 1:
        n = 0 if how & 1 else SEND_LIMIT + 1  # zero or oversize length
    elif kind == 2:
        return bytes([prog.byte() % 16]) + n.to_bytes(4, "big") + payload  # another frame type
    return b"\x04" + n.to_bytes(4, "big") + payload


def one_input(data: bytes) -> None:
    from derpd import _dataplane

    prog = Program(data)
    active: dict[bytes, object] = {}
    keys = [bytes([i]) * 32 for i in range(1, 6)]  # 1-3 engine clients, 4 Python's, 5 nobody's

    clock = [0.0]  # the relay's clock: each step may move it on

    def watch(conn, src):
        conn.saw_src.add(src)

    def enqueue(conn, src, frame, disco):
        if src not in conn.saw_src:
            watch(conn, src)
        return conn.enqueue(frame, disco)

    def note_activity(conn):  # the registry's rule: the duplicate that sent becomes the active one
        active[conn.key] = conn

    engine = _dataplane.Engine(active, watch=watch, note_activity=note_activity, enqueue=enqueue,
                               count=lambda *counts: None, drop=lambda reason, disco, nbytes, n: None,
                               clock=lambda: clock[0], disco_magic=DISCO, disco_min_len=2, send_limit=SEND_LIMIT,
                               depth=4, recv_size=4096)
    clients: list[Client] = []
    try:
        try:
            first = prog.byte()
        except EOFError:
            return
        for i in range(3):
            clients.append(Client(engine, active, keys[i], tls=i == 2 and first & 1 == 1))
        active[keys[3]] = Conn(keys[3])
        by_conn = {id(c.conn): c for c in clients}
        for _ in range(MAX_STEPS):
            try:
                op, who = prog.byte(), clients[prog.byte() % 3]
            except EOFError:
                break
            clock[0] += (op >> 4) * 0.25  # 0 to 3.75 s a step
            slot = who.conn.engine_slot
            try:
                op %= 13
                if op == 0:
                    who.send(prog.take(prog.byte()), prog.byte())
                elif op in (1, 2):
                    wire = b"".join(frame(prog, keys) for _ in range(prog.byte() % 4 + 1))
                    who.send(wire, prog.byte() % (len(wire) + 1))
                elif op == 3:
                    events = engine.poll(bool(prog.byte() & 1)) or []
                    for conn, kind, payload in events:
                        assert kind != KIND_FAILED, payload
                        c = by_conn[id(conn)]
                        if kind == KIND_DATA and c.conn.engine_slot >= 0:
                            keep = prog.byte() if prog.pos < len(prog.data) else 0
                            engine.resume(c.conn.engine_slot, payload[len(payload) - keep % (len(payload) + 1):])
                        elif kind in (KIND_EOF, KIND_CLOSED) and c.conn.engine_slot >= 0:
                            engine.remove(c.conn.engine_slot)
                            c.conn.engine_slot = -1
                elif op == 4 and slot >= 0:
                    engine.resume(slot, prog.take(prog.byte() % 40), bool(prog.byte() & 1))
                elif op == 5 and slot >= 0:
                    engine.enqueue(slot, b"\x05" + (37 + prog.byte()).to_bytes(4, "big") + bytes(37), prog.byte() & 1)
                elif op == 6 and slot >= 0:
                    engine.send_control(slot, prog.take(prog.byte() % 64))
                elif op == 7 and slot >= 0:
                    engine.remove(slot)
                    who.conn.engine_slot = -1
                elif op == 8 and who.open:
                    who.peer.shutdown(socket.SHUT_WR)  # half-closed, maybe mid-frame
                elif op == 9:
                    who.drain()
                elif op == 10:
                    events = engine.expire((0.0, 1.0, 5.0, 3600.0)[prog.byte() & 3]) or []
                    for conn, kind, _ in events:
                        c = by_conn[id(conn)]
                        if c.conn.engine_slot >= 0:
                            engine.remove(c.conn.engine_slot)
                            c.conn.engine_slot = -1
                elif op == 11 and who.open:
                    who.peer.close()
                    who.open = False
                elif op == 12:
                    active[who.conn.key] = Conn(who.conn.key)  # a duplicate, now the active one
            except EOFError:
                break
            except (BrokenPipeError, ConnectionResetError, OSError) as e:
                if not isinstance(e, (BrokenPipeError, ConnectionResetError)) and e.errno not in (9, 107):
                    raise
        engine.poll(False)
    finally:
        for c in clients:
            if c.conn.engine_slot >= 0:
                engine.remove(c.conn.engine_slot)
            c.close()


if __name__ == "__main__":
    from _harness import main

    main("engine", one_input, _modules)
