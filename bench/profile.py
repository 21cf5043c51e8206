"""Where derpd's time goes: py-spy samples a derpd process while the Go load generator drives it.

Usage:  python bench/profile.py [--scenario plain50|tls50|paced50|churn|stun1|stun8] [--seconds 6] [--top 25]
                                [--rate PKT_PER_S]

py-spy (installed into the running venv on first use; bench-only) samples the server at 250 Hz
without pausing it.  The script prints the functions with the most samples on the CPU ("self")
and on the stack ("total"), as a share of all samples, and keeps the collapsed stacks (input for
flamegraph.pl or speedscope) in bench/results/profile-<scenario>.txt.  The server is pinned to
one half of the CPUs and the generator plus py-spy to the other, as in compare.py.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
from pathlib import Path

import benchlib

SCENARIOS = {
    "plain50": (False, ["throughput", "-pairs", "50", "-size", "1200"]),
    "tls50": (True, ["throughput", "-pairs", "50", "-size", "1200"]),
    "paced50": (False, ["throughput", "-pairs", "50", "-size", "1200", "-rate", "100000"]),
    "churn": (False, ["churn", "-workers", "16"]),
    "stun1": (False, ["stun", "-workers", "1"]),
    "stun8": (False, ["stun", "-workers", "8"]),  # derpd's in-process STUN server
}


def py_spy() -> str | None:
    exe = Path(sys.executable).parent / "py-spy"
    if exe.exists():
        return str(exe)
    if sys.prefix == sys.base_prefix:
        return shutil.which("py-spy")
    print("installing py-spy into the venv (bench-only dependency)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "py-spy"], timeout=600, check=False)
    return str(exe) if exe.exists() else None


def summarize(collapsed: Path, top: int) -> str:
    """Self and total sample shares per function from py-spy's raw (collapsed) output."""
    self_n: collections.Counter[str] = collections.Counter()
    total_n: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [f.split(" (")[0] + " " + f.rsplit("/", 1)[-1].rstrip(")") for f in stack.split(";") if f]
        if frames:
            self_n[frames[-1]] += n
        for f in set(frames):
            total_n[f] += n
    out = [f"{samples} samples", f"{'self %':>7}  function (file:line)"]
    out += [f"{100 * n / samples:7.1f}  {f}" for f, n in self_n.most_common(top)]
    out += ["", f"{'total %':>7}  function (file:line)"]
    out += [f"{100 * n / samples:7.1f}  {f}" for f, n in total_n.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="plain50")
    ap.add_argument("--seconds", type=float, default=6.0, help="load and sampling time (max 30)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--lines", action="store_true", help="keep line numbers (finer, longer list)")
    ap.add_argument("--rate", type=int, help="offered pkt/s for paced50 (default 100000)")
    ap.add_argument("--tree", help="profile the derpd of another checkout (a directory holding derpd/)")
    args = ap.parse_args(argv)
    if not 0 < args.seconds <= 30:
        ap.error("need 0 < --seconds <= 30")
    spy = py_spy()
    built = benchlib.build_go(log=lambda m: print(m, file=sys.stderr))
    if spy is None or built is None:
        print("profile.py needs py-spy and Go", file=sys.stderr)
        return 1
    loadgen = built[0]
    tls, gen_args = SCENARIOS[args.scenario]
    if args.rate and "-rate" in gen_args:
        gen_args = [*gen_args[: gen_args.index("-rate") + 1], str(args.rate)]
    server_cpus, gen_cpus = benchlib.pin_plan()
    benchlib.RESULTS_DIR.mkdir(exist_ok=True)
    collapsed = benchlib.RESULTS_DIR / f"profile-{args.scenario}{'-' + str(args.rate) if args.rate else ''}.txt"
    with benchlib.tempdir() as tmp:
        work = Path(tmp)
        certs = benchlib.make_certs(work) if tls else None
        port = benchlib.free_port()
        stun = gen_args[0] == "stun"
        stun_port = benchlib.free_port(benchlib.socket.SOCK_DGRAM) if stun else -1
        cmd = benchlib.taskset_prefix(server_cpus) + benchlib.server_command(
            "derpd", port, tls=certs, workdir=work, derper=None, stun_port=stun_port)
        url = f"{'https://localhost' if tls else 'http://127.0.0.1'}:{port}/derp"
        env = None
        if args.tree:  # python -m puts the working directory first on sys.path
            env = {**benchlib.os.environ, "PYTHONPATH": args.tree}
        with benchlib.ServerProcess(cmd, port, work / "derpd.log", env=env, cwd=args.tree) as srv:
            secs = args.seconds
            target = ["-addr", f"127.0.0.1:{stun_port}"] if stun else ["-url", url]
            g = benchlib.taskset_prefix(gen_cpus) + [str(loadgen), *gen_args, *target,
                                                     "-duration", f"{secs}s", "-timeout", f"{secs + 60}s"]
            if certs:
                g += ["-ca", str(certs.ca)]
            gen = subprocess.Popen(g, stdout=subprocess.PIPE, text=True, env=benchlib.go_env())
            spy_cmd = benchlib.taskset_prefix(gen_cpus) + [
                spy, "record", "--pid", str(srv.pid), "--rate", "250", "--nonblocking", "--format", "raw",
                "--duration", str(int(secs)), "--output", str(collapsed)]
            if not args.lines:
                spy_cmd.append("--function")
            subprocess.run(spy_cmd, capture_output=True, timeout=secs + 60, check=True)
            out, _ = gen.communicate(timeout=secs + 90)
    print(f"scenario {args.scenario}: {out.strip().splitlines()[-1]}")
    print(summarize(collapsed, args.top))
    print(f"\ncollapsed stacks: {collapsed.relative_to(benchlib.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
