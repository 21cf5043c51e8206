"""The whole machine: Tailscale's derper as shipped against ``derpd serve --workers 1`` and
``--workers auto``, with nothing pinned.

Usage:  python bench/wholemachine.py [--rounds 3] [--seconds 4] [--rates 30000,60000,120000,unpaced]
                                     [--plain | --tls] [--pairs 50] [--size 1200]
                                     [--servers derper,w1,auto] [--out bench/results]

Every server, the Go load generator (bench/loadgen) and the kernel share all the machine's
cores, as a relay on a small box does in production: derper with its goroutines on every core,
derpd as one process, and derpd as one process per available CPU meshed over loopback.  For
each mode (plain HTTP, TLS) and offered rate (paced, or unpaced: as fast as the relay takes
packets) it runs derper, derpd w1 and derpd auto in turn (A B C), ``--rounds`` times, a fresh
server process per run, and prints the median and min-max of each figure:

* delivered/s, loss, p50 and p99 latency: from the generator (as bench/compare.py);
* server CPU seconds per million delivered packets, summed over the server's whole process
  tree (the parent and every worker) from /proc over the generator's run;
* crossed: the share of packets that crossed from one derpd worker to another (the mesh link
  between two processes, so two cores' work and a second decode/encode) --
  ``derp_packets_forwarded_out`` / ``derp_packets_received`` from derpd's ``--metrics-addr``;
  0 for one process, none for derper.

Writes every run and the table to ``bench/results/wholemachine-<time>.json``.  derpd runs with
``--metrics-addr`` on loopback, so with ``--workers`` its parent scrapes every worker every
2 s during the run, as it does in production with that flag; that CPU is in the figure.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from compare import fmt  # noqa: E402

SERVERS = ("derper", "w1", "auto")
LABELS = {"derper": "derper", "w1": "derpd w1", "auto": "derpd auto"}
# (key in a run's result, column title, shown as a percentage)
METRICS = (("delivered_pps", "delivered/s", False), ("loss", "loss", True), ("p50_ms", "p50 ms", False),
           ("p99_ms", "p99 ms", False), ("cpu_s_per_mpkt", "CPU s/Mpkt", False), ("crossed_share", "crossed", True))
REFRESHED = 'derp_http_requests_total{route="metrics"}'  # each worker counts the parent's scrapes


def auto_workers() -> int:
    """What ``--workers auto`` starts here: one per available CPU (at most 64)."""
    return min(64, len(os.sched_getaffinity(0)))


def parse_rates(text: str) -> list[float]:
    """``30000,60000,unpaced`` -> [30000.0, 60000.0, 0.0] (0 = unpaced)."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        rate = 0.0 if part == "unpaced" else float(part.replace("_", ""))
        if rate < 0 or rate != rate:
            raise ValueError(part)
        out.append(rate)
    if not out:
        raise ValueError(text)
    return out


def scenario_name(mode: str, rate: float) -> str:
    return f"{mode} {'unpaced' if not rate else f'{rate:,.0f}/s'}"


# ---------------------------------------------------------------------- derpd's metrics


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as {series: value}, every labelled series also summed under its bare name."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        try:
            v = float(value)
        except ValueError:
            continue
        out[series] = v
        name = series.split("{", 1)[0]
        if name != series:
            out[name] = out.get(name, 0.0) + v
    return out


def scrape(port: int) -> dict[str, float]:
    """derpd's ``--metrics-addr`` on 127.0.0.1 (no proxy), parsed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read().decode()
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"/metrics on port {port} answered {resp.status}")
    return parse_metrics(body)


def crossing(counters: dict[str, float]) -> dict[str, float]:
    """The relay's own packet counts over the run (a fresh server starts at zero), and the share
    of the packets clients sent that one worker forwarded to another."""
    received = counters.get("derp_packets_received_total", 0.0)
    out = counters.get("derp_packets_forwarded_out_total", 0.0)
    return {"relay_packets_received": received, "relay_packets_sent": counters.get("derp_packets_sent_total", 0.0),
            "relay_packets_dropped": counters.get("derp_packets_dropped_total", 0.0),
            "forwarded_out": out, "forwarded_in": counters.get("derp_packets_forwarded_in_total", 0.0),
            "crossed_share": out / received if received else 0.0}


def data_plane(counters: dict[str, float]) -> str:
    for series in counters:
        m = re.match(r'derpd_build_info\{.*data_plane="([^"]+)"', series)
        if m:
            return m.group(1)
    return "?"


def _try_scrape(port: int) -> dict[str, float]:
    try:
        return scrape(port)
    except (OSError, RuntimeError, http.client.HTTPException, UnicodeDecodeError):
        return {}


def wait_serving(port: int, workers: int, srv: benchlib.ServerProcess, timeout: float = 30.0) -> dict[str, float]:
    """Until derpd's metrics show every worker serving and every link between workers accepted
    (N x (N - 1) DERP logins), so the run does not start while the workers still mesh."""
    need = workers * (workers - 1)
    deadline = time.monotonic() + timeout
    while True:
        assert srv.proc is not None
        if srv.proc.poll() is not None:
            raise RuntimeError(f"derpd exited with code {srv.proc.returncode}:\n{srv.log_tail()}")
        c = _try_scrape(port)
        if c.get("derpd_build_info", 0) and c.get("derp_accepts_total", 0) >= need:
            return c
        if time.monotonic() > deadline:
            raise RuntimeError(f"--workers {workers}: the links between the workers were not up after {timeout:g} s")
        time.sleep(0.1)  # polling a child process's metrics, not a test


def settled_counters(port: int, workers: int, timeout: float = 15.0) -> dict[str, float]:
    """derpd's counters after the run.  One process serves them live; with --workers the parent
    serves a copy it refreshes every 2 s, so wait for two more refreshes (each scrapes every
    worker once): the second began after this call, so after the run."""
    first = scrape(port)
    if workers == 1:
        return first
    target = first.get(REFRESHED, 0.0) + 2 * workers
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)  # waiting for the parent's next refresh, not a test
        c = _try_scrape(port)
        if c.get(REFRESHED, 0.0) >= target:
            return c
    raise RuntimeError(f"derpd's merged metrics did not refresh within {timeout:g} s")


# ---------------------------------------------------------------------- runs


class Runner:
    def __init__(self, args: argparse.Namespace, loadgen: Path, derper: Path, work: Path) -> None:
        self.args, self.loadgen, self.derper, self.work = args, loadgen, derper, work
        self.certs = benchlib.make_certs(work)
        self.env = benchlib.go_env()
        self.workers = {"w1": 1, "auto": auto_workers()}

    def run(self, server: str, tls: bool, rate: float) -> dict:
        a = self.args
        port = benchlib.free_port()
        impl = "derper" if server == "derper" else "derpd"
        cmd = benchlib.server_command(impl, port, tls=self.certs if tls else None, workdir=self.work,
                                      derper=self.derper)
        mport = None
        if impl == "derpd":
            mport = benchlib.free_port()
            cmd += ["--workers", "1" if server == "w1" else "auto", "--metrics-addr", f"127.0.0.1:{mport}"]
        url = f"{'https://localhost' if tls else 'http://127.0.0.1'}:{port}/derp"
        gen = [str(self.loadgen), "throughput", "-url", url, "-pairs", str(a.pairs), "-size", str(a.size),
               "-duration", f"{a.seconds}s", "-rate", str(round(rate)), "-timeout", f"{a.seconds + 90}s"]
        if tls:
            gen += ["-ca", str(self.certs.ca)]
        srv = benchlib.ServerProcess(cmd, port, self.work / f"{server}.log", env=self.env)
        tree: dict[int, str] = {}
        try:
            with srv:
                try:
                    return self._measure(srv, server, mport, gen)
                finally:
                    tree = benchlib.process_starts(benchlib.process_tree(srv.pid)[1:])
        finally:
            if benchlib.kill_leftovers(tree):  # workers that outlived a parent stopped with SIGKILL
                print(f"{LABELS[server]}: killed processes it left behind", file=sys.stderr)

    def _measure(self, srv: benchlib.ServerProcess, server: str, mport: int | None, gen: list[str]) -> dict:
        extra: dict = {}
        if mport is not None:
            extra["data_plane"] = data_plane(wait_serving(mport, self.workers[server], srv))
        cpu0 = benchlib.tree_cpu_seconds(srv.pid)
        gen0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        r = benchlib.run_json(gen, timeout=self.args.seconds + 120, env=self.env)
        gen1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu1 = benchlib.tree_cpu_seconds(srv.pid)
        cpu = benchlib.cpu_between(cpu0, cpu1)
        r.update(extra)
        r["server_cpu_s"] = cpu
        r["server_processes"] = len(cpu1)
        r["parent_cpu_s"] = cpu1.get(srv.pid, 0.0) - cpu0.get(srv.pid, 0.0)
        r["generator_cpu_s"] = (gen1.ru_utime + gen1.ru_stime) - (gen0.ru_utime + gen0.ru_stime)
        r["cpu_s_per_mpkt"] = cpu / max(r.get("received", 0), 1) * 1e6
        if mport is not None:
            r.update(crossing(settled_counters(mport, self.workers[server])))
        if "error" in r:
            r["server_log"] = srv.log_tail()
        return r


def summarize(runs: dict[str, dict[str, list[dict]]], servers: tuple[str, ...]) -> list[dict]:
    """One row per scenario and figure: median, min and max of each server's good runs."""
    rows = []
    for scenario, per in runs.items():
        for key, _title, _pct in METRICS:
            row: dict = {"scenario": scenario, "metric": key}
            for s in servers:
                vals = [r[key] for r in per.get(s, []) if key in r and "error" not in r]
                if vals:
                    row[s] = {"median": benchlib.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
            if any(s in row for s in servers):
                rows.append(row)
    return rows


def _cell(v: dict | None, pct: bool) -> str:
    if v is None:
        return "-"
    f = (lambda x: f"{100 * x:.1f}%") if pct else fmt
    return f"{f(v['median'])} ({f(v['min'])}-{f(v['max'])})"


def print_table(rows: list[dict], servers: tuple[str, ...]) -> None:
    titles = {key: (title, pct) for key, title, pct in METRICS}
    print(f"\n{'scenario':16} {'figure':12} " + " ".join(f"{LABELS[s]:>30}" for s in servers))
    last = None
    for r in rows:
        name = r["scenario"] if r["scenario"] != last else ""
        last = r["scenario"]
        title, pct = titles[r["metric"]]
        print(f"{name:16} {title:12} " + " ".join(f"{_cell(r.get(s), pct):>30}" for s in servers))
    print("median (min-max) over the rounds; CPU: the server's whole process tree per million delivered packets; "
          "crossed: packets one derpd worker forwarded to another")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="A B C rounds per scenario")
    ap.add_argument("--seconds", type=float, default=4.0, help="measurement window per run (max 30)")
    ap.add_argument("--rates", default="30000,60000,120000,unpaced",
                    help="offered packets/s over all pairs; 'unpaced' (or 0): as fast as the relay takes them")
    ap.add_argument("--plain", action="store_true", help="plain HTTP (with --tls: both, the default)")
    ap.add_argument("--tls", action="store_true", help="TLS (with --plain: both, the default)")
    ap.add_argument("--pairs", type=int, default=50, help="sender->receiver pairs")
    ap.add_argument("--size", type=int, default=1200, help="packet size in bytes")
    ap.add_argument("--servers", default=",".join(SERVERS), help="a subset of derper,w1,auto, in run order")
    ap.add_argument("--out", type=Path, default=benchlib.RESULTS_DIR)
    args = ap.parse_args(argv)
    if args.rounds < 1 or not 0 < args.seconds <= 30:
        ap.error("need --rounds >= 1 and 0 < --seconds <= 30")
    if not 1 <= args.pairs <= 5000 or not 18 <= args.size <= 65536:
        ap.error("need 1 <= --pairs <= 5000 and 18 <= --size <= 65536")
    try:
        rates = parse_rates(args.rates)
    except ValueError:
        ap.error(f"--rates {args.rates!r}: want numbers of packets/s and 'unpaced', comma-separated")
    servers = tuple(s.strip() for s in args.servers.split(",") if s.strip())
    if not servers or any(s not in SERVERS for s in servers) or len(set(servers)) != len(servers):
        ap.error(f"--servers {args.servers!r}: want some of {','.join(SERVERS)}")
    modes = [m for m, on in (("plain", args.plain), ("tls", args.tls)) if on] or ["plain", "tls"]

    built = benchlib.build_go(log=lambda m: print(m, file=sys.stderr))
    if built is None:
        print("wholemachine.py needs Go (https://go.dev/dl) to build the load generator and derper", file=sys.stderr)
        return 1
    loadgen, derper = built
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"tailscale_version": benchlib.tailscale_version(), "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "auto_workers": auto_workers(),
            "rounds": args.rounds, "seconds": args.seconds, "pairs": args.pairs, "size": args.size,
            "rates": rates, "modes": modes, "servers": list(servers), "pinned": False, "started": stamp,
            "loadavg_start": os.getloadavg()}
    runs: dict[str, dict[str, list[dict]]] = {}
    total = len(modes) * len(rates) * args.rounds * len(servers)
    done, t0 = 0, time.monotonic()
    print(f"whole machine, nothing pinned: {', '.join(LABELS[s] for s in servers)} (auto = {auto_workers()} "
          f"workers); {args.pairs} pairs x {args.size} B, {args.rounds} rounds x {args.seconds:g} s",
          file=sys.stderr)
    with benchlib.tempdir() as tmp:
        runner = Runner(args, loadgen, derper, Path(tmp))
        for mode in modes:
            for rate in rates:
                name = scenario_name(mode, rate)
                per = runs.setdefault(name, {s: [] for s in servers})
                for rnd in range(args.rounds):
                    for server in servers:  # A B C in every round
                        print(f"[{done + 1}/{total}] {time.monotonic() - t0:5.0f} s  {name} | {LABELS[server]} | "
                              f"round {rnd + 1}/{args.rounds}", file=sys.stderr, flush=True)
                        try:
                            r = runner.run(server, mode == "tls", rate)
                        except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as e:
                            r = {"error": str(e)}
                        r["round"] = rnd
                        per[server].append(r)
                        if "error" in r:
                            print(f"{name} {LABELS[server]} round {rnd + 1}: {r['error']}", file=sys.stderr)
                        done += 1
    meta["loadavg_end"] = os.getloadavg()
    rows = summarize(runs, servers)
    print(f"{args.pairs} pairs x {args.size} B, {args.rounds} rounds x {args.seconds:g} s, nothing pinned, "
          f"{os.cpu_count()} CPUs (derpd auto = {auto_workers()} workers)")
    print_table(rows, servers)
    out_json = args.out / f"wholemachine-{stamp}.json"
    out_json.write_text(json.dumps({"meta": meta, "table": rows, "runs": runs}, indent=1, default=str))
    print(f"\nwrote {out_json.relative_to(benchlib.ROOT) if out_json.is_relative_to(benchlib.ROOT) else out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
