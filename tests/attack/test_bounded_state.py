"""State bounded by live connections, not by history: thousands of short-lived keys pass by
long-lived senders, and the relay's PeerGone bookkeeping and RSS come back down."""

from __future__ import annotations

import trio

from derpd import client as derp_client
from derpd.keys import NodePrivate, NodePublic

from .test_attacks import FD_SLACK, honest_pair_relays, logged_in_raw

SENDERS = 64
ROUNDS = 10
KEYS_PER_ROUND = 500
# Growth allowed from the end of round 2 to the end of the last round.  With the state kept per
# sender (every key it ever sent to), 64 senders x 4,000 more keys add ~30 MiB here.
PLATEAU_KIB = 8 * 1024


async def test_churning_keys_past_long_lived_senders(relay_proc):
    before = relay_proc.usage()
    m0 = await relay_proc.metrics()
    rss = []
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            senders: list[derp_client.DerpClient] = []
            ready = trio.Event()

            async def hold_sender() -> None:
                async with derp_client.connect(relay_proc.derp_url, NodePrivate.generate()) as c:
                    senders.append(c)
                    if len(senders) == SENDERS:
                        ready.set()
                    await trio.sleep_forever()

            for _ in range(SENDERS):
                nursery.start_soon(hold_sender)
            await ready.wait()
            baseline = relay_proc.usage()
            for _ in range(ROUNDS):
                receivers: list[tuple[trio.SocketStream, NodePublic]] = []
                sem = trio.Semaphore(100)

                async def receiver() -> None:
                    async with sem:
                        key = NodePrivate.generate()
                        s = await logged_in_raw(relay_proc.port, key)
                        await s.receive_some(4096)  # ServerInfo: registered
                        receivers.append((s, key.public))

                async with trio.open_nursery() as n:
                    for _ in range(KEYS_PER_ROUND):
                        n.start_soon(receiver)
                batch = [(k, b"x") for _, k in receivers]
                async with trio.open_nursery() as n:
                    for c in senders:
                        n.start_soon(c.send_many, batch)
                for c in senders:  # a Pong after the packets: the relay has routed them all
                    await c.ping(timeout=30)
                for s, _ in receivers:
                    await trio.aclose_forcefully(s)
                await relay_proc.wait_fds_at_most(baseline.fds + FD_SLACK)
                rss.append(relay_proc.usage().rss_kib)
            m = await relay_proc.metrics()
            nursery.cancel_scope.cancel()
    await relay_proc.wait_fds_at_most(before.fds + FD_SLACK)
    await honest_pair_relays(relay_proc.derp_url)
    after = relay_proc.usage()
    print(f"\n[attack] {ROUNDS * KEYS_PER_ROUND} keys churned past {SENDERS} senders: before {before}; "
          f"with the senders {baseline}; RSS after each round (MiB) "
          f"{[round(r / 1024, 1) for r in rss]}; after {after}")
    sent = m["derp_packets_received_total"] - m0.get("derp_packets_received_total", 0)
    assert sent >= SENDERS * ROUNDS * KEYS_PER_ROUND
    # Nothing remembers a receiver that left: the bookkeeping is empty again...
    assert m["derp_peer_gone_senders"] == 0
    # ...and the relay's memory levels off instead of growing with every round.
    assert rss[-1] - rss[1] < PLATEAU_KIB, rss
