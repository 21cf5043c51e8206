"""Maintenance drain of a real ``derpd serve`` process (127.0.0.1, port 0) registered with a
real coordinator: SIGTERM announces ``Draining`` (the coordinator changes its map at once),
the relay keeps relaying, and it exits as soon as its last client leaves or the drain grace
ends; ``derpd drain`` (SIGUSR1) drains without stopping and ``--undo`` (SIGUSR2) ends it;
without a coordinator a drain says so in one line."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import trio
import trio.testing

from derpd import client as derp_client
from derpd.coordinator.server import RunningCoordinator, serve_coordinator
from derpd.keys import NodePrivate
from tests.coordinator.conftest import TOKEN, FakeProbe, make_config

DERPD = [sys.executable, "-m", "derpd"]


class Relay:
    """``derpd serve --dev`` as a process; its stderr is kept so the test can wait for a line."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.log = b""
        self.port = 0
        self._grew = trio.Event()

    async def read(self) -> None:
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.receive_some(4096):
            self.log += chunk
            self._grew.set()
            self._grew = trio.Event()
        self._grew.set()

    async def wait_for(self, pattern: bytes, since: int = 0) -> re.Match[bytes]:
        while not (m := re.compile(pattern).search(self.log, since)):
            assert self.proc.returncode is None or self._grew.is_set(), self.log.decode()
            await self._grew.wait()
        return m


async def start_relay(nursery: trio.Nursery, *args: str) -> Relay:
    proc = await nursery.start(lambda task_status: trio.run_process(
        [*DERPD, "serve", "--dev", "-a", "127.0.0.1:0", "--stun-port", "-1", "-v", *args],
        stderr=subprocess.PIPE, check=False, task_status=task_status))
    relay = Relay(proc)
    nursery.start_soon(relay.read)
    relay.port = int((await relay.wait_for(rb"relay http://127\.0\.0\.1:(\d+)/derp")).group(1))
    return relay


async def start_coordinator(nursery: trio.Nursery, probe: FakeProbe) -> RunningCoordinator:
    return await nursery.start(lambda task_status: serve_coordinator(
        make_config(), listen="127.0.0.1:0", probe=probe, probing=False, task_status=task_status))


def region(coord: RunningCoordinator, rid: int = 901) -> dict | None:
    return coord.state.published.dmap.to_json()["Regions"].get(str(rid))


async def map_becomes(coord: RunningCoordinator, want) -> None:  # type: ignore[no-untyped-def]
    """Waits until ``want(region 901 of the published map)`` holds."""
    done = trio.Event()

    def check() -> None:
        if want(region(coord)):
            done.set()

    coord.state.listeners.append(check)
    check()
    await done.wait()
    coord.state.listeners.remove(check)


def published(r: dict | None) -> bool:
    return r is not None and not r.get("NoMeasureNoHome")


def no_home(r: dict | None) -> bool:
    return r is not None and r.get("NoMeasureNoHome") is True and [n["Name"] for n in r["Nodes"]] == ["901d"]


async def registered_relay(nursery: trio.Nursery, tmp_path: Path, coord: RunningCoordinator,
                           *args: str, also: str = "") -> Relay:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    relay = await start_relay(nursery, "--coordinator", coord.url + also, "--coordinator-token-file", str(token),
                              "--region-id", "901", "--region-code", "edge", "--node-name", "901d", *args)
    await map_becomes(coord, published)
    return relay


async def test_sigterm_drains_then_exits_when_the_last_client_leaves(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(60):
        coord = await start_coordinator(nursery, FakeProbe())
        relay = await registered_relay(nursery, tmp_path, coord, "--drain-grace", "120s")
        url = f"http://127.0.0.1:{relay.port}/derp"
        a_key, b_key = NodePrivate.generate(), NodePrivate.generate()
        async with derp_client.connect(url, a_key) as a, derp_client.connect(url, b_key) as b:
            relay.proc.send_signal(signal.SIGTERM)
            # the last healthy node of region 901: its region stays, without homes
            await map_becomes(coord, no_home)
            await relay.wait_for(rb"every coordinator took this node out of its map")
            # still relaying while clients move away
            await a.send(b_key.public, b"still here")
            frame = await b.recv()
            while getattr(frame, "data", None) != b"still here":
                frame = await b.recv()
            assert relay.proc.returncode is None
            await a.aclose()
            t0 = trio.current_time()
        assert await relay.proc.wait() == 0  # the last client left: no waiting for the 120 s grace
        took = trio.current_time() - t0
    assert took < 60
    assert re.search(rb"drain: done after [\d.]+ s: no client connected for 5 s", relay.log), relay.log.decode()
    assert 'derpd_coordinator_registrations_total{result="draining"} 1.0' in \
        __import__("prometheus_client").generate_latest(coord.state.metrics.registry).decode()


async def test_drain_grace_ends_with_clients_still_connected(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(60):
        coord = await start_coordinator(nursery, FakeProbe())
        relay = await registered_relay(nursery, tmp_path, coord, "--drain-grace", "1s")
        async with derp_client.connect(f"http://127.0.0.1:{relay.port}/derp", NodePrivate.generate()):
            relay.proc.send_signal(signal.SIGTERM)
            assert await relay.proc.wait() == 0
    assert re.search(rb"drain: 1 client connection\(s\) still here after 1\.\d s", relay.log), relay.log.decode()
    assert no_home(region(coord))


async def test_drain_grace_zero_stops_at_once_without_announcing(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(60):
        coord = await start_coordinator(nursery, FakeProbe())
        relay = await registered_relay(nursery, tmp_path, coord, "--drain-grace", "0")
        async with derp_client.connect(f"http://127.0.0.1:{relay.port}/derp", NodePrivate.generate()):
            relay.proc.send_signal(signal.SIGTERM)
            assert await relay.proc.wait() == 0
    assert published(region(coord))  # today's behaviour: nothing announced
    assert b"drain:" not in relay.log and b"--drain-grace" not in relay.log


async def test_derpd_drain_and_undo_keep_the_relay_running(nursery: trio.Nursery, tmp_path: Path) -> None:
    probe = FakeProbe()
    with trio.fail_after(60):
        coord = await start_coordinator(nursery, probe)
        relay = await registered_relay(nursery, tmp_path, coord, "--drain-grace", "30s")
        pid_file = tmp_path / "derpd.pid"
        pid_file.write_text(f"{relay.proc.pid}\n")
        out = await trio.run_process([*DERPD, "drain", str(pid_file)], capture_stdout=True, capture_stderr=True)
        assert out.stdout.decode().startswith(f"asked derpd (pid {relay.proc.pid}) to drain")
        await map_becomes(coord, no_home)
        await relay.wait_for(rb"drain: done after")
        await relay.wait_for(rb"drain: done \(0 clients left\); stop the relay now")
        # still serving: a client logs in and pings
        async with derp_client.connect(f"http://127.0.0.1:{relay.port}/derp", NodePrivate.generate()) as c:
            await c.ping()
        mark = len(relay.log)
        out = await trio.run_process([*DERPD, "drain", "--undo", str(relay.proc.pid)], capture_stdout=True)
        assert b"to end its drain" in out.stdout
        await relay.wait_for(rb"drain ended", mark)
        # back: the coordinator wants two good probe rounds before it is a home again
        await map_becomes(coord, lambda r: coord.state.entries["901d"].status == "down"
                          and not coord.state.entries["901d"].draining)
        await coord.prober.run_round()
        await coord.prober.run_round()
        await map_becomes(coord, published)
        relay.proc.send_signal(signal.SIGTERM)  # a drain that ended: this stop drains again
        await map_becomes(coord, no_home)
        assert await relay.proc.wait() == 0


async def test_drain_without_a_coordinator_says_so_in_one_line(nursery: trio.Nursery) -> None:
    with trio.fail_after(60):
        relay = await start_relay(nursery, "--drain-grace", "30s")
        async with derp_client.connect(f"http://127.0.0.1:{relay.port}/derp", NodePrivate.generate()) as c:
            relay.proc.send_signal(signal.SIGUSR1)
            line = (await relay.wait_for(rb"[^\n]*registers with no coordinator[^\n]*\n")).group(0)
            assert b"no map moves its clients away" in line and b"Traceback" not in relay.log
            await c.ping()  # still relaying
        await relay.wait_for(rb"drain: done after")
        t0 = trio.current_time()
        relay.proc.send_signal(signal.SIGTERM)
        assert await relay.proc.wait() == 0
    assert trio.current_time() - t0 < 30  # drained already: it stops without another grace


async def test_sigterm_without_a_coordinator_stops_at_once(nursery: trio.Nursery) -> None:
    with trio.fail_after(60):
        relay = await start_relay(nursery)  # --drain-grace 30s by default
        async with derp_client.connect(f"http://127.0.0.1:{relay.port}/derp", NodePrivate.generate()):
            t0 = trio.current_time()
            relay.proc.send_signal(signal.SIGTERM)
            assert await relay.proc.wait() == 0
    assert trio.current_time() - t0 < 25  # --shutdown-grace 5s at most, never the drain grace
    assert b"registers with no coordinator" not in relay.log


async def test_workers_parent_announces_the_drain(nursery: trio.Nursery, tmp_path: Path) -> None:
    """With --workers the parent registers: it announces the drain; each worker waits for its
    clients; the service exits once they are gone."""
    with trio.fail_after(90):
        coord = await start_coordinator(nursery, FakeProbe())
        relay = await registered_relay(nursery, tmp_path, coord, "--workers", "2", "--drain-grace", "120s")
        await relay.wait_for(rb"2 workers on port")
        async with derp_client.connect(f"http://127.0.0.1:{relay.port}/derp", NodePrivate.generate()) as c:
            relay.proc.send_signal(signal.SIGTERM)
            await map_becomes(coord, no_home)
            await c.ping()  # still relaying
        assert await relay.proc.wait() == 0  # its only client left: long before the 120 s grace
    assert b"Traceback" not in relay.log


async def test_a_coordinator_that_does_not_take_the_drain_is_named(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(60):
        coord = await start_coordinator(nursery, FakeProbe())
        dead = "http://127.0.0.1:1"  # nothing listens there
        relay = await registered_relay(nursery, tmp_path, coord, "--drain-grace", "30s", also="," + dead)
        relay.proc.send_signal(signal.SIGTERM)
        await map_becomes(coord, no_home)  # the live one took it
        assert await relay.proc.wait() == 0  # no client: it stops without waiting for the grace
    lines = [line for line in relay.log.decode().splitlines() if "did not take the drain" in line]
    assert len(lines) == 1 and dead in lines[0], relay.log.decode()
    assert "Traceback" not in relay.log.decode()


async def _drain_in_process(nursery: trio.Nursery, health_after: float):  # noqa: ANN202
    """An in-process relay whose signals go through ``Maintenance`` (``health_after`` as given);
    returns (the running relay, the channel to send it signals on)."""
    from derpd.drain import Maintenance
    from tests.derpd.conftest import start_relay as start_in_process

    running = await start_in_process(nursery)
    maintenance = Maintenance(running, replace(running.server.settings, drain_grace=3600.0), nursery.cancel_scope,
                              registered=True, health_after=health_after)
    send, receive = trio.open_memory_channel[int](1)
    nursery.start_soon(maintenance.handle, receive)
    return running, send


async def test_the_drain_tells_clients_only_after_health_after(nursery: trio.Nursery) -> None:
    """A Health frame is a frame from the region, and any frame keeps a Tailscale client's home
    without a measured latency for 8 s: the text waits, so idle clients are free to move."""
    from derpd.protocol.messages import Health

    with trio.fail_after(20):
        running, send = await _drain_in_process(nursery, health_after=3600.0)
        async with derp_client.connect(running.derp_url, NodePrivate.generate()) as c:
            await send.send(signal.SIGUSR1)
            while not running.server.draining:
                await trio.sleep(0.01)
            await c.ping()  # what the relay queued for c before the Pong has arrived
            await trio.testing.wait_all_tasks_blocked()
            assert "draining" not in running.server.health.relay
            assert not [e for e in [c._events.receive_nowait() for _ in
                                    range(c._events.statistics().current_buffer_used)] if isinstance(e, Health)]

        running, send = await _drain_in_process(nursery, health_after=0.0)
        async with derp_client.connect(running.derp_url, NodePrivate.generate()) as c:
            await send.send(signal.SIGUSR1)
            while not isinstance(ev := await c.recv(), Health):
                pass
            assert "drained for maintenance" in ev.problem
