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


def test_check_prints_map() -> None:
    result = CliRunner().invoke(coordinator_command, ["--config", str(EXAMPLE), "--check"])
    assert result.exit_code == 0, result.output
    assert list(json.loads(result.output)["Regions"]) == ["900", "901"]


def test_bad_config_names_file_line_field(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text('[[regions]]\nid = 900\ncode = "x"\n\n[[regions.nodes]]\nname = "a"\nhostname = "h"\n'
                   'stun_port = 99999\n')
    result = CliRunner().invoke(coordinator_command, ["--config", str(bad), "--check"])
    assert result.exit_code == 1
    assert f"Error: {bad}:8: regions[0].nodes[0].stun_port: must be in -1..65535" in result.output


def test_bad_token_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(coordinator_command, ["--token-file", str(tmp_path / "missing"), "--check"])
    assert result.exit_code == 1 and "cannot read the token file" in result.output
