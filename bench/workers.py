"""Does ``derpd serve --workers 2`` beat one process on this machine?

Runs the Go load generator (Tailscale's ``derphttp`` client) against ``derpd serve --workers 1``
and ``--workers 2`` alternately, plain HTTP on loopback, unpaced and at a fixed offered rate,
and prints medians.  Nothing is pinned: the workers and the generator share the machine's cores,
as they would in production on a small box.

    .venv/bin/python bench/workers.py [--rounds 3] [--seconds 4] [--pairs 50] [--rate 60000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import ServerProcess, build_go, derpd_command, free_port, median, run_json, tempdir  # noqa: E402


def run_once(loadgen: Path, workers: int, pairs: int, size: int, seconds: float, rate: float, work: Path) -> dict:
    port = free_port()
    cmd = [*derpd_command(), "serve", "--dev", "-a", f"127.0.0.1:{port}", "--stun-port", "-1",
           "--workers", str(workers), "-v"]
    with ServerProcess(cmd, port, work / f"derpd-w{workers}.log"):
        time.sleep(1.0)  # let the workers' mesh links log in (a bench, not a test)
        gen = [str(loadgen), "throughput", "-url", f"http://127.0.0.1:{port}/derp", "-pairs", str(pairs),
               "-size", str(size), "-duration", f"{seconds}s", "-rate", str(rate), "-timeout", f"{seconds + 90}s"]
        return run_json(gen, timeout=seconds + 120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--size", type=int, default=1200)
    ap.add_argument("--rate", type=float, default=60000, help="offered packets/s for the paced runs")
    args = ap.parse_args(argv)
    built = build_go()
    if built is None:
        print("workers: needs Go to build the load generator (bench/loadgen)", file=sys.stderr)
        return 2
    loadgen = built[0]
    results: dict[tuple[str, int], list[dict]] = {}
    with tempdir() as tmp:
        work = Path(tmp)
        for r in range(args.rounds):
            for mode, rate in (("unpaced", 0.0), (f"{args.rate:,.0f}/s", args.rate)):
                for workers in (1, 2):
                    print(f"round {r + 1}/{args.rounds}: {mode}, --workers {workers}", file=sys.stderr, flush=True)
                    res = run_once(loadgen, workers, args.pairs, args.size, args.seconds, rate, work)
                    results.setdefault((mode, workers), []).append(res)
    print(f"{args.pairs} pairs x {args.size} B, {args.seconds:g} s per run, {args.rounds} rounds, medians")
    print(f"{'offered':>10} {'workers':>7} {'delivered/s':>12} {'loss':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for (mode, workers), runs in results.items():
        print(f"{mode:>10} {workers:7d} {median([x['delivered_pps'] for x in runs]):12,.0f} "
              f"{100 * median([x['loss'] for x in runs]):6.2f}% {median([x['p50_ms'] for x in runs]):8.2f} "
              f"{median([x['p99_ms'] for x in runs]):8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
