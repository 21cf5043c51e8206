"""derpd against Tailscale's derper, side by side in one run, with the same Go load generator.

Usage:  python bench/compare.py [--rounds 3] [--seconds 5] [--only NAME,...] [--idle 1000,10000]
                                [--no-chart] [--out bench/results]

Builds bench/loadgen and tailscale.com/cmd/derper (the version pinned in bench/loadgen/go.mod)
from the Go module proxy into bench/.build/, then runs every scenario against derpd and derper
alternately (A B A B ..., ``--rounds`` each, a fresh server process per run).  With 2+ CPUs the
server is pinned to one half of them and the generator to the other (taskset).  It prints a
table (metric, derpd median, derper median, ratio, min-max of each), writes every raw run and
the table to ``bench/results/compare-<time>.json`` and draws ``compare-<time>.png``
(matplotlib, installed into the running venv on first use; a bench-only dependency).

Ratios are derpd/derper for "higher is better" metrics and derper/derpd for "lower is
better" ones, so a ratio >= 1.0 always means derpd is at least as good.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import benchlib

IMPLS = ("derpd", "derper")


@dataclass
class Scenario:
    name: str
    kind: str  # throughput | capacity | idle | churn | stun
    args: dict = field(default_factory=dict)
    tls: bool = False
    metrics: tuple[tuple[str, bool], ...] = ()  # (metric, higher_is_better)
    note: str = ""


TPUT_METRICS = (("delivered_pps", True), ("delivered_mbps", True), ("loss", False), ("p50_ms", False),
                ("p99_ms", False), ("cpu_s_per_mpkt", False), ("peak_rss_mb", False))


def scenarios(idle_ks: list[int]) -> list[Scenario]:
    out = [
        Scenario("tput 1x1200 plain", "throughput", {"pairs": 1, "size": 1200}, metrics=TPUT_METRICS),
        Scenario("tput 50x1200 plain", "throughput", {"pairs": 50, "size": 1200}, metrics=TPUT_METRICS),
        Scenario("tput 1x1200 tls", "throughput", {"pairs": 1, "size": 1200}, tls=True, metrics=TPUT_METRICS),
        Scenario("tput 50x1200 tls", "throughput", {"pairs": 50, "size": 1200}, tls=True, metrics=TPUT_METRICS),
        Scenario("tput 10x64 plain", "throughput", {"pairs": 10, "size": 64}, metrics=TPUT_METRICS),
        Scenario("tput 10x1200 plain", "throughput", {"pairs": 10, "size": 1200}, metrics=TPUT_METRICS),
        Scenario("tput 10x16K plain", "throughput", {"pairs": 10, "size": 16384}, metrics=TPUT_METRICS),
        Scenario("tput 10x64K plain", "throughput", {"pairs": 10, "size": 65536}, metrics=TPUT_METRICS),
        Scenario("capacity 50x1200 plain", "capacity", {"pairs": 50, "size": 1200},
                 metrics=(("capacity_pps", True), ("capacity_mbps", True)),
                 note="highest paced offered rate (doubling from 10k pkt/s, then four bisection steps) "
                      "delivered with loss < 1%"),
        Scenario("capacity 50x1200 tls", "capacity", {"pairs": 50, "size": 1200}, tls=True,
                 metrics=(("capacity_pps", True), ("capacity_mbps", True))),
        Scenario("latency 50x1200 @50% derper", "throughput", {"pairs": 50, "size": 1200, "rate": "half-derper"},
                 metrics=(("delivered_pps", True), ("loss", False), ("p50_ms", False), ("p99_ms", False),
                          ("p999_ms", False), ("cpu_s_per_mpkt", False)),
                 note="offered rate = 50% of derper's median delivered pkt/s in 'tput 50x1200 plain'"),
    ]
    for k in idle_ks:
        out.append(Scenario(f"idle K={k}", "idle", {"clients": k},
                            metrics=(("rss_per_conn_kb", False), ("rss_mb", False), ("logins_per_s", True),
                                     ("connected", True))))
    out += [
        Scenario("churn 16 workers", "churn", {"workers": 16},
                 metrics=(("logins_per_s", True), ("errors", False), ("cpu_s_per_klogin", False))),
        Scenario("stun 1 worker", "stun", {"workers": 1},
                 metrics=(("answered_per_s", True), ("p99_ms", False), ("cpu_us_per_answer", False))),
        Scenario("stun 8 workers", "stun", {"workers": 8},
                 metrics=(("answered_per_s", True), ("p99_ms", False), ("cpu_us_per_answer", False))),
    ]
    return out


class Progress:
    """One status line (rewritten in place on a terminal) with done/total and an ETA."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.monotonic()
        self.tty = sys.stderr.isatty()

    def show(self, what: str) -> None:
        elapsed = time.monotonic() - self.t0
        eta = f"ETA {elapsed / self.done * (self.total - self.done):4.0f} s" if self.done else "ETA   ?"
        line = f"[{self.done + 1:3}/{self.total}] {elapsed:5.0f} s  {eta}  {what}"
        if self.tty:
            print("\r\033[K" + line, end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def step(self) -> None:
        self.done += 1

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


class Runner:
    def __init__(self, args: argparse.Namespace, loadgen: Path, derper: Path, work: Path) -> None:
        self.args, self.loadgen, self.derper, self.work = args, loadgen, derper, work
        self.certs = benchlib.make_certs(work)
        self.server_cpus, self.gen_cpus = benchlib.pin_plan()
        self.env = benchlib.go_env()
        self.half_derper_rate: float | None = None
        self.server_cwd: str | None = None  # bench/ab.py: run derpd from another checkout

    def run(self, sc: Scenario, impl: str) -> dict:
        port = benchlib.free_port()
        stun_port = benchlib.free_port(benchlib.socket.SOCK_DGRAM) if sc.kind == "stun" else -1
        cmd = benchlib.taskset_prefix(self.server_cpus) + benchlib.server_command(
            impl, port, tls=self.certs if sc.tls else None, workdir=self.work, derper=self.derper,
            stun_port=stun_port)
        url = f"{'https://localhost' if sc.tls else 'http://127.0.0.1'}:{port}/derp"
        kind = "throughput" if sc.kind == "capacity" else sc.kind
        lg = benchlib.taskset_prefix(self.gen_cpus) + [str(self.loadgen), kind]
        secs = self.args.seconds
        with benchlib.ServerProcess(cmd, port, self.work / f"{impl}.log", env=self.env,
                                    cwd=self.server_cwd if impl == "derpd" else None) as srv:
            rss0 = benchlib.rss_bytes(srv.pid)
            cpu0 = benchlib.cpu_seconds(srv.pid)
            if sc.kind == "throughput":
                a = dict(sc.args)
                rate = a.pop("rate", 0)
                if rate == "half-derper":
                    rate = self.half_derper_rate or 0
                    if not rate:
                        raise RuntimeError("needs 'capacity 50x1200 plain' for derper's capacity first")
                g = lg + ["-url", url, "-pairs", str(a["pairs"]), "-size", str(a["size"]), "-duration", f"{secs}s",
                          "-rate", str(rate), "-timeout", f"{secs + 90}s"]
                if sc.tls:
                    g += ["-ca", str(self.certs.ca)]
                r = benchlib.run_json(g, timeout=secs + 120, env=self.env)
                cpu = benchlib.cpu_seconds(srv.pid) - cpu0
                r["cpu_s_per_mpkt"] = cpu / max(r["received"], 1) * 1e6
            elif sc.kind == "capacity":
                r = self._capacity(lg + (["-ca", str(self.certs.ca)] if sc.tls else []), url,
                                   sc.args["pairs"], sc.args["size"])
                cpu = benchlib.cpu_seconds(srv.pid) - cpu0
            elif sc.kind == "idle":
                r = self._idle(lg + ["-url", url, "-clients", str(sc.args["clients"]), "-hold", "60s",
                                     "-timeout", "180s"], srv.pid)
                r["rss_mb"] = r["rss_loaded"] / 1e6
                r["rss_per_conn_kb"] = (r["rss_loaded"] - rss0) / max(r["connected"], 1) / 1024
                cpu = benchlib.cpu_seconds(srv.pid) - cpu0
            elif sc.kind == "churn":
                r = benchlib.run_json(lg + ["-url", url, "-workers", str(sc.args["workers"]),
                                            "-duration", f"{secs}s", "-timeout", f"{secs + 60}s"],
                                      timeout=secs + 90, env=self.env)
                cpu = benchlib.cpu_seconds(srv.pid) - cpu0
                r["cpu_s_per_klogin"] = cpu / max(r["logins"], 1) * 1e3
            else:
                r = benchlib.run_json(lg + ["-addr", f"127.0.0.1:{stun_port}", "-workers", str(sc.args["workers"]),
                                            "-duration", f"{secs}s"], timeout=secs + 90, env=self.env)
                cpu = benchlib.cpu_seconds(srv.pid) - cpu0
                r["cpu_us_per_answer"] = cpu / max(r.get("answered", 0), 1) * 1e6
            r["server_cpu_s"] = cpu
            r["rss_start_mb"] = rss0 / 1e6
            r["peak_rss_mb"] = benchlib.peak_rss_bytes(srv.pid) / 1e6
            if "error" in r:
                r["server_log"] = srv.log_tail()
        return r

    def _capacity(self, lg: list[str], url: str, pairs: int, size: int) -> dict:
        """Paced runs at doubling offered rates, then four bisection steps between the last rate
        that kept loss under 1% and the first that did not (a sixteenth of the last doubling:
        with two steps the result could only land on quarter points, and rounds that differed
        by a few percent reported rates 20 % apart)."""
        steps = []

        def step(rate: float) -> bool:
            g = lg + ["-url", url, "-pairs", str(pairs), "-size", str(size), "-duration", "2s",
                      "-warmup", "500ms", "-rate", str(round(rate)), "-timeout", "60s"]
            r = benchlib.run_json(g, timeout=90, env=self.env)
            ok = "error" not in r and r["loss"] < 0.01 and r["delivered_pps"] >= 0.95 * rate
            steps.append({"rate": round(rate), "delivered_pps": r.get("delivered_pps"), "loss": r.get("loss"),
                          "p99_ms": r.get("p99_ms"), "ok": ok})
            return ok

        good, rate = 0.0, 10_000.0
        while rate <= 640_000 and step(rate):
            good, rate = rate, rate * 2
        bad = rate
        for _ in range(4):  # four bisection steps: a sixteenth of the last doubling
            if not good or bad > 640_000:
                break
            mid = (good + bad) / 2
            if step(mid):
                good = mid
            else:
                bad = mid
        best = max((s["delivered_pps"] for s in steps if s["ok"]), default=0.0)
        return {"capacity_pps": best, "capacity_mbps": best * size / 1e6, "steps": steps,
                "offered_capacity": good}

    def _idle(self, cmd: list[str], pid: int) -> dict:
        """Start the idle generator, read its READY line, measure the server, then let it go."""
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=self.env)
        try:
            assert p.stdout is not None and p.stdin is not None
            line = p.stdout.readline()  # bounded by the generator's own -timeout
            if not line.startswith("READY "):
                p.kill()
                raise RuntimeError(f"idle generator: {line.strip() or p.stderr.read()[-300:]}")
            ready = json.loads(line[6:])
            # Let the server finish what the logins queued before reading its memory.
            time.sleep(1.0)  # settling time before a memory reading, not a test wait
            ready["rss_loaded"] = benchlib.rss_bytes(pid)
            out, _ = p.communicate(timeout=60)  # closes stdin: the generator disconnects and reports
            final = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
            return {**final, **ready, "dropped_while_idle": final.get("dropped_while_idle", 0)}
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=5)


def summarize(runs: dict[str, dict[str, list[dict]]], scs: list[Scenario]) -> list[dict]:
    rows = []
    for sc in scs:
        per = runs.get(sc.name)
        if not per:
            continue
        for metric, higher in sc.metrics:
            vals = {impl: [r[metric] for r in per.get(impl, []) if metric in r and "error" not in r] for impl in IMPLS}
            if not all(vals.values()):
                continue
            md, mg = benchlib.median(vals["derpd"]), benchlib.median(vals["derper"])
            if higher:
                ratio = md / mg if mg else float("inf")
            else:
                ratio = mg / md if md else (1.0 if mg == 0 else float("inf"))
            rows.append({"scenario": sc.name, "metric": metric, "higher_is_better": higher,
                         "derpd": md, "derper": mg, "ratio": ratio,
                         "derpd_min": min(vals["derpd"]), "derpd_max": max(vals["derpd"]),
                         "derper_min": min(vals["derper"]), "derper_max": max(vals["derper"]),
                         "n": min(len(v) for v in vals.values())})
    return rows


def fmt(x: float) -> str:
    if x != x:
        return "nan"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def print_table(rows: list[dict]) -> None:
    print(f"\n{'scenario':28} {'metric':16} {'derpd':>11} {'derper':>11} {'ratio':>6}  "
          f"{'derpd min-max':>21}  {'derper min-max':>21}")
    last = None
    for r in rows:
        name = r["scenario"] if r["scenario"] != last else ""
        last = r["scenario"]
        ratio = f"{r['ratio']:.2f}" if r["ratio"] != float("inf") else "inf"
        print(f"{name:28} {r['metric']:16} {fmt(r['derpd']):>11} {fmt(r['derper']):>11} {ratio:>6}  "
              f"{fmt(r['derpd_min']) + '-' + fmt(r['derpd_max']):>21}  "
              f"{fmt(r['derper_min']) + '-' + fmt(r['derper_max']):>21}")
    print("ratio >= 1.0: derpd at least as good (derpd/derper when higher is better, derper/derpd when lower is)")


def ensure_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        pass
    if sys.prefix == sys.base_prefix:
        print("matplotlib missing and not in a venv: skipping the chart (pip install matplotlib)", file=sys.stderr)
        return False
    print("installing matplotlib into the venv (bench-only dependency)", file=sys.stderr)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"], timeout=600)
    return r.returncode == 0


def chart(rows: list[dict], path: Path) -> bool:
    if not ensure_matplotlib():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def get(scn: str, metric: str, impl: str) -> float | None:
        for r in rows:
            if r["scenario"] == scn and r["metric"] == metric:
                return r[impl]
        return None

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    sizes = [(64, "64"), (1200, "1200"), (16384, "16K"), (65536, "64K")]
    for impl, marker, color in (("derpd", "o", "tab:blue"), ("derper", "s", "tab:orange")):
        xs, ys = [], []
        for size, label in sizes:
            v = get(f"tput 10x{label} plain", "delivered_mbps", impl)
            if v is not None:
                xs.append(size)
                ys.append(v)
        ax1.plot(xs, ys, marker=marker, linestyle="-", color=color, label=impl)
        for mode, ls in (("plain", "-"), ("tls", ":")):
            px, py = [], []
            for pairs in (1, 10, 50):
                v = get(f"tput {pairs}x1200 {mode}", "delivered_pps", impl)
                if v is not None:
                    px.append(pairs)
                    py.append(v / 1000)
            if px:
                ax2.plot(px, py, marker=marker, linestyle=ls, color=color, label=f"{impl} {mode} (unpaced)")
        cap = get("capacity 50x1200 plain", "capacity_pps", impl)
        if cap is not None:
            ax2.plot([50], [cap / 1000], marker="*", markersize=14, linestyle="none", color=color,
                     markeredgecolor="black",
                     label=f"{impl} capacity (loss < 1%)")
    ax1.set(xscale="log", xlabel="packet size (bytes), 10 pairs, plain", ylabel="delivered MB/s",
            title="Throughput against packet size")
    ax2.set(xscale="log", xlabel="sender->receiver pairs, 1,200-byte packets", ylabel="delivered kpackets/s",
            title="Throughput against pair count")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("derpd vs derper on loopback, server pinned to one CPU (medians; lines: unpaced senders)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def raise_nofile(need: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="runs per scenario and server (>= 3)")
    ap.add_argument("--seconds", type=float, default=5.0, help="measurement window per run (max 30)")
    ap.add_argument("--idle", default="1000,10000", help="idle client counts K")
    ap.add_argument("--only", help="comma-separated substrings of scenario names to run")
    ap.add_argument("--out", type=Path, default=benchlib.RESULTS_DIR)
    ap.add_argument("--no-chart", action="store_true")
    args = ap.parse_args(argv)
    if args.rounds < 1 or not 0 < args.seconds <= 30:
        ap.error("need --rounds >= 1 and 0 < --seconds <= 30")
    idle_ks = [int(k) for k in args.idle.split(",") if k]
    limit = raise_nofile(max(idle_ks, default=0) + 1000)
    usable = [k for k in idle_ks if k + 500 <= limit]
    if usable != idle_ks:
        print(f"open-files limit is {limit}: skipping idle K in {sorted(set(idle_ks) - set(usable))}", file=sys.stderr)
    scs = scenarios(usable)
    if args.only:
        keys = [k.strip() for k in args.only.split(",")]
        scs = [s for s in scs if any(k in s.name for k in keys)]
        if any("@50%" in s.name for s in scs) and not any(s.kind == "capacity" for s in scs):
            scs.insert(0, next(s for s in scenarios([]) if s.kind == "capacity"))
    built = benchlib.build_go(log=lambda m: print(m, file=sys.stderr))
    if built is None:
        print("compare.py needs Go (https://go.dev/dl) to build the load generator and derper", file=sys.stderr)
        return 1
    loadgen, derper = built
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, list[dict]]] = {}
    meta = {"tailscale_version": benchlib.tailscale_version(), "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "rounds": args.rounds, "seconds": args.seconds,
            "nofile": limit, "started": stamp}
    progress = Progress(len(scs) * args.rounds * 2)
    with benchlib.tempdir() as tmp:
        runner = Runner(args, loadgen, derper, Path(tmp))
        meta["server_cpus"], meta["generator_cpus"] = runner.server_cpus, runner.gen_cpus
        print(f"derpd vs derper (tailscale.com {meta['tailscale_version']}), {args.rounds} rounds x "
              f"{args.seconds:g} s; server on CPU {runner.server_cpus or 'any'}, "
              f"generator on CPU {runner.gen_cpus or 'any'}", file=sys.stderr)
        for sc in scs:
            per = runs.setdefault(sc.name, {i: [] for i in IMPLS})
            for rnd in range(args.rounds):
                order = IMPLS  # A B A B ...
                for impl in order:
                    progress.show(f"{sc.name} | {impl} | round {rnd + 1}/{args.rounds}")
                    try:
                        r = runner.run(sc, impl)
                    except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as e:
                        r = {"error": str(e)}
                    r["round"] = rnd
                    per[impl].append(r)
                    if "error" in r:
                        print(f"\n{sc.name} {impl} round {rnd + 1}: {r['error']}", file=sys.stderr)
                    progress.step()
            if sc.name == "capacity 50x1200 plain":
                caps = [r["capacity_pps"] for r in per["derper"] if r.get("capacity_pps")]
                if caps:
                    runner.half_derper_rate = round(benchlib.median(caps) / 2)
                    meta["half_derper_rate"] = runner.half_derper_rate
        progress.close()
    rows = summarize(runs, scs)
    print_table(rows)
    out_json = args.out / f"compare-{stamp}.json"
    out_json.write_text(json.dumps({"meta": meta, "table": rows, "runs": runs}, indent=1, default=str))
    print(f"\nwrote {out_json.relative_to(benchlib.ROOT) if out_json.is_relative_to(benchlib.ROOT) else out_json}")
    if not args.no_chart:
        png = args.out / f"compare-{stamp}.png"
        if chart(rows, png):
            print(f"wrote {png.relative_to(benchlib.ROOT) if png.is_relative_to(benchlib.ROOT) else png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
