"""``--rate-config``: per-client receive rate limit; it delays (back-pressure), never drops."""

from __future__ import annotations

import json

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from derpd import client as derp_client
from derpd.keys import NodePrivate
from derpd.ratelimit import (
    MIN_BURST,
    ClientRateLimits,
    OpenFilesWatch,
    RateConfig,
    RateConfigError,
    load_rate_config,
    parse_rate_config,
)

from .conftest import recv_data, start_relay


def test_parse_uses_derpers_names_and_raises_the_burst():
    assert parse_rate_config('{"PerClientRateLimitBytesPerSec": 1000000, "PerClientRateBurstBytes": 2000000}') \
        == RateConfig(1_000_000, 2_000_000)
    assert parse_rate_config('{"PerClientRateLimitBytesPerSec": 5000}') == RateConfig(5000, MIN_BURST)
    assert parse_rate_config('{"perclientratelimitbytespersec": 7, "Other": 1}').bytes_per_sec == 7
    assert not parse_rate_config("{}").enabled
    assert MIN_BURST == 65568


@pytest.mark.parametrize("text", ['[1]', '{"PerClientRateLimitBytesPerSec": -1}',
                                  '{"PerClientRateLimitBytesPerSec": 1.5}', '{"PerClientRateBurstBytes": true}',
                                  "not json", "[" * 100000])
def test_parse_rejects(text):
    with pytest.raises(RateConfigError):
        parse_rate_config(text)


@given(st.binary(max_size=200) | st.text(max_size=200))
def test_garbage_raises_only_our_error(data):
    try:
        parse_rate_config(data)
    except RateConfigError:
        pass


async def relay_burst(relay, sender_kw, count: int, size: int) -> list[int]:
    a, b = NodePrivate.generate(), NodePrivate.generate()
    got: list[int] = []
    async with derp_client.connect(relay.derp_url, a, **sender_kw) as ca, derp_client.connect(relay.derp_url, b) as cb:
        async with trio.open_nursery() as n:
            async def receive() -> None:
                while len(got) < count:
                    got.append(int.from_bytes((await recv_data(cb))[:4], "big"))
            n.start_soon(receive)
            for i in range(count):
                await ca.send(b.public, i.to_bytes(4, "big") + bytes(size - 4))
    return got


async def test_limited_client_is_slowed_not_dropped(nursery, tmp_path):
    relay = await start_relay(nursery)
    path = tmp_path / "rate.json"
    path.write_text(json.dumps({"PerClientRateLimitBytesPerSec": 400_000, "PerClientRateBurstBytes": 0}))
    limits = relay.server.client_rate_limits
    limits.path = path
    limits.set(load_rate_config(path))
    stats = relay.server.stats
    with trio.fail_after(20):
        got = await relay_burst(relay, {}, 20, 32_000)  # 640 kB: well over the 65568-byte burst
    assert got == list(range(20))  # every packet arrived, in order
    assert stats.rate_limit_waits > 0
    assert sum(stats.dropped_packets.values()) == 0


async def test_mesh_peers_are_exempt(nursery):
    mesh_key = bytes(range(32))
    relay = await start_relay(nursery, mesh_key=mesh_key)
    relay.server.client_rate_limits.set(RateConfig(1000, MIN_BURST))  # would take minutes
    with trio.fail_after(20):
        got = await relay_burst(relay, {"mesh_key": mesh_key}, 20, 32_000)
    assert got == list(range(20))
    assert relay.server.stats.rate_limit_waits == 0


async def test_reload_applies_to_a_reader_already_waiting(tmp_path):
    from derpd.metrics import RelayStats

    limits = ClientRateLimits(RelayStats(), RateConfig(1, MIN_BURST), tmp_path / "rate.json")
    limiter = limits.limiter()
    done = trio.Event()

    async def reader() -> None:
        await limiter.wait(10 * MIN_BURST)  # days at 1 byte/s
        done.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set() and limits.stats.rate_limit_waits == 1
            (tmp_path / "rate.json").write_text("{}")  # limit off
            assert limits.reload() is True
    assert done.is_set()
    (tmp_path / "rate.json").write_text("{broken")
    assert limits.reload() is False and not limits.config.enabled  # kept the current one


def test_open_files_warning_is_logged_once_and_rearms(caplog):
    watch = OpenFilesWatch()
    assert not watch.check(used=50, limit=100)
    assert watch.check(used=95, limit=100)
    assert watch.check(used=99, limit=100)
    assert watch.check(used=85, limit=100)  # still above the re-arm level
    assert not watch.check(used=70, limit=100)
    lines = [r.getMessage() for r in caplog.records if r.name == "derpd.limits"]
    assert len(lines) == 2 and "95 of 100 open files" in lines[0] and "ulimit -n" in lines[0]
