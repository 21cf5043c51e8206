"""STUN server throughput and latency on loopback: stund with 1 and N workers, and coturn.

Usage:  python bench/stun.py [--count 300000] [--seconds 6] [--workers N] [--window 64]

For each server it starts the server as a separate process, then runs the load generator in
another process (this file with --load).  The generator keeps ``window`` Tailscale-style
Binding requests in flight over 8 source ports (so SO_REUSEPORT spreads them over workers),
stops after ``count`` answers or ``seconds``, whichever comes first, and reports answered
requests per second and latency percentiles.  Everything is bounded and on 127.0.0.1.

coturn (`turnserver --stun-only`) is measured when installed and the ratio line compares
stund to it; Debian's `stund` (package stun-server) is only detected, not measured.  Note the generator is one Python
process: on a small machine it may be the bottleneck, which the figures then show.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
N_SOCKETS = 8


def _request(txid: bytes) -> bytes:
    body = b"\x00\x01\x00\x14\x21\x12\xa4\x42" + txid + b"\x80\x22\x00\x08tailnode"
    return body + b"\x80\x28\x00\x04" + struct.pack("!I", zlib.crc32(body) ^ 0x5354554E)


def load(host: str, port: int, count: int, seconds: float, window: int) -> dict[str, float]:
    """The load generator: returns answered, elapsed, rps, p50_ms, p99_ms, lost."""
    socks = []
    for _ in range(N_SOCKETS):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        socks.append(s)
    poller = select.epoll()
    by_fd = {s.fileno(): s for s in socks}
    for fd in by_fd:
        poller.register(fd, select.EPOLLIN)
    dest = (host, port)
    inflight: dict[bytes, float] = {}
    latencies: list[float] = []
    seq = 0
    sent = 0
    lost = 0
    per_sock = max(1, window // N_SOCKETS)

    def send(s: socket.socket) -> None:
        nonlocal seq, sent
        seq += 1
        txid = seq.to_bytes(12, "big")
        inflight[txid] = time.perf_counter()
        try:
            s.sendto(_request(txid), dest)
            sent += 1
        except BlockingIOError:
            del inflight[txid]

    start = time.perf_counter()
    deadline = start + seconds
    for s in socks:
        for _ in range(per_sock):
            send(s)
    last_progress = time.perf_counter()
    while len(latencies) < count:
        now = time.perf_counter()
        if now >= deadline:
            break
        events = poller.poll(0.05)
        if not events:
            if time.perf_counter() - last_progress > 0.2:  # replies lost: refill the window
                lost += len(inflight)
                inflight.clear()
                for s in socks:
                    for _ in range(per_sock):
                        send(s)
                last_progress = time.perf_counter()
            continue
        for fd, _ in events:
            s = by_fd[fd]
            while True:
                try:
                    data = s.recv(2048)
                except BlockingIOError:
                    break
                t = time.perf_counter()
                sent_at = inflight.pop(data[8:20], None)
                if sent_at is None:
                    continue
                latencies.append(t - sent_at)
                last_progress = t
                if len(latencies) + len(inflight) < count:
                    send(s)
    elapsed = time.perf_counter() - start
    for s in socks:
        s.close()
    latencies.sort()
    n = len(latencies)

    def pct(p: float) -> float:
        return latencies[min(n - 1, int(p * n))] * 1000 if n else float("nan")

    return {"answered": n, "elapsed": elapsed, "rps": n / elapsed if elapsed else 0.0,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "lost": lost}


def _run_load(port: int, args: argparse.Namespace) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--load", str(port), "--count", str(args.count),
         "--seconds", str(args.seconds), "--window", str(args.window)],
        capture_output=True, text=True, timeout=args.seconds + 30, check=True,
    )
    return json.loads(out.stdout)


def _wait_answering(port: int, timeout: float = 10.0) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            s.sendto(_request(os.urandom(12)), ("127.0.0.1", port))
            try:
                s.recv(2048)
                return
            except socket.timeout:
                continue
    raise RuntimeError(f"server on port {port} did not answer within {timeout}s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def bench_stund(workers: int, args: argparse.Namespace) -> dict[str, float]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "stund", "serve", "-a", "127.0.0.1:0", "--workers", str(workers)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        m = re.search(r"127\.0\.0\.1:(\d+)", line)
        if not m:
            raise RuntimeError(f"stund did not start: {line!r}")
        port = int(m.group(1))
        _wait_answering(port)
        return _run_load(port, args)
    finally:
        _stop(proc)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_coturn(args: argparse.Namespace) -> dict[str, float] | None:
    turnserver = shutil.which("turnserver")
    if turnserver is None:
        return None
    port = _free_port()
    proc = subprocess.Popen(
        [turnserver, "-n", "--stun-only", "--no-cli", "--no-tls", "--no-dtls", "--simple-log",
         "--log-file", "stdout", "-L", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_answering(port)
        return _run_load(port, args)
    finally:
        _stop(proc)


def _fmt(name: str, r: dict[str, float]) -> str:
    return (f"{name:<22} {r['rps']:>10.0f} req/s answered   p50 {r['p50_ms']:.3f} ms   p99 {r['p99_ms']:.3f} ms"
            f"   ({r['answered']:.0f} answers in {r['elapsed']:.2f} s, {r['lost']:.0f} lost)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=300000, help="stop after this many answers (default 300000)")
    parser.add_argument("--seconds", type=float, default=6.0, help="and after this many seconds (default 6)")
    parser.add_argument("--window", type=int, default=64, help="requests in flight (default 64)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="N for the multi-worker run")
    args = parser.parse_args()
    if args.load is not None:
        print(json.dumps(load("127.0.0.1", args.load, args.count, args.seconds, args.window)))
        return
    print(f"STUN bench on 127.0.0.1: {os.cpu_count()} CPUs, window {args.window}, "
          f"at most {args.count} answers / {args.seconds:g} s per run, load generator in its own process")
    one = bench_stund(1, args)
    print(_fmt("stund --workers 1", one), flush=True)
    many = bench_stund(args.workers, args)
    print(_fmt(f"stund --workers {args.workers}", many), flush=True)
    coturn = bench_coturn(args)
    if coturn is None:
        print("coturn: not installed (Debian package coturn); no comparison")
    else:
        print(_fmt("coturn --stun-only", coturn))
        print(f"ratio stund/coturn: {one['rps'] / coturn['rps']:.2f} (1 worker), "
              f"{many['rps'] / coturn['rps']:.2f} ({args.workers} workers)")
    debian_stund = any(os.path.exists(p) for p in ("/usr/sbin/stund", "/usr/bin/stund"))
    print("Debian stund (package stun-server): " + ("installed but not driven by this bench yet"
                                                     if debian_stund else "not installed; not measured"))


if __name__ == "__main__":
    main()
