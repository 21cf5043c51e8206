"""The state file: a restarted coordinator serves its last map at once, keeps restored nodes for
node_ttl, never shrinks the map under heartbeating relays, and survives a bad state file."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from derpd.coordinator.announce import Announcer
from derpd.coordinator.persist import STATE_FILE
from derpd.coordinator.server import RunningCoordinator, serve_coordinator
from derpd.keys import NodePrivate

from .conftest import TOKEN, FakeProbe, http, make_config, node_names, register


def relay_entry(name: str, region: int) -> dict[str, Any]:
    return {"Name": name, "RegionID": region, "RegionCode": f"r{region}", "HostName": "localhost",
            "IPv4": "127.0.0.1", "DERPPort": region, "PublicKey": str(NodePrivate.generate().public)}


async def start(nursery: trio.Nursery, state_dir: Path, probe: FakeProbe, listen: str = "127.0.0.1:0",
                **overrides: Any) -> tuple[trio.CancelScope, RunningCoordinator]:
    scope = trio.CancelScope()
    config = make_config(**overrides)

    async def run(task_status: trio.TaskStatus[RunningCoordinator] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await serve_coordinator(config, listen=listen, probe=probe, probing=False, state_dir=state_dir,
                                    task_status=task_status)

    running: RunningCoordinator = await nursery.start(run)
    return scope, running


async def test_restart_serves_the_last_map_at_once(nursery: trio.Nursery, tmp_path: Path) -> None:
    probe = FakeProbe()
    with trio.fail_after(20):
        scope, coord = await start(nursery, tmp_path, probe)
        a, b = relay_entry("910a", 910), relay_entry("911a", 911)
        assert (await register(coord.url, a)).status == 200
        assert (await register(coord.url, b)).status == 200
        probe.down["900b"] = "refused"
        await coord.prober.run_round()
        await coord.prober.run_round()
        before = await http(coord.url + "/derpmap/default")
        assert node_names(json.loads(before.body)) == ["900a", "910a", "911a"]
        scope.cancel()

        scope, coord = await start(nursery, tmp_path, FakeProbe())
        after = await http(coord.url + "/derpmap/default")
        # the same bytes and ETag before any heartbeat or probe: 900b stays down until probed
        assert after.body == before.body and after.headers["etag"] == before.headers["etag"]
        entry = coord.state.entries["910a"]
        assert entry.status == "unknown" and entry.restored and entry.public_key == a["PublicKey"]
        t0 = coord.state.entries["911a"].last_seen  # restored nodes count from the start
        assert t0 <= trio.current_time()
        assert coord.state.expire(t0 + 29) == []  # node_ttl is 30 s
        # the first heartbeat after the restart is welcome (no 429), another key is not (409)
        assert (await register(coord.url, a)).status == 200
        hijack = await register(coord.url, {**b, "PublicKey": str(NodePrivate.generate().public)})
        assert hijack.status == 409 and json.loads(hijack.body)["field"] == "PublicKey"
        assert coord.state.entries["910a"].restored is False
        assert "911a" in coord.state.expire(t0 + 31)
        scope.cancel()


async def test_restart_under_heartbeating_relays_never_shrinks_the_map(nursery: trio.Nursery,
                                                                       tmp_path: Path) -> None:
    probe = FakeProbe()
    with trio.fail_after(40):
        scope, coord = await start(nursery, tmp_path, probe, min_heartbeat_interval=0.1, node_ttl=3.0)
        listen = f"127.0.0.1:{coord.port}"
        relays = [relay_entry(f"92{i}a", 920 + i) for i in range(3)]
        for entry in relays:
            nursery.start_soon(Announcer([coord.url], TOKEN, lambda e=entry: e, interval=0.3).run)
        seen: list[set[str]] = []
        fetch_errors = 0

        async def watch() -> None:
            nonlocal fetch_errors
            while True:
                try:
                    doc = json.loads((await http(coord.url + "/derpmap/default")).body)
                    seen.append(set(doc["Regions"]))
                except Exception:
                    fetch_errors += 1  # the coordinator is between its two lives
                await trio.sleep(0.02)  # pace the sampling; nothing waits on this

        want = {"900", "920", "921", "922"}
        heartbeats = trio.Event()

        def on_change() -> None:
            if set(json.loads(coord.state.published.json)["Regions"]) == want:
                heartbeats.set()

        coord.state.listeners.append(on_change)
        on_change()
        await heartbeats.wait()
        nursery.start_soon(watch)
        for _ in range(2):  # restart twice, heartbeats going on all the while
            scope.cancel()
            scope, coord = await start(nursery, tmp_path, probe, listen=listen, min_heartbeat_interval=0.1,
                                       node_ttl=3.0)
            assert set(json.loads(coord.state.published.json)["Regions"]) == want
            refreshed = trio.Event()
            state = coord.state
            real = state.register

            def spy(reg: Any, now: float, *args: Any, real: Any = real, state: Any = state,
                    refreshed: trio.Event = refreshed) -> bool:
                changed = real(reg, now, *args)
                if not any(e.restored for e in state.entries.values() if e.source == "registered"):
                    refreshed.set()
                return changed

            state.register = spy  # type: ignore[method-assign]
            await refreshed.wait()  # every relay has heartbeated into the new life
        scope.cancel()
    assert len(seen) >= 5
    for earlier, later in zip(seen, seen[1:]):
        assert earlier <= later, f"the map lost regions: {earlier} -> {later}"
    assert seen[-1] == want


async def test_corrupt_state_file_is_set_aside(nursery: trio.Nursery, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / STATE_FILE).write_text('{"version": 1, "nodes": [')
    caplog.set_level(logging.ERROR, "derpd.coordinator")
    with trio.fail_after(10):
        scope, coord = await start(nursery, tmp_path, FakeProbe())
        assert node_names(json.loads((await http(coord.url + "/derpmap/default")).body)) == ["900a", "900b"]
        scope.cancel()
    assert [p.name.rsplit("-", 1)[0] for p in tmp_path.glob(f"{STATE_FILE}.bad-*")] == [f"{STATE_FILE}.bad"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "ignored" in lines[0] and "starting from the config" in lines[0]


async def test_bad_entries_in_state_file_are_skipped(nursery: trio.Nursery, tmp_path: Path) -> None:
    good = relay_entry("930a", 930)
    doc = {"version": 1, "regions": [{"RegionID": 930, "RegionCode": "r930", "RegionName": "r930"}, {"x": 1}],
           "nodes": [{"node": {k: v for k, v in good.items() if k not in ("RegionCode", "PublicKey")},
                      "public_key": good["PublicKey"], "status": "up"},
                     {"node": {"Name": "bad", "RegionID": 930, "HostName": "h", "InsecureForTests": True}},
                     "garbage"]}
    (tmp_path / STATE_FILE).write_text(json.dumps(doc))
    with trio.fail_after(10):
        scope, coord = await start(nursery, tmp_path, FakeProbe())
        assert node_names(json.loads((await http(coord.url + "/derpmap/default")).body)) == ["900a", "900b", "930a"]
        scope.cancel()


def test_unwritable_state_dir_is_one_line_and_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = subprocess.run([sys.executable, "-m", "derpd", "coordinator", "-a", "127.0.0.1:0",
                             "--state-dir", str(blocker / "state")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "cannot write the state directory" in lines[0] and "--state-dir" in lines[0]


def test_state_directory_from_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from derpd.coordinator.persist import default_state_dir

    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/a:{tmp_path}/b")
    assert default_state_dir() == tmp_path / "a"
    monkeypatch.delenv("STATE_DIRECTORY")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "derpd"


async def test_state_file_is_replaced_atomically(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(10):
        scope, coord = await start(nursery, tmp_path, FakeProbe())
        assert (await register(coord.url, relay_entry("940a", 940))).status == 200
        scope.cancel()
    saved = json.loads((tmp_path / STATE_FILE).read_text())
    assert [n["node"]["Name"] for n in saved["nodes"]] == ["940a"]
    assert saved["map"] == json.loads(coord.state.published.json)
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]  # no temporary file left


async def test_readyz_waits_for_heartbeats_unless_state_was_restored(nursery: trio.Nursery,
                                                                     tmp_path: Path) -> None:
    with trio.fail_after(10):
        scope, coord = await start(nursery, tmp_path, FakeProbe())
        assert (await http(coord.url + "/readyz")).status == 503  # fresh, registrations on
        assert (await http(coord.url + "/healthz")).status == 200
        assert coord.state.ready(trio.current_time() + coord.state.heartbeat_interval() + 2.0)
        assert (await register(coord.url, relay_entry("970a", 970))).status == 200
        scope.cancel()
        scope, coord = await start(nursery, tmp_path, FakeProbe())
        assert (await http(coord.url + "/readyz")).status == 200  # the state file had the map
        scope.cancel()
