"""What the coordinator's prober reports for an idle relay on loopback.

Starts a TLS relay (self-signed certificate for 127.0.0.1, pinned) and a STUN server on
127.0.0.1, probes the node N times with the coordinator's real prober and prints the
median and p90 latency per probe kind, in milliseconds::

    .venv/bin/python bench/coordinator_probe.py --rounds 20

Compare with ``derpd check`` or a client's netcheck against the same relay: the figures
should be the relay's round trip plus one TLS handshake, not the prober's own overhead.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import trio

from derpd.coordinator.model import DerpNode
from derpd.coordinator.prober import NodeProber
from derpd.coordinator.state import ProbeTarget
from derpd.keys import NodePrivate
from derpd.relay.listener import serve_relay
from derpd.settings import RelaySettings
from stund.server import serve_stun


async def main(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as certdir:
        async with trio.open_nursery() as nursery:
            relay = await nursery.start(lambda task_status: serve_relay(RelaySettings(
                addr="127.0.0.1:0", private_key=NodePrivate.generate(), certmode="manual",
                certdir=Path(certdir), hostname="127.0.0.1"), task_status=task_status))
            stun = await nursery.start(serve_stun, [("127.0.0.1", 0)])
            node = DerpNode("900a", 900, "127.0.0.1", cert_name=relay.cert_pin, ipv4="127.0.0.1",
                            derp_port=relay.port, stun_port=stun[0][1])
            target = ProbeTarget(node, "127.0.0.1", "127.0.0.1", str(relay.public_key))
            prober = NodeProber(timeout=5.0)
            samples: dict[str, list[float]] = {}
            await prober(target)  # warm-up: imports, first handshake
            for _ in range(rounds):
                result = await prober(target)
                assert result.ok, result.failed
                for kind, secs in result.latency.items():
                    samples.setdefault(kind, []).append(secs * 1000)
            for kind in sorted(samples):
                values = sorted(samples[kind])
                p90 = values[min(len(values) - 1, int(len(values) * 0.9))]
                print(f"{kind:6s} median {statistics.median(values):7.2f} ms   p90 {p90:7.2f} ms   "
                      f"(n={len(values)})")
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    trio.run(main, parser.parse_args().rounds)
