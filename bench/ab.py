"""derpd against derpd: two or more variants of it in one alternating run (A B A B ...).

Usage:  python bench/ab.py --only "stun,latency" [--rounds 3] [--seconds 4] [--rate 40000]
                           [--variant compiled=] [--variant pure=DERPD_PURE=1]
                           [--variant before=PYTHONPATH=/path/to/another/checkout]

A variant is ``NAME=`` followed by comma-separated ``VAR=value`` settings for the server's
environment (none: this checkout as it is).  ``PYTHONPATH`` pointing at another checkout of
derpd runs that code instead, which is how a change is measured against the code before it.
The scenarios are compare.py's, selected with ``--only``; the latency scenario offers
``--rate`` pkt/s (compare.py derives it from derper's capacity instead).  It prints each
metric's median and min-max per variant, and the ratio of each variant's median to the
first's (>= 1.0: at least as good as the first), and writes the raw runs to
``bench/results/ab-<time>.json``.  Figures that matter most on a shared machine are the
CPU seconds per unit of work (``cpu_s_per_mpkt``, ``cpu_s_per_klogin``, ``cpu_us_per_answer``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import benchlib
import compare


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, settings = text.partition("=")
    env = {}
    for item in filter(None, settings.split(",")):
        k, sep, v = item.partition("=")
        if not sep:
            raise SystemExit(f"--variant {text!r}: want NAME=VAR=value[,VAR=value]")
        env[k] = v
    return name, env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", required=True, help="comma-separated substrings of compare.py scenario names")
    ap.add_argument("--variant", action="append", help="NAME=VAR=value,... (repeatable; default compiled/pure)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rate", type=int, default=40_000, help="offered pkt/s for the latency scenario")
    ap.add_argument("--idle", default="1000", help="idle client counts K")
    args = ap.parse_args(argv)
    if args.rounds < 1 or not 0 < args.seconds <= 30:
        ap.error("need --rounds >= 1 and 0 < --seconds <= 30")
    variants = [parse_variant(v) for v in (args.variant or ["compiled=", "pure=DERPD_PURE=1"])]
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    compare.raise_nofile(max((int(k) for k in args.idle.split(",") if k), default=0) + 1000)
    scs = [s for s in compare.scenarios([int(k) for k in args.idle.split(",") if k]) if any(k in s.name for k in keys)]
    built = benchlib.build_go(log=lambda m: print(m, file=sys.stderr))
    if built is None:
        print("ab.py needs Go (https://go.dev/dl) to build the load generator", file=sys.stderr)
        return 1
    runs: dict[str, dict[str, list[dict]]] = {}
    progress = compare.Progress(len(scs) * args.rounds * len(variants))
    with benchlib.tempdir() as tmp:
        runner = compare.Runner(args, built[0], built[1], Path(tmp))
        runner.half_derper_rate = args.rate
        base_env = dict(runner.env)
        for sc in scs:
            per = runs.setdefault(sc.name, {name: [] for name, _ in variants})
            for rnd in range(args.rounds):
                for name, env in variants:
                    progress.show(f"{sc.name} | {name} | round {rnd + 1}/{args.rounds}")
                    runner.env = {**base_env, **env}
                    # ``python -m derpd`` puts its working directory first on sys.path, ahead
                    # of PYTHONPATH: run another checkout from inside it.
                    runner.server_cwd = env.get("PYTHONPATH") or None
                    try:
                        r = runner.run(sc, "derpd")
                    except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as e:
                        r = {"error": str(e)}
                        print(f"\n{sc.name} {name} round {rnd + 1}: {e}", file=sys.stderr)
                    per[name].append(r)
                    progress.step()
        progress.close()
    first = variants[0][0]
    print(f"\n{'scenario':28} {'metric':18} " + " ".join(f"{n:>24}" for n, _ in variants)
          + "  ratio to " + first + " (>= 1: as good)")
    for sc in scs:
        per = runs[sc.name]
        label = sc.name
        for metric, higher in sc.metrics:
            vals = {n: [r[metric] for r in per[n] if metric in r and "error" not in r] for n, _ in variants}
            if not all(vals.values()):
                continue
            med = {n: benchlib.median(v) for n, v in vals.items()}
            cells = [f"{compare.fmt(med[n])} ({compare.fmt(min(v))}-{compare.fmt(max(v))})" for n, v in vals.items()]
            ratios = []
            for n, _ in variants[1:]:
                a, b = med[first], med[n]
                ratios.append(f"{(b / a if higher else a / b) if a and b else float('nan'):.2f}")
            print(f"{label:28} {metric:18} " + " ".join(f"{c:>24}" for c in cells) + "  " + " ".join(ratios))
            label = ""
    benchlib.RESULTS_DIR.mkdir(exist_ok=True)
    out = benchlib.RESULTS_DIR / f"ab-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"variants": variants, "runs": runs}, indent=1, default=str))
    print(f"\nwrote {out.relative_to(benchlib.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
