"""`derpd coordinator` command line: help, config errors naming file/line/field, --check."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from derpd.coordinator.cli import coordinator_command

EXAMPLE = Path(__file__).parents[2] / "deploy" / "coordinator.example.toml"


def test_help() -> None:
    result = CliRunner().invoke(coordinator_command, ["--help"])
    assert result.exit_code == 0
    for word in ("--config", "-a", "/derpmap/default.yaml", "SIGHUP", "--token-file"):
        assert word in result.output


def test_check_prints_map(tmp_path: Path) -> None:
    result = CliRunner().invoke(coordinator_command, ["--config", str(EXAMPLE), "--check", "--state-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    # Region 901 waits for self-registered nodes: the map served at start leaves it out, so --check does.
    assert list(json.loads(result.output)["Regions"]) == ["900"]


def test_bad_config_names_file_line_field(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text('[[regions]]\nid = 900\ncode = "x"\n\n[[regions.nodes]]\nname = "a"\nhostname = "h"\n'
                   'stun_port = 99999\n')
    result = CliRunner().invoke(coordinator_command, ["--config", str(bad), "--check", "--state-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert f"Error: {bad}:8: regions[0].nodes[0].stun_port: must be in -1..65535" in result.output


def test_bad_token_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(coordinator_command, ["--token-file", str(tmp_path / "missing"), "--check",
                                                      "--state-dir", str(tmp_path)])
    assert result.exit_code == 2 and "cannot read the token file" in result.output


async def test_check_prints_exactly_the_bytes_served(tmp_path: Path, nursery) -> None:
    """--check prints GET /derpmap/default's body right after start, byte for byte (regions
    without nodes left out, the same key order and spacing)."""
    import trio

    from derpd.coordinator.config import load_config
    from derpd.coordinator.server import serve_coordinator

    from .conftest import FakeProbe, http

    config = tmp_path / "c.toml"
    config.write_text(EXAMPLE.read_text() + '\n[[regions]]\nid = 950\ncode = "empty"\nname = "No nodes"\n')
    result = CliRunner().invoke(coordinator_command, ["--config", str(config), "--check", "--state-dir",
                                                      str(tmp_path / "state")])
    assert result.exit_code == 0, result.output
    with trio.fail_after(20):
        running = await nursery.start(lambda task_status: serve_coordinator(
            load_config(config), listen="127.0.0.1:0", probe=FakeProbe(), probing=False, task_status=task_status))
        served = (await http(running.url + "/derpmap/default")).body
    assert result.stdout_bytes == served
    assert "950" not in json.loads(served)["Regions"]


def test_check_fails_on_a_listen_address_that_cannot_work(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(EXAMPLE.read_text().replace('listen = "127.0.0.1:8080"', 'listen = "127.0.0.1:80800"'))
    result = CliRunner().invoke(coordinator_command, ["--config", str(config), "--check", "--state-dir", str(tmp_path)])
    assert result.exit_code == 2 and "coordinator.listen" in result.output and "65535" in result.output
    result = CliRunner().invoke(coordinator_command, ["--check", "-a", "no-such-host.invalid:8080", "--state-dir",
                                                      str(tmp_path)])
    assert result.exit_code == 2 and "does not resolve" in result.output
