"""50 MB through a real tailnet: derpd against Tailscale's derper, alternating.

Two tailnets, each in its own private network namespace (tests/tailnet/tailnet_harness.py):
headscale, the coordinator's map, and two tailscaled (userspace networking,
TS_DEBUG_ALWAYS_USE_DERP=1) whose every packet goes through the relay: derpd in one, derper
in the other, both TLS for localhost from the same test CA on the same port.  Each round
fetches the same 50 MB from node b to node a with ``tailscale nc``, first through one relay
and then the other (the order alternates), and prints the throughput and the relay's CPU
seconds (and both tailscaled's) for that transfer, then the medians and the derpd/derper
ratios.

    .venv/bin/python bench/tailnet.py [--rounds 3] [--size-mb 50]

Not a test.  The first run builds tailscaled, tailscale and headscale (like the tailnet
suite, cached by version) and derper (like bench/compare.py, into bench/.build).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from benchlib import build_go, cpu_seconds, median  # noqa: E402

from tests.interop.interop_harness import make_test_ca  # noqa: E402
from tests.tailnet.tailnet_harness import PORTS, Tailnet, build_tailnet_tools, make_blob  # noqa: E402


def give_up(message: str):
    raise SystemExit(f"bench/tailnet.py: {message}")


def start_derper(net: Tailnet, derper: Path):
    argv = [str(derper), "-a", f"127.0.0.1:{PORTS['relay']}", "-c", str(net.workdir / "derper.key"),
            "-certmode", "manual", "-certdir", str(net.ca.certdir), "-hostname", "localhost",
            "-http-port", "-1", "-stun-port", str(PORTS["stun"])]
    proc = net.start("relay", argv)
    proc.wait_for(r"serving on", 30)
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-mb", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=300.0, help="bound of one transfer, seconds")
    args = ap.parse_args()

    tools = build_tailnet_tools(give_up, give_up)
    built = build_go(log=lambda m: print(m, file=sys.stderr))
    if built is None:
        give_up("could not build derper (see above)")
    derper = built[1]

    with tempfile.TemporaryDirectory(prefix="derpd-bench-tailnet-") as tmp:
        work = Path(tmp)
        ca = make_test_ca(work / "ca")
        size = args.size_mb * 1000 * 1000
        blob = work / "blob.bin"
        digest = make_blob(blob, size)
        nets: dict[str, Tailnet] = {}
        try:
            nets["derpd"] = Tailnet(tools, ca, work / "derpd")
            nets["derper"] = Tailnet(tools, ca, work / "derper")
            nodes = {"derpd": nets["derpd"].two_nodes(),
                     "derper": nets["derper"].two_nodes(start_relay=lambda: start_derper(nets["derper"], derper))}
            for name, net in nets.items():
                net.serve_file(blob)
                a, b = nodes[name]
                pong = a.ping(b.ip())
                print(f"through {name}: {pong.line}")
                if not pong.via.startswith("DERP("):
                    give_up(f"{name}: the nodes found a direct path ({pong.via}); the transfer would not be relayed")
            rows = []
            for r in range(args.rounds):
                order = ["derpd", "derper"] if r % 2 == 0 else ["derper", "derpd"]
                for name in order:
                    net = nets[name]
                    a, b = nodes[name]
                    relay = next(p for p in net.procs if p.name == "relay")
                    cpu0, nodes0 = cpu_seconds(relay.pid), cpu_seconds(a.proc.pid) + cpu_seconds(b.proc.pid)
                    t = a.fetch(b.ip(), PORTS["blob"], timeout=args.timeout)
                    cpu = cpu_seconds(relay.pid) - cpu0
                    nodes_cpu = cpu_seconds(a.proc.pid) + cpu_seconds(b.proc.pid) - nodes0
                    if t.nbytes != size or t.sha256 != digest:
                        give_up(f"{name}: round {r + 1} received {t.nbytes} bytes, sha256 {t.sha256[:16]}…")
                    rows.append({"round": r + 1, "relay": name, "seconds": round(t.seconds, 3),
                                 "mbit_s": round(t.mbit_s, 1), "relay_cpu_s": round(cpu, 2),
                                 "tailscaled_cpu_s": round(nodes_cpu, 2)})
                    print(f"round {r + 1} {name:6s}  {t.seconds:6.2f} s  {t.mbit_s:7.1f} Mbit/s  "
                          f"relay CPU {cpu:5.2f} s  both tailscaled CPU {nodes_cpu:5.2f} s", flush=True)
        finally:
            for net in nets.values():
                net.close()

    summary = {}
    for name in ("derpd", "derper"):
        mine = [x for x in rows if x["relay"] == name]
        summary[name] = {"mbit_s": median([x["mbit_s"] for x in mine]),
                         "relay_cpu_s": median([x["relay_cpu_s"] for x in mine])}
    print(f"\n| relay | median Mbit/s | median relay CPU s per {args.size_mb} MB |")
    print("| --- | --- | --- |")
    for name, s in summary.items():
        print(f"| {name} | {s['mbit_s']:.1f} | {s['relay_cpu_s']:.2f} |")
    ratio_tput = summary["derpd"]["mbit_s"] / summary["derper"]["mbit_s"]
    ratio_cpu = summary["derpd"]["relay_cpu_s"] / max(summary["derper"]["relay_cpu_s"], 1e-9)
    print(f"| derpd / derper | {ratio_tput:.2f} | {ratio_cpu:.2f} |")
    print(json.dumps({"rows": rows, "summary": summary, "ratio": {"mbit_s": ratio_tput, "relay_cpu_s": ratio_cpu}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
