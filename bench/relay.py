"""Relay throughput on loopback: 1 and 50 sender->receiver pairs of 1,200-byte packets, over
plain TCP and over TLS, against derpd running as its own process.

Usage:  python bench/relay.py [--seconds 5] [--pairs 1,50] [--modes plain,tls] [--size 1200]
                              [--rate 0] [--generator auto|go|python] [--json FILE]

The load generator runs in a separate process from the server: the Go one in bench/loadgen
(Tailscale's derphttp client; built on first use when Go is installed) or, without Go, this
file with ``--load`` (derpd's own Trio client).  Each packet carries a send timestamp, so the
receiver measures latency.  ``--rate 0`` (default) sends unpaced: the relay drops the oldest
packet when a receiver's 32-packet queue is full, so the loss column is overload loss and the
delivered rate is the relay's maximum.  Every run is bounded by --seconds plus a short drain
and a hard timeout; everything is on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import benchlib

HEADER = struct.Struct(">2sQQ")  # "LG" | seq | sent_ns, as in bench/loadgen
MAGIC = b"LG"


# ---------------------------------------------------------------------- Python generator


async def _python_load(url: str, ca: str | None, pairs: int, size: int, seconds: float, warmup: float,
                       rate: float) -> dict:
    import ssl

    import trio

    from derpd import client as derp_client
    from derpd.protocol.messages import RecvPacket

    ctx = ssl.create_default_context(cafile=ca) if ca else None
    start = time.perf_counter_ns()
    phase = 0  # 0 warm-up, 1 measuring, 2 draining
    sent = [0] * pairs
    received = [0] * pairs
    window = [0, 0, 0, 0]  # sent0, recv0, sent1, recv1
    samples: list[float] = []
    filler = bytes(i & 0xFF for i in range(size - HEADER.size))
    per_pair = rate / pairs if rate else 0.0
    batch = 16

    async def sender(i: int, c: derp_client.DerpClient, dst, stop: trio.Event) -> None:
        seq = 0
        next_at = trio.current_time()
        while not stop.is_set():
            n = batch
            if per_pair:
                next_at += batch / per_pair
                await trio.sleep_until(next_at)
            pkts = []
            now = time.perf_counter_ns() - start
            for _ in range(n):
                pkts.append((dst, HEADER.pack(MAGIC, seq, now) + filler))
                seq += 1
            await c.send_many(pkts)
            sent[i] += n

    async def receiver(i: int, c: derp_client.DerpClient) -> None:
        async for ev in c:
            if isinstance(ev, RecvPacket) and ev.data[:2] == MAGIC:
                received[i] += 1
                if phase == 1 and len(samples) < 1_000_000:
                    samples.append((time.perf_counter_ns() - start - HEADER.unpack_from(ev.data)[2]) / 1e6)

    with trio.fail_after(seconds + warmup + 60):
        async with trio.open_nursery() as nursery:
            clients = []
            for _ in range(2 * pairs):
                cm = derp_client.connect(url, ssl_context=ctx)
                clients.append(await nursery.start(_hold, cm))
            stop = trio.Event()
            for i in range(pairs):
                nursery.start_soon(receiver, i, clients[2 * i + 1])
                nursery.start_soon(sender, i, clients[2 * i], clients[2 * i + 1].public_key, stop)
            await trio.sleep(warmup)
            window[0], window[1] = sum(sent), sum(received)
            phase = 1
            t0 = trio.current_time()
            await trio.sleep(seconds)
            phase = 2
            elapsed = trio.current_time() - t0
            window[2], window[3] = sum(sent), sum(received)
            stop.set()
            with trio.move_on_after(2.0):
                last = -1
                while sum(received) < sum(sent) and sum(received) != last:
                    last = sum(received)
                    await trio.sleep(0.3)
            nursery.cancel_scope.cancel()
    samples.sort()

    def pct(p: float) -> float:
        return samples[int(p * (len(samples) - 1))] if samples else 0.0

    sent_all, recv_all = sum(sent), sum(received)
    delivered = window[3] - window[1]
    return {
        "scenario": "throughput", "generator": "python", "pairs": pairs, "size": size, "elapsed_s": elapsed,
        "sent": sent_all, "received": recv_all, "sent_pps": (window[2] - window[0]) / elapsed,
        "delivered_pps": delivered / elapsed, "delivered_mbps": delivered * size / elapsed / 1e6,
        "loss": 1 - recv_all / sent_all if sent_all else 0.0, "latency_samples": len(samples),
        "p50_ms": pct(0.5), "p99_ms": pct(0.99), "p999_ms": pct(0.999),
    }


async def _hold(cm, *, task_status) -> None:
    """Enter an async context manager inside a nursery task and hand out its value."""
    import trio

    async with cm as value:
        task_status.started(value)
        await trio.sleep_forever()


# ---------------------------------------------------------------------- orchestration


def generator_command(gen: str, loadgen: Path | None, url: str, ca: Path | None, pairs: int, size: int,
                      seconds: float, rate: float) -> list[str]:
    if gen == "go":
        assert loadgen is not None
        cmd = [str(loadgen), "throughput", "-url", url, "-pairs", str(pairs), "-size", str(size),
               "-duration", f"{seconds}s", "-rate", str(rate), "-timeout", f"{seconds + 90}s"]
        return cmd + (["-ca", str(ca)] if ca else [])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--load", url, "--pairs", str(pairs), "--size", str(size),
           "--seconds", str(seconds), "--rate", str(rate)]
    return cmd + (["--ca", str(ca)] if ca else [])


def fmt_row(mode: str, pairs: int, r: dict) -> str:
    return (f"{mode:5} {pairs:5} {r['delivered_pps']:12,.0f} {r['delivered_mbps']:8.1f} {r['sent_pps']:12,.0f} "
            f"{100 * r['loss']:7.2f}% {r['p50_ms']:9.2f} {r['p99_ms']:9.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="measurement window per run (max 60)")
    ap.add_argument("--pairs", default="1,50", help="comma-separated pair counts")
    ap.add_argument("--modes", default="plain,tls", help="plain, tls or both")
    ap.add_argument("--size", type=int, default=1200, help="packet size in bytes")
    ap.add_argument("--rate", type=float, default=0.0, help="offered packets/s over all pairs (0 = unpaced)")
    ap.add_argument("--generator", choices=("auto", "go", "python"), default="auto")
    ap.add_argument("--json", type=Path, help="also write the results to this file")
    ap.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)  # internal: be the Python generator
    ap.add_argument("--ca", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not 0 < args.seconds <= 60 or not 18 <= args.size <= 65536 or args.rate < 0:
        ap.error("need 0 < --seconds <= 60, 18 <= --size <= 65536 and --rate >= 0")
    try:
        pair_counts = [int(p) for p in args.pairs.split(",")]
    except ValueError:
        ap.error("--pairs: comma-separated integers, e.g. 1,50")
    if any(not 1 <= p <= 500 for p in pair_counts):
        ap.error("--pairs: each count must be 1..500")
    modes = args.modes.split(",")
    if any(m not in ("plain", "tls") for m in modes):
        ap.error("--modes: plain, tls or plain,tls")

    if args.load:
        import trio

        res = trio.run(_python_load, args.load, args.ca, pair_counts[0], args.size, args.seconds, 1.0, args.rate)
        print(json.dumps(res))
        return 0

    gen, loadgen = args.generator, None
    if gen in ("auto", "go"):
        built = benchlib.build_go(log=lambda m: print(m, file=sys.stderr))
        if built:
            loadgen, gen = built[0], "go"
        elif gen == "go":
            print("the Go generator is not available", file=sys.stderr)
            return 1
        else:
            gen = "python"
    server_cpus, gen_cpus = benchlib.pin_plan()
    print(f"generator: {gen}; packet {args.size} B; {args.seconds:g} s per run; "
          f"offered rate: {'unpaced' if not args.rate else f'{args.rate:,.0f} pkt/s'}; "
          f"server on CPU {server_cpus or 'any'}, generator on CPU {gen_cpus or 'any'}")
    print(f"{'mode':5} {'pairs':>5} {'delivered/s':>12} {'MB/s':>8} {'offered/s':>12} {'loss':>8} "
          f"{'p50 ms':>9} {'p99 ms':>9}")
    results = []
    with benchlib.tempdir() as tmp:
        work = Path(tmp)
        certs = benchlib.make_certs(work) if "tls" in modes else None
        for mode in modes:
            tls = certs if mode == "tls" else None
            port = benchlib.free_port()
            cmd = benchlib.taskset_prefix(server_cpus) + benchlib.server_command(
                "derpd", port, tls=tls, workdir=work, derper=None)
            scheme = "https://localhost" if tls else "http://127.0.0.1"
            url = f"{scheme}:{port}/derp"
            with benchlib.ServerProcess(cmd, port, work / f"derpd-{mode}.log") as srv:
                for pairs in pair_counts:
                    gcmd = benchlib.taskset_prefix(gen_cpus) + generator_command(
                        gen, loadgen, url, tls.ca if tls else None, pairs, args.size, args.seconds, args.rate)
                    cpu0 = benchlib.cpu_seconds(srv.pid)
                    try:
                        r = benchlib.run_json(gcmd, timeout=args.seconds + 120, env=benchlib.go_env())
                    except (RuntimeError, subprocess.TimeoutExpired) as e:
                        print(f"{mode:5} {pairs:5} failed: {e}\nserver log:\n{srv.log_tail()}")
                        continue
                    r["server_cpu_s"] = benchlib.cpu_seconds(srv.pid) - cpu0
                    r.update(mode=mode, server="derpd", generator=gen)
                    if "error" in r:
                        print(f"{mode:5} {pairs:5} generator error: {r['error']}")
                    print(fmt_row(mode, pairs, r), flush=True)
                    results.append(r)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
