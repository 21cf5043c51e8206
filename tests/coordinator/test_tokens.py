"""Scoped registration tokens: a token bound to regions (and nodes) cannot touch others, every
refusal is counted by reason, and a reload rotates tokens without dropping registered nodes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner

from derpd.coordinator.cli import coordinator_command
from derpd.coordinator.config import UNSCOPED, ConfigError, load_config
from derpd.coordinator.server import RunningCoordinator, serve_coordinator
from derpd.keys import NodePrivate

from .conftest import CONFIG_TEXT, FakeProbe, http, register

TOKENS = {"all": "unscoped-token-0123456789", "edge": "edge-token-0123456789abcd",
          "edge2": "edge-2-token-0123456789ab", "far": "far-token-0123456789abcdef"}

SCOPES = """
[[tokens]]
file = "edge.token"
regions = [901]

[[tokens]]
file = "edge2.token"
regions = [901]
nodes = ["901b"]

[[tokens]]
file = "far.token"
regions = [902, 903]
"""


def write_config(tmp_path: Path, extra: str = SCOPES, tokens: dict[str, str] = TOKENS) -> Path:
    for name, token in tokens.items():
        (tmp_path / f"{name}.token").write_text(token + "\n")
    config = tmp_path / "c.toml"
    config.write_text(CONFIG_TEXT.replace("[coordinator]\n", '[coordinator]\ntoken_file = "all.token"\n')
                      + extra)
    return config


def node(name: str, region: int, key: str | None = None) -> dict[str, Any]:
    return {"Name": name, "RegionID": region, "RegionCode": f"r{region}" if region != 901 else "edge",
            "HostName": "localhost", "IPv4": "127.0.0.1", "DERPPort": 4,
            "PublicKey": key or str(NodePrivate.generate().public)}


def refusals(coord: RunningCoordinator) -> dict[str, float]:
    families = {m.name: m for m in coord.state.metrics.registry.collect()}
    return {s.labels["reason"]: s.value for s in families["derpd_coordinator_auth_refusals"].samples
            if s.name.endswith("_total")}


async def start(nursery: trio.Nursery, config_path: Path) -> RunningCoordinator:
    config = load_config(config_path)
    with trio.fail_after(10):
        return await nursery.start(lambda task_status: serve_coordinator(  # type: ignore[no-any-return]
            config, listen="127.0.0.1:0", probe=FakeProbe(), probing=False, task_status=task_status))


async def test_a_token_for_901_cannot_create_or_refresh_nodes_of_902(nursery: trio.Nursery,
                                                                     tmp_path: Path) -> None:
    coord = await start(nursery, write_config(tmp_path))
    assert refusals(coord) == {"missing": 0, "wrong": 0, "region": 0, "node": 0, "disabled": 0}
    far = node("902a", 902)
    with trio.fail_after(20):
        assert (await register(coord.url, far, TOKENS["far"])).status == 200
        # another region's token can neither refresh it nor create a node elsewhere
        resp = await register(coord.url, far, TOKENS["edge"])
        assert resp.status == 403 and json.loads(resp.body)["field"] == "RegionID"
        assert "region 901 only" in json.loads(resp.body)["error"]
        assert (await register(coord.url, node("902b", 902), TOKENS["edge"])).status == 403
        # nor move it into its own region under the same name
        moved = await register(coord.url, {**far, "RegionID": 901, "RegionCode": "edge"}, TOKENS["edge"])
        assert moved.status == 403
        # a token bound to a node name registers that node only
        assert (await register(coord.url, node("901a", 901), TOKENS["edge2"])).status == 403
        assert (await register(coord.url, node("901b", 901), TOKENS["edge2"])).status == 200
        assert (await register(coord.url, node("901c", 901), TOKENS["edge"])).status == 200
        # the unscoped token works everywhere, as before
        assert (await register(coord.url, node("903a", 903), TOKENS["all"])).status == 200
        assert (await register(coord.url, node("904a", 904), "no-such-token-0123456789")).status == 401
        assert (await http(coord.url + "/v1/nodes", "POST", b"{}")).status == 401
    assert refusals(coord) == {"missing": 1, "wrong": 1, "region": 3, "node": 1, "disabled": 0}
    assert coord.state.entries["902a"].node.region_id == 902
    assert sorted(n for n, e in coord.state.entries.items() if e.source == "registered") == [
        "901b", "901c", "902a", "903a"]
    text = (await http(coord.url + "/metrics")).body.decode()
    assert 'derpd_coordinator_auth_refusals_total{reason="region"} 3.0' in text
    assert 'derpd_coordinator_registrations_total{result="out_of_scope"} 4.0' in text


async def test_sighup_reload_rotates_tokens_and_keeps_nodes(nursery: trio.Nursery, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    coord = await start(nursery, config)
    a = node("901a", 901)
    with trio.fail_after(20):
        assert (await register(coord.url, a, TOKENS["edge"])).status == 200
        (tmp_path / "edge.token").write_text("rotated-edge-token-0123456789\n")
        assert coord.reload_from(config) is True
        assert "901a" in coord.state.entries  # registered nodes stay
        coord.state.entries["901a"].last_seen -= 5  # as if a heartbeat interval had passed
        assert (await register(coord.url, a, TOKENS["edge"])).status == 401
        assert (await register(coord.url, a, "rotated-edge-token-0123456789")).status == 200
        # a bad token file on reload keeps the last good tokens
        (tmp_path / "edge.token").write_text("short\n")
        assert coord.reload_from(config) is False
        coord.state.entries["901a"].last_seen -= 5
        assert (await register(coord.url, a, "rotated-edge-token-0123456789")).status == 200


def test_find_token_scopes() -> None:
    from derpd.coordinator.config import CoordinatorConfig, TokenScope

    scope = TokenScope("scoped-0123456789abcdef", frozenset({901}))
    config = CoordinatorConfig(token="global-0123456789abcdef", tokens=(scope,))
    assert config.find_token(b"global-0123456789abcdef") is UNSCOPED
    assert config.find_token(b"scoped-0123456789abcdef") is scope
    assert config.find_token(b"scoped-0123456789abcdeX") is None
    assert UNSCOPED.refusal(902, "x") is None
    assert scope.refusal(902, "x") is not None and scope.refusal(901, "x") is None


@pytest.mark.parametrize("entry, where, words", [
    ('[[tokens]]\nfile = "edge.token"\n', "tokens[0].regions", "is required"),
    ('[[tokens]]\nfile = "edge.token"\nregions = []\n', "tokens[0].regions", "non-empty list of region IDs"),
    ('[[tokens]]\nfile = "edge.token"\nregions = ["901"]\n', "tokens[0].regions", "region IDs"),
    ('[[tokens]]\nfile = "edge.token"\nregions = [901]\nnodes = [1]\n', "tokens[0].nodes", "node names"),
    ('[[tokens]]\nfile = "missing.token"\nregions = [901]\n', "tokens[0].file", "cannot read the token file"),
    ('[[tokens]]\nfile = "all.token"\nregions = [901]\n', "tokens[0].file", "same token as another"),
    ('[[tokens]]\nfile = "edge.token"\nregion = [901]\n', "tokens[0].region", "unknown key"),
])
def test_bad_token_scope_is_one_line(tmp_path: Path, entry: str, where: str, words: str) -> None:
    config = write_config(tmp_path, entry)
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert where in str(info.value) and words in str(info.value)
    result = CliRunner().invoke(coordinator_command, ["--config", str(config), "--check",
                                                      "--state-dir", str(tmp_path / "state")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output
