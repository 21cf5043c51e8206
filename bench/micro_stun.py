"""STUN per-datagram CPU, pure recvfrom/sendto against the compiled recvmmsg/sendmmsg helper.

Usage:  python bench/micro_stun.py [--rounds 5] [--iterations 3000]

No server process and no event loop: one UDP socket on 127.0.0.1 receives ``k`` Tailscale
binding requests (k = 1, 8, 64: the datagrams one wakeup finds), then the server side
drains and answers them the way stund/server.py does, once with ``recvfrom``/``sendto``
until EAGAIN and once with ``stund._mmsg``.  Prints process CPU microseconds per answered
datagram (median and min-max over rounds, alternating the two paths).  Then the decision
alone, per request: ``stund.binding.answer`` against ``stund._mmsg.answer`` (what the
answering thread computes for each datagram, without the GIL).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import timeit

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from stund.binding import answer  # noqa: E402
from stund.message import tailscale_request  # noqa: E402

try:
    from stund import _mmsg
except ImportError:
    _mmsg = None


def pure(srv: socket.socket) -> int:
    n = 0
    while True:
        try:
            data, addr = srv.recvfrom(2048)
        except BlockingIOError:
            return n
        r = answer(data, socket.inet_pton(socket.AF_INET, addr[0]), addr[1])
        srv.sendto(r.data, addr)
        n += 1


def compiled(srv: socket.socket) -> int:
    got = _mmsg.recv_batch(srv.fileno(), _mmsg.MAX_BATCH)
    replies = []
    for data, ip, port, name in got:
        r = answer(data, ip, port)
        replies.append((r.data, name))
    _mmsg.send_batch(srv.fileno(), replies)
    return len(got)


def one(fn, k: int, iterations: int, srv, cli, req: bytes) -> float:
    addr = srv.getsockname()
    cpu = 0.0
    done = 0
    for _ in range(iterations):
        for _ in range(k):
            cli.sendto(req, addr)
        t0 = time.process_time()
        done += fn(srv)
        cpu += time.process_time() - t0
        try:
            while True:
                cli.recv(2048)
        except BlockingIOError:
            pass
    return cpu / max(done, 1) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=3000)
    args = ap.parse_args()
    if _mmsg is None:
        print("stund._mmsg is not built (needs a C compiler): nothing to compare", file=sys.stderr)
        return 1
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    srv.setblocking(False)
    cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    cli.bind(("127.0.0.1", 0))
    cli.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    cli.setblocking(False)
    req = tailscale_request(os.urandom(12))
    print(f"{'k':>3} {'pure us/answer':>22} {'compiled us/answer':>22} {'pure/compiled':>14}")
    for k in (1, 8, 64):
        res: dict[str, list[float]] = {"pure": [], "compiled": []}
        for _ in range(args.rounds):
            for name, fn in (("pure", pure), ("compiled", compiled)):
                res[name].append(one(fn, k, max(args.iterations // k, 50), srv, cli, req))
        med = {n: sorted(v)[len(v) // 2] for n, v in res.items()}
        cells = [f"{med[n]:.2f} ({min(v):.2f}-{max(v):.2f})" for n, v in res.items()]
        print(f"{k:>3} {cells[0]:>22} {cells[1]:>22} {med['pure'] / med['compiled']:>14.2f}")
    ip = socket.inet_pton(socket.AF_INET, "127.0.0.1")
    decide = {"binding.answer": lambda: answer(req, ip, 40000),
              "_mmsg.answer": lambda: _mmsg.answer(req, ip, 40000, False)}
    cost: dict[str, list[float]] = {n: [] for n in decide}
    for _ in range(args.rounds):
        for name, fn in decide.items():
            cost[name].append(min(timeit.repeat(fn, number=args.iterations, repeat=3)) / args.iterations * 1e6)
    print("decision per request, us: " + ", ".join(f"{n} {sorted(v)[len(v) // 2]:.2f}" for n, v in cost.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
