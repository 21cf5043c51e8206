"""Heartbeat and node_ttl cannot disagree: a node_ttl shorter than two heartbeats is refused,
the coordinator tells each relay its pace, and the relay follows it, so nodes never flap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from click.testing import CliRunner

from derpd.coordinator.announce import Announcer, asked_interval
from derpd.coordinator.cli import coordinator_command
from derpd.coordinator.config import ConfigError, parse_config
from derpd.coordinator.server import RunningCoordinator, serve_coordinator
from derpd.keys import NodePrivate

from .conftest import TOKEN, FakeProbe, make_config


def test_node_ttl_below_two_heartbeats_is_refused_by_check(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[coordinator]\nnode_ttl = 10\n")
    result = CliRunner().invoke(coordinator_command, ["--config", str(config), "--check",
                                                      "--state-dir", str(tmp_path)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert f"{config}:2: coordinator.node_ttl" in lines[0]
    assert "node_ttl = 30" in lines[0] and "--heartbeat-interval 5s" in lines[0]


def test_node_ttl_and_heartbeat_interval_that_fit() -> None:
    config = parse_config("[coordinator]\nnode_ttl = 10\nheartbeat_interval = 5\n")
    assert (config.node_ttl, config.heartbeat_interval) == (10, 5)
    with pytest.raises(ConfigError, match="coordinator.heartbeat_interval: node_ttl must be at least twice"):
        parse_config("[coordinator]\nheartbeat_interval = 31\n")  # the default node_ttl is 60 s


def test_the_answer_asks_for_a_third_of_node_ttl_never_slower_than_the_relays() -> None:
    from derpd.coordinator.state import CoordinatorState

    assert CoordinatorState(make_config(node_ttl=60.0)).heartbeat_interval() == 15.0
    assert CoordinatorState(make_config(node_ttl=30.0)).heartbeat_interval() == 10.0
    assert CoordinatorState(make_config(node_ttl=6.0, heartbeat_interval=3.0)).heartbeat_interval() == 2.0


def test_asked_interval_is_bounded() -> None:
    assert asked_interval({"heartbeat_interval": 2}, 15.0) == 2.0
    assert asked_interval({"heartbeat_interval": 0.001}, 15.0) == 1.0  # no flood on a coordinator's word
    assert asked_interval({"heartbeat_interval": 1e9}, 15.0) == 3600.0
    for bad in ({}, {"heartbeat_interval": "2"}, {"heartbeat_interval": True}, {"heartbeat_interval": -1},
                {"heartbeat_interval": float("nan")}):
        assert asked_interval(bad, 15.0) is None


def _entry(name: str) -> dict[str, Any]:
    return {"Name": name, "RegionID": 901, "RegionCode": "edge", "HostName": "localhost", "IPv4": "127.0.0.1",
            "DERPPort": 4, "PublicKey": str(NodePrivate.generate().public)}


@pytest.fixture
def clock() -> trio.testing.MockClock:
    # jump only after 50 ms of real idleness, so a loopback answer in flight is never jumped over
    return trio.testing.MockClock(autojump_threshold=0.05)


async def test_relay_follows_the_coordinators_pace_and_never_flaps(
        nursery: trio.Nursery, clock: trio.testing.MockClock) -> None:
    """A relay whose own heartbeat (15 s) is longer than a short node_ttl (6 s) is told 2 s in
    the first answer and keeps that pace: over two minutes of (mocked) time the node is never
    dropped.  Before, the relay sent every 15 s whatever the coordinator said."""
    config = make_config(node_ttl=6.0, heartbeat_interval=3.0, min_heartbeat_interval=1.0)
    entry = _entry("901a")
    with trio.fail_after(200):  # mocked seconds
        coord: RunningCoordinator = await nursery.start(lambda task_status: serve_coordinator(
            config, listen="127.0.0.1:0", probe=FakeProbe(), probing=False, task_status=task_status))
        announcer = Announcer([coord.url], TOKEN, lambda: entry, interval=15.0)
        await nursery.start(announcer.run)
        assert "901a" in coord.state.entries
        start = trio.current_time()
        while trio.current_time() - start < 120:
            await trio.sleep(3.0)
            coord.state.expire(trio.current_time())  # what every map request does
        assert "901a" in coord.state.entries
    assert announcer.intervals == [2.0]
    assert coord.state.metrics.expired._value.get() == 0
    assert 120 / 2.0 <= announcer.sent <= 120 / 1.8 + 2  # one heartbeat every 1.8 to 2 s (jitter)


async def test_a_relay_deaf_to_the_answer_flaps(nursery: trio.Nursery, clock: trio.testing.MockClock,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The same relay, deaf to the answer (every relay before), loses its node between heartbeats."""
    from derpd.coordinator import announce

    monkeypatch.setattr(announce, "asked_interval", lambda answer, own: None)
    config = make_config(node_ttl=6.0, heartbeat_interval=3.0, min_heartbeat_interval=1.0)
    entry = _entry("901b")
    with trio.fail_after(90):  # mocked seconds
        coord: RunningCoordinator = await nursery.start(lambda task_status: serve_coordinator(
            config, listen="127.0.0.1:0", probe=FakeProbe(), probing=False, task_status=task_status))
        await nursery.start(Announcer([coord.url], TOKEN, lambda: entry, interval=15.0).run)
        start = trio.current_time()
        while trio.current_time() - start < 60:
            await trio.sleep(3.0)
            coord.state.expire(trio.current_time())
    assert coord.state.metrics.expired._value.get() >= 3


def test_serve_heartbeat_interval_flag(tmp_path: Path) -> None:
    from derpd.cli import main
    from derpd.cli_settings import announce_settings
    from derpd.settings import SettingsError

    token = tmp_path / "token"
    token.write_text("test-token-0123456789abcdef\n")
    result = CliRunner().invoke(main, ["serve", "--dev", "-a", "127.0.0.1:0", "--coordinator", "http://127.0.0.1:1",
                                       "--coordinator-token-file", str(token), "--heartbeat-interval", "soon"])
    assert result.exit_code == 2 and "--heartbeat-interval" in result.output and "Traceback" not in result.output
    opts: dict[str, object] = {
        "advertise_ipv4": None, "advertise_ipv6": None, "coordinator": "http://c:8080", "hostname": "h", "dev": True,
        "coordinator_token_file": token, "region_id": 901, "region_code": None, "region_name": None,
        "node_name": None, "heartbeat_interval": 5.0}
    announce = announce_settings(opts)
    assert announce is not None and announce.interval == 5.0 and announce.coordinators == ("http://c:8080",)
    for bad in (0.0, 0.5, 7200.0):
        with pytest.raises(SettingsError, match="--heartbeat-interval"):
            announce_settings({**opts, "heartbeat_interval": bad})
