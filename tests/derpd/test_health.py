"""Health frames (0x14), /debug/clients and derp_queue_delay_seconds, on a real relay.

Every relay test here runs on the compiled data plane when it is built, and on the Python
reader and writer with DERPD_PURE=1; the Health model's timing is tested with trio's MockClock.
"""

from __future__ import annotations

import json
import math

import pytest
import trio
import trio.testing

from derpd import client as derp_client
from derpd.admission import VerifyClientURL, VerifyUnreachable
from derpd.keys import NodePrivate
from derpd.protocol.frames import FrameType
from derpd.protocol.handshake import ClientHandshake
from derpd.protocol.messages import ClientInfo, Health, RecvPacket, Restarting
from derpd.ratelimit import RateConfig
from derpd.relay import health as health_mod
from derpd.relay.health import HOLD, HealthBoard
from derpd.relay.server import RelayServer
from derpd.settings import RelaySettings

from .conftest import http, start_relay
from .test_relay import drive_login, raw_login


class _Conn:
    def __init__(self, health=None) -> None:
        self.health = health
        self.closing = False


def _text(frame: bytes) -> str:
    assert frame[0] == FrameType.HEALTH and int.from_bytes(frame[1:5], "big") == len(frame) - 5
    return frame[5:].decode()


async def next_health(c: derp_client.DerpClient) -> str:
    """The next Health frame's text, skipping everything else."""
    while True:
        ev = await c.recv()
        if isinstance(ev, Health):
            return ev.problem


def fast_health(relay, hold: float = 0.3) -> None:
    relay.server.health.hold = hold


# ----------------------------------------------------------------------------- the model


def test_first_problem_at_once_then_one_change_per_hold():
    board = HealthBoard()
    c = _Conn()
    board.set_client(c, "cloned_key", "cloned")
    assert _text(board.due(c, 100.0)) == "cloned"
    board.set_client(c, "cloned_key", None)
    assert board.due(c, 100.0 + HOLD - 0.1) is None  # too soon after the last change
    board.set_client(c, "cloned_key", "cloned")  # back again: nothing changed for the client
    assert board.due(c, 100.0 + HOLD) is None
    board.set_client(c, "cloned_key", None)
    assert _text(board.due(c, 100.0 + HOLD)) == ""  # a change, HOLD after the last
    assert c not in board.watch  # nothing left to say: forgotten


def test_flapping_condition_changes_at_most_once_per_hold():
    board = HealthBoard()
    c = _Conn()
    changes = []
    for step in range(600):  # 60 s, a condition that flips every 0.3 s
        now = step * 0.1
        board.set_client(c, "rate_limited", "slow" if (step // 3) % 2 == 0 else None)
        for conn, frame in board.tick(now):
            changes.append(now)
    assert changes and all(b - a >= HOLD for a, b in zip(changes, changes[1:]))
    assert len(changes) <= 60 / HOLD + 1


def test_relay_problem_first_and_expiring_client_problem():
    board = HealthBoard()
    c = _Conn()
    board.set_client(c, "rate_limited", "rate", until=5.0)
    board.set_relay("restarting", "restarting", [c])
    assert _text(board.due(c, 1.0)) == "restarting; rate"
    assert board.text_for(c.health, 5.0) == "restarting"  # the rate problem expired
    board.set_relay("restarting", None, [c])
    assert _text(board.due(c, 1.0 + HOLD)) == ""


def test_mesh_peers_and_probers_get_nothing():
    board = HealthBoard()
    c = _Conn(health=False)
    board.set_client(c, "cloned_key", "cloned")
    board.set_relay("operator", "maintenance", [c])
    board.joined(c)
    assert c.health is False and c not in board.watch and board.tick(0.0) == []


def test_drop_share_raises_and_clears():
    board = HealthBoard()
    c = _Conn()
    board.note_drops(c, 400, 600, 0.0)  # 40% of this window
    assert "40%" in _text(board.due(c, 0.0))
    board.note_drops(c, 401, 2600, 10.0)  # one more drop in 2001 packets: over
    assert _text(board.due(c, 10.0)) == ""
    board.note_drops(c, 420, 5000, 20.0)  # 19 drops: under DROP_MIN
    assert not c.health.dropping


def test_health_text_is_bounded():
    board = HealthBoard()
    c = _Conn()
    board.set_client(c, "operator", "x" * 5000)
    frame = board.due(c, 0.0)
    assert len(frame) - 5 <= health_mod.MAX_TEXT


async def test_ten_second_hysteresis_on_the_relay_clock(autojump_clock):
    """run_health with trio's clock: a problem goes out within a tick, its end no sooner than
    10 s after it."""
    server = RelayServer(RelaySettings(addr="127.0.0.1:0"))
    key = NodePrivate.generate()
    client_side, server_side = trio.testing.memory_stream_pair()
    frames: list[tuple[float, str]] = []
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.run_health)
            nursery.start_soon(server.serve_derp, server_side, ("192.0.2.1", 1234), b"")
            hs = ClientHandshake(key, ClientInfo())
            await drive_login(client_side, hs)
            start = trio.current_time()
            two = trio.Event()

            async def read() -> None:
                while len(frames) < 2:
                    hs.decoder.receive_data(await client_side.receive_some(4096))
                    for ftype, payload in hs.decoder.frames():
                        if ftype == FrameType.HEALTH:
                            frames.append((trio.current_time() - start, payload.decode()))
                two.set()

            nursery.start_soon(read)
            server.set_relay_problem("maintenance at noon")
            await trio.sleep(1.5)
            server.set_relay_problem(None)
            await two.wait()
            nursery.cancel_scope.cancel()
    (t_set, text), (t_clear, cleared) = frames
    assert text == "maintenance at noon" and cleared == ""
    assert t_set <= 1.0 and HOLD <= t_clear - t_set <= HOLD + 1.0


# ----------------------------------------------------------------------------- on a real relay


async def test_cloned_key_tells_both_and_clears_when_one_leaves(nursery):
    relay = await start_relay(nursery)
    fast_health(relay)
    key, peer = NodePrivate.generate(), NodePrivate.generate()
    with trio.fail_after(20):
        async with derp_client.connect(relay.derp_url, peer) as cp:
            async with derp_client.connect(relay.derp_url, key) as first:
                async with derp_client.connect(relay.derp_url, key) as second:
                    # a reconnect whose old connection is dead says nothing; an older one that
                    # still sends is a second device with the same key
                    await second.send(peer.public, b"from the newer one")
                    await first.send(peer.public, b"from the older one")
                    t1, t2 = await next_health(first), await next_health(second)
                    assert t1 == t2 and "node key" in t1 and "logout" in t1
                    assert str(key.public) not in t1  # names no client
                    assert "node key" in relay.server.registry.active[key.public.raw].health.sent
                assert await next_health(first) == ""


async def test_relay_problem_reaches_clients_but_not_probers_or_mesh_peers(nursery):
    relay = await start_relay(nursery, mesh_key=bytes(range(32)))
    fast_health(relay)
    with trio.fail_after(20):
        async with (
            derp_client.connect(relay.derp_url) as regular,
            derp_client.connect(relay.url.replace("http://", "ws://") + "/derp") as websocket,
            derp_client.connect(relay.derp_url, is_prober=True) as prober,
            derp_client.connect(relay.derp_url, mesh_key=bytes(range(32))) as mesh,
        ):
            relay.server.set_relay_problem("upgrading at 14:00 UTC")
            assert await next_health(regular) == "upgrading at 14:00 UTC"
            assert await next_health(websocket) == "upgrading at 14:00 UTC"
            relay.server.set_relay_problem(None)
            assert await next_health(regular) == ""
            assert await next_health(websocket) == ""
            await prober.ping()  # a round trip after the two ticks: no Health before the Pong
            await mesh.ping()
            for c in (prober, mesh):
                while True:
                    with trio.move_on_after(0.05) as idle:
                        ev = await c.recv()
                    if idle.cancelled_caught:
                        break
                    assert not isinstance(ev, Health)


async def test_a_maintenance_drain_tells_clients_and_its_end_clears_it(nursery):
    """derpd.drain's SIGUSR1/SIGTERM drain (server.set_draining): every regular client is told
    that its device moves to another relay, derp_draining is 1, and the end of the drain clears
    both."""
    relay = await start_relay(nursery)
    fast_health(relay)
    with trio.fail_after(20):
        async with derp_client.connect(relay.derp_url) as client:
            relay.server.set_draining(True)
            text = await next_health(client)
            assert "drained for maintenance" in text and "another relay" in text
            assert relay.server.draining
            relay.server.set_draining(False)
            assert await next_health(client) == ""
            assert not relay.server.draining


async def test_rate_limited_client_is_told_the_limit(nursery):
    relay = await start_relay(nursery)
    fast_health(relay)
    relay.server.client_rate_limits.set(RateConfig(200_000, 100_000))
    a, b = NodePrivate.generate(), NodePrivate.generate()
    with trio.fail_after(30):
        async with derp_client.connect(relay.derp_url, a) as ca, derp_client.connect(relay.derp_url, b) as cb:
            async with trio.open_nursery() as n:
                n.start_soon(_drain, cb)
                await ca.send_many([(b.public, bytes(1000))] * 400)  # 400 kB at 200 kB/s
                text = await next_health(ca)
                assert "200 kB/s" in text and "--rate-config" in text
                assert await next_health(ca) == ""  # it stopped sending: over after the hold
                n.cancel_scope.cancel()


async def _drain(c: derp_client.DerpClient) -> None:
    while True:
        await c.recv()


async def test_drain_sends_restarting_health_before_the_restarting_frame(nursery):
    relay = await start_relay(nursery)
    with trio.fail_after(20):
        async with derp_client.connect(relay.derp_url) as c:
            relay.shutdown(grace=1.0)
            ev = await c.recv()
            while not isinstance(ev, Health | Restarting):
                ev = await c.recv()
            assert isinstance(ev, Health) and "restarting" in ev.problem
            assert isinstance(await c.recv(), Restarting)


async def test_admission_failing_open_is_reported_and_cleared(nursery):
    relay = await start_relay(nursery)
    fast_health(relay)
    up = False

    async def query(key, ip):
        if not up:
            raise VerifyUnreachable("connection refused")
        return True, ""

    verify = VerifyClientURL("http://controller.invalid/verify", query=query, cache_ttl=0)
    verify.on_fail_open = relay.server.note_admission_fail_open
    relay.server.admission_checks.append(verify.check)
    with trio.fail_after(20):
        async with derp_client.connect(relay.derp_url) as c:
            text = await next_health(c)
            assert "admission check" in text and "--verify-client-url" in text
            up = True
            async with derp_client.connect(relay.derp_url):
                assert await next_health(c) == ""


async def test_receiver_losing_most_packets_is_told(nursery, monkeypatch):
    monkeypatch.setattr(health_mod, "DROP_WINDOW", 0.5)
    relay = await start_relay(nursery, write_timeout=0)
    fast_health(relay)
    sender, stuck = NodePrivate.generate(), NodePrivate.generate()
    with trio.fail_after(30):
        stream = await raw_login(relay, stuck)  # reads nothing for now
        conn = relay.server.registry.active[stuck.public.raw]
        async with derp_client.connect(relay.derp_url, sender) as cs:
            while not (conn.health and "dropped" in conn.health.sent):
                await cs.send_many([(stuck.public, bytes(1200))] * 100)
                await trio.sleep(0.05)
            # it is queued for the client: read until it arrives
            got = b""
            while b"of the packets for this device" not in got:
                got += await stream.receive_some(1 << 20)
        await stream.aclose()


# ----------------------------------------------------------------------------- /debug/clients


async def _debug_clients(relay, query: str = "") -> dict:
    raw = await http(relay, f"GET /debug/clients{query} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200"), head
    return json.loads(body)


async def test_debug_clients_rows_sorted_by_drops_with_tcp_info(nursery):
    relay = await start_relay(nursery, write_timeout=0)
    a, b, stuck = NodePrivate.generate(), NodePrivate.generate(), NodePrivate.generate()
    with trio.fail_after(30):
        stream = await raw_login(relay, stuck)
        async with derp_client.connect(relay.derp_url, a) as ca, derp_client.connect(relay.derp_url, b) as cb:
            await ca.send(b.public, b"hello")
            assert (await cb.recv()) == RecvPacket(a.public, b"hello")
            for _ in range(100):  # 12 MB: far beyond what the kernel buffers
                await ca.send_many([(stuck.public, bytes(1200))] * 100)
            await ca.ping()
            report = await _debug_clients(relay)
            assert report["clients"] == 3 and report["shown"] == 3
            worst = report["rows"][0]
            assert worst["key"] == str(stuck.public) and worst["drops"]["queue_full"] > 0
            assert worst["queue"]["packets"] > 0
            rows = {r["key"]: r for r in report["rows"]}
            ra, rb = rows[str(a.public)], rows[str(b.public)]
            assert ra["packets_in"] == 10001 and ra["bytes_in"] == 5 + 10000 * 1200
            assert rb["packets_out"] == 1 and rb["bytes_out"] == 5
            want_path = "dataplane" if relay.server.dataplane.engine is not None else "python"
            assert ra["path"] == want_path
            assert ra["tcp"]["rtt_ms"] >= 0 and ra["tcp"]["snd_cwnd"] > 0 and "total_retrans" in ra["tcp"]
            one = await _debug_clients(relay, f"?key={b.public}")
            assert [r["key"] for r in one["rows"]] == [str(b.public)]
            assert (await _debug_clients(relay, "?limit=1"))["shown"] == 1
        await stream.aclose()


async def test_debug_clients_for_loopback_only_and_never_through_a_proxy(relay):
    assert (await _debug_clients(relay))["clients"] == 0
    raw = await http(relay, b"GET /debug/clients HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.2.3.4\r\n"
                            b"Connection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 403")


async def test_queue_delay_histogram_counts_sampled_packets(nursery):
    relay = await start_relay(nursery)
    a, b = NodePrivate.generate(), NodePrivate.generate()
    with trio.fail_after(30):
        async with derp_client.connect(relay.derp_url, a) as ca, derp_client.connect(relay.derp_url, b) as cb:
            got = 0
            for i in range(1, 11):
                await ca.send_many([(b.public, bytes(100))] * 64)
                while got < 64 * i:
                    got += isinstance(await cb.recv(), RecvPacket)
    text = relay.server.metrics_text().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("derp_queue_delay_seconds"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    count = samples["derp_queue_delay_seconds_count"]
    assert 640 / 64 - 2 <= count <= 640 / 64 + 2  # one in 64 (the counter is per receiver or per engine)
    assert samples['derp_queue_delay_seconds_bucket{le="+Inf"}'] == count
    assert 0 <= samples["derp_queue_delay_seconds_sum"] < count * 5


def test_dataplane_buckets_match():
    from derpd.accel import dataplane
    from derpd.relay.diagnostics import QD_BUCKETS

    if dataplane is None:
        pytest.skip("the compiled data plane is not built (DERPD_PURE=1 or no compiler)")
    callbacks = {name: (lambda *a: None) for name in dataplane.CONTRACT["callbacks"]}
    engine = dataplane.Engine({}, **callbacks, disco_magic=b"x", disco_min_len=1, send_limit=1000, depth=4,
                              recv_size=1024)
    bounds, counts, total = engine.queue_delay()
    assert tuple(bounds) == QD_BUCKETS and len(counts) == len(QD_BUCKETS) + 1 and total == 0.0
    assert not math.isnan(total)

