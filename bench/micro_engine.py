"""The compiled data plane's CPU per relayed packet, in one process, with no relay around it.

Usage:  python bench/micro_engine.py [--rounds 5] [--batches 4000] [--size 1200] [TREE ...]

One ``derpd._dataplane.Engine`` serves two socketpairs (sender and receiver); per batch the
sender's end gets 50 SendPacket frames of ``--size`` bytes in one write, ``poll()`` routes them
and writes the receiver's queue, and the receiver's end is drained.  Prints process CPU
nanoseconds per packet (the best and the median of the rounds), which include the test's own
send and recv.  With TREE arguments (source trees whose extensions are built, e.g. by
``.ci/cbuild.py TREE``) each is measured in its own process, alternately: an A/B of two
versions of the C on the same machine.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time


def measure(rounds: int, batches: int, size: int) -> list[float]:
    from derpd import _dataplane

    class Conn:
        def __init__(self, key: bytes) -> None:
            self.key, self.saw_src, self.engine_slot = key, set(), -1

        def enqueue(self, frame: bytes, disco: bool) -> bool:
            return False

    active: dict[bytes, Conn] = {}
    engine = _dataplane.Engine(active, watch=lambda c, s: c.saw_src.add(s), note_activity=lambda c: None,
                               enqueue=lambda c, s, f, d: False, count=lambda *counts: None,
                               drop=lambda *args: None, clock=time.monotonic, disco_magic=b"TS\xf0\x9f\x92\xac",
                               disco_min_len=2, send_limit=65536, depth=32, recv_size=65536)
    ends = []
    for key in (b"a" * 32, b"b" * 32):
        ours, peer = socket.socketpair()
        for s in (ours, peer):
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        conn = Conn(key)
        conn.engine_slot = engine.add(ours.fileno(), conn, key, conn.saw_src)
        active[key] = conn
        engine.resume(conn.engine_slot, b"")
        ends.append((ours, peer))
    frame = b"\x04" + (32 + size).to_bytes(4, "big") + b"b" * 32 + bytes(size)
    chunk = frame * 50
    sender, receiver = ends[0][1], ends[1][1]
    out = []
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(batches):
            sender.send(chunk)
            engine.poll(False)
            try:
                while receiver.recv(1 << 20):
                    pass
            except BlockingIOError:
                pass
        out.append((time.process_time() - t0) / (batches * 50) * 1e9)
    for ours, peer in ends:
        ours.close()
        peer.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=4000)
    ap.add_argument("--size", type=int, default=1200)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("trees", nargs="*")
    args = ap.parse_args()
    if not args.trees or args.one:
        ns = measure(args.rounds, args.batches, args.size)
        print(f"{min(ns):.0f} {statistics.median(ns):.0f}")
        return
    results: dict[str, list[str]] = {t: [] for t in args.trees}
    for _ in range(args.rounds):
        for tree in args.trees:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
            got = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", "--rounds", "3",
                                  "--batches", str(args.batches), "--size", str(args.size)],
                                 env=env, cwd=tree, capture_output=True, text=True, check=True, timeout=600)
            results[tree].append(got.stdout.split()[0])
    for tree, best in results.items():
        ns = [float(b) for b in best]
        print(f"{tree}: {min(ns):.0f} ns/packet best, {statistics.median(ns):.0f} median over {len(ns)} runs")


if __name__ == "__main__":
    main()
