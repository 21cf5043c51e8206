"""Soak: N clients relay steadily through one relay process for M minutes.

Run with ``make soak`` (not part of ``make test``).  Pairs of clients send each other numbered
packets at a steady rate; every packet is accounted for as delivered, or as dropped in the
relay's ``derp_packets_dropped_total`` metrics.  Prints the relay's RSS and descriptors each
minute and fails if anything is lost without being counted, or if RSS or descriptors grow
after the warm-up minute.

    python tests/soak/soak_relay.py --clients 1000 --minutes 10 --rate 2
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from attack.relay_process import raise_open_files_limit, start_relay_process  # noqa: E402

from derpd import client as derp_client  # noqa: E402
from derpd.keys import NodePrivate  # noqa: E402
from derpd.protocol.messages import RecvPacket  # noqa: E402

RSS_GROWTH_LIMIT_KIB = 16 * 1024
FD_GROWTH_LIMIT = 2


async def soak(clients: int, minutes: float, rate: float, size: int) -> int:
    raise_open_files_limit(4 * clients + 1000)
    sent = 0
    received = 0
    out_of_order = 0
    async with trio.open_nursery() as nursery:
        relay = await start_relay_process(nursery)
        print(f"relay pid {relay.pid} at {relay.derp_url}; start: {relay.usage()}", flush=True)
        keys = [NodePrivate.generate() for _ in range(clients)]
        stack = contextlib.AsyncExitStack()
        conns = []
        for k in keys:  # one at a time: each login holds a cancel scope of its own
            c = await stack.enter_async_context(derp_client.connect(relay.derp_url, k, timeout=60))
            conns.append((c, None, k))
        by_key = {k.public: c for c, _, k in conns}
        peers = {}
        order = [k for _, _, k in conns]
        for i in range(0, len(order) - 1, 2):
            peers[order[i].public], peers[order[i + 1].public] = order[i + 1].public, order[i].public
        print(f"{len(conns)} clients logged in: {relay.usage()}", flush=True)
        end = trio.current_time() + minutes * 60
        last_seen: dict[tuple, int] = {}

        async def sender(key) -> None:
            nonlocal sent
            c = by_key[key]
            dst = peers[key]
            seq = 0
            period = 1.0 / rate
            next_at = trio.current_time() + period * (hash(key) % 1000) / 1000
            while trio.current_time() < end:
                await trio.sleep_until(next_at)
                next_at += period
                await c.send(dst, seq.to_bytes(8, "big") + bytes(size - 8))
                seq += 1
                sent += 1

        async def receiver(key) -> None:
            nonlocal received, out_of_order
            c = by_key[key]
            async for ev in c:
                if isinstance(ev, RecvPacket):
                    received += 1
                    seq = int.from_bytes(ev.data[:8], "big")
                    prev = last_seen.get((ev.src, key), -1)
                    if seq <= prev:
                        out_of_order += 1
                    last_seen[(ev.src, key)] = seq

        baseline = None
        async with trio.open_nursery() as run:
            for key in peers:
                run.start_soon(sender, key)
                run.start_soon(receiver, key)
            minute = 0
            while trio.current_time() < end:
                await trio.sleep(min(60, end - trio.current_time()))
                minute += 1
                u = relay.usage()
                if minute == 1:
                    baseline = u
                print(f"minute {minute}: sent {sent}, received {received}, relay {u}", flush=True)
            await trio.sleep(2)  # let the last packets land
            run.cancel_scope.cancel()
        final = relay.usage()
        m = await relay.metrics()
        dropped = sum(v for k, v in m.items() if k.startswith("derp_packets_dropped_total"))
        relay_recv = m.get("derp_packets_received_total", 0)
        relay_sent = m.get("derp_packets_sent_total", 0)
        await stack.aclose()
        nursery.cancel_scope.cancel()
    unaccounted = sent - received - dropped
    print(f"clients {clients}, minutes {minutes}, rate {rate}/s each, size {size} B")
    print(f"sent {sent}, received {received}, dropped (metrics) {int(dropped)}, unaccounted {int(unaccounted)}, "
          f"reordered {out_of_order}; relay counted received {int(relay_recv)}, sent {int(relay_sent)}")
    print(f"relay after warm-up minute: {baseline}; at the end: {final}")
    ok = unaccounted == 0 and out_of_order == 0
    if baseline is not None:
        ok = ok and final.rss_kib - baseline.rss_kib <= RSS_GROWTH_LIMIT_KIB and final.fds - baseline.fds <= FD_GROWTH_LIMIT
    print("SOAK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=2.0, help="packets per second per client")
    p.add_argument("--size", type=int, default=200)
    a = p.parse_args()
    sys.exit(trio.run(soak, a.clients, a.minutes, a.rate, a.size))


if __name__ == "__main__":
    main()
