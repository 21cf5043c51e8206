"""Config loading: the example works; every error names file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derpd.coordinator.config import ConfigError, load_config, parse_config

EXAMPLE = Path(__file__).parents[2] / "deploy" / "coordinator.example.toml"

GOOD = """\
[coordinator]
probe_interval = 10

[[regions]]
id = 900
code = "home"

[[regions.nodes]]
name = "900a"
hostname = "localhost"
derp_port = 8443

[[regions.nodes]]
name = "900b"
hostname = "localhost"
"""


def test_example_config_loads() -> None:
    config = load_config(EXAMPLE)
    assert [r.region_id for r in config.static_map.regions] == [900, 901]
    assert [n.name for n in config.static_map.nodes()] == ["900a", "900b"]
    assert config.probe_timeout == 8
    assert config.static_map.omit_default_regions


def test_defaults() -> None:
    config = parse_config(GOOD, "x.toml")
    assert config.probe_interval == 10 and config.probe_timeout == 8.0
    assert config.static_map.regions[0].region_name == "home"  # name defaults to code
    assert config.token is None


@pytest.mark.parametrize(("old", "new", "line", "field", "message"), [
    ('derp_port = 8443', 'derp_port = 70000', 11, "regions[0].nodes[0].derp_port", "0..65535"),
    ('name = "900b"', 'name = "900a"', 14, "regions[0].nodes[1].name", "duplicate node name '900a'"),
    ('derp_port = 8443', 'derp_prot = 8443', 11, "regions[0].nodes[0].derp_prot", "unknown key"),
    ('derp_port = 8443', 'derp_port = "8443"', 11, "regions[0].nodes[0].derp_port", "must be an integer"),
    ('derp_port = 8443', 'ipv4 = "::1"', 11, "regions[0].nodes[0].ipv4", "IPv4"),
    ('id = 900', 'id = 0', 5, "regions[0].id", "1.."),
    ('hostname = "localhost"\nderp_port', 'derp_port', 8, "regions[0].nodes[0].hostname", "is required"),
    ('probe_interval = 10', 'probe_interval = -1', 2, "coordinator.probe_interval", "seconds"),
    ('probe_interval = 10', 'probe_interval = 10\nprobe_timeout = 20', 3, "coordinator.probe_timeout",
     "must not exceed"),
])
def test_errors_name_file_line_and_field(old: str, new: str, line: int, field: str, message: str) -> None:
    text = GOOD.replace(old, new, 1)
    assert text != GOOD
    with pytest.raises(ConfigError) as info:
        parse_config(text, "coord.toml")
    err = info.value
    assert (err.file, err.line, err.field) == ("coord.toml", line, field)
    assert message in err.message
    assert str(err).startswith(f"coord.toml:{line}: {field}: ")


def test_toml_syntax_error_has_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(GOOD.replace('code = "home"', 'code = "home'), "bad.toml")
    assert info.value.line == 6
    assert "not valid TOML" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "nope.toml")


def test_token_file_relative_to_config(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("  s3cret-s3cret-s3cret\n")
    (tmp_path / "c.toml").write_text('[coordinator]\ntoken_file = "tok"\n')
    assert load_config(tmp_path / "c.toml").token == "s3cret-s3cret-s3cret"
    (tmp_path / "tok").write_text("short")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.toml")
    assert info.value.line == 2 and info.value.field == "coordinator.token_file"
    assert "head -c 32 /dev/urandom" in info.value.message


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_garbage_raises_only_config_error(text: str) -> None:
    try:
        parse_config(text, "fuzz.toml")
    except ConfigError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "code", "name", "latitude", "avoid", "nodes", "x"]),
                       st.one_of(st.integers(), st.text(max_size=5), st.booleans(), st.floats(),
                                 st.lists(st.integers(), max_size=2)), max_size=5))
def test_typed_garbage_in_a_region_raises_only_config_error(region: dict[str, object]) -> None:
    import json
    lines = ["[[regions]]"] + [f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}"
                               for k, v in region.items()]
    try:
        parse_config("\n".join(lines), "fuzz.toml")
    except ConfigError:
        pass


def test_mesh_keys_and_probe_allow(tmp_path: Path) -> None:
    (tmp_path / "all.key").write_text("11" * 32 + "\n")
    (tmp_path / "r901.key").write_text("22" * 32)
    text = ('[coordinator]\nmesh_key_file = "all.key"\nprobe_allow = ["10.0.0.0/8", "fd00::/8"]\n'
            '[[regions]]\nid = 900\ncode = "a"\n[[regions]]\nid = 901\ncode = "b"\nmesh_key_file = "r901.key"\n')
    config = parse_config(text, "c.toml", base_dir=tmp_path)
    assert config.mesh_key_for(900) == bytes([0x11] * 32) and config.mesh_key_for(901) == bytes([0x22] * 32)
    assert [str(n) for n in config.probe_allow] == ["10.0.0.0/8", "fd00::/8"]
    (tmp_path / "bad.key").write_text("not a key")
    for bad, where in (('[coordinator]\nmesh_key_file = "bad.key"\n', "c.toml:2: coordinator.mesh_key_file"),
                       ('[coordinator]\nmesh_key_file = "missing.key"\n', "cannot read the mesh key file"),
                       ('[coordinator]\nprobe_allow = ["10.0.0.0/33"]\n', "c.toml:2: coordinator.probe_allow"),
                       ('[coordinator]\nprobe_allow = [10]\n', "must be a CIDR"),
                       ('[[regions]]\nid = 9\ncode = "x"\nmesh_key_file = "bad.key"\n',
                        "c.toml:4: regions[0].mesh_key_file")):
        with pytest.raises(ConfigError) as info:
            parse_config(bad, "c.toml", base_dir=tmp_path)
        assert where in str(info.value), str(info.value)
