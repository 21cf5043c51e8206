"""Two coordinators behind one URL: relays announce to both, and both publish the same bytes
and the same ETag for the same state, whatever order registrations arrived in, also right
after one of them restarts under load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio

from derpd.coordinator.announce import Announcer
from derpd.coordinator.server import RunningCoordinator

from .conftest import TOKEN, FakeProbe, http, register
from .test_persist import relay_entry, start


async def maps(*coords: RunningCoordinator) -> list[tuple[bytes, str, bytes]]:
    out = []
    for c in coords:
        j = await http(c.url + "/derpmap/default")
        y = await http(c.url + "/derpmap/default.yaml")
        out.append((j.body, j.headers["etag"], y.body))
    return out


async def test_same_state_same_bytes_whatever_the_order(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(20):
        _, a = await start(nursery, tmp_path / "a", FakeProbe())
        _, b = await start(nursery, tmp_path / "b", FakeProbe())
        relays = [relay_entry(f"95{i}a", 950 + i % 2) for i in range(4)]
        for entry in relays:
            assert (await register(a.url, entry)).status == 200
        for entry in reversed(relays):
            assert (await register(b.url, entry)).status == 200
        (ja, ea, ya), (jb, eb, yb) = await maps(a, b)
    assert ja == jb and ea == eb and ya == yb
    assert [n["Name"] for n in json.loads(ja)["Regions"]["950"]["Nodes"]] == ["950a", "952a"]


async def test_replica_restarted_under_load_comes_back_with_the_same_map(nursery: trio.Nursery,
                                                                         tmp_path: Path) -> None:
    probe = FakeProbe()
    opts: dict[str, Any] = {"min_heartbeat_interval": 0.1, "node_ttl": 5.0}
    with trio.fail_after(40):
        _, a = await start(nursery, tmp_path / "a", probe, **opts)
        scope_b, b = await start(nursery, tmp_path / "b", probe, **opts)
        listen_b = f"127.0.0.1:{b.port}"
        urls = [a.url, b.url]
        for i in range(3):
            entry = relay_entry(f"96{i}a", 960 + i)
            nursery.start_soon(Announcer(urls, TOKEN, lambda e=entry: e, interval=0.3).run)
        both = trio.Event()

        def check() -> None:
            if a.state.published.etag == b.state.published.etag and len(a.state.published.dmap.regions) == 4:
                both.set()

        a.state.listeners.append(check)
        b.state.listeners.append(check)
        check()
        await both.wait()
        served = 0

        async def load() -> None:  # map readers keep coming while b restarts
            nonlocal served
            while True:
                for c in (a, b):
                    try:
                        await http(c.url + "/derpmap/default")
                        served += 1
                    except Exception:
                        pass
                await trio.sleep(0)

        nursery.start_soon(load)
        scope_b.cancel()
        _, b = await start(nursery, tmp_path / "b", probe, listen=listen_b, **opts)
        assert b.state.published.json == a.state.published.json  # at once, before any heartbeat
        [(ja, ea, _), (jb, eb, _)] = await maps(a, b)
        assert ja == jb and ea == eb
        assert served > 0
        nursery.cancel_scope.cancel()
