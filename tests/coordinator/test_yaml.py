"""The YAML form parses (PyYAML) into the JSON map with lower-cased Go field names (spec 16.2, P-29)."""

from __future__ import annotations

from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from derpd.coordinator.model import DerpMap, DerpNode, DerpRegion
from derpd.coordinator.yamlout import to_yaml

HEADSCALE_KEYS = {"regions", "regionid", "regioncode", "regionname", "latitude", "longitude", "avoid",
                  "nomeasurenohome", "nodes", "name", "hostname", "certname", "ipv4", "ipv6", "stunport",
                  "stunonly", "derpport", "insecurefortests", "stuntestip", "canport80", "omitdefaultregions"}


def _lower(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {(k.lower() if isinstance(k, str) and not k.isdigit() else int(k)): _lower(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_lower(v) for v in obj]
    return obj


def _keys(obj: Any) -> set[str]:
    if isinstance(obj, dict):
        return {k for k in obj if isinstance(k, str)} | set().union(*(_keys(v) for v in obj.values()))
    if isinstance(obj, list):
        return set().union(*(_keys(v) for v in obj)) if obj else set()
    return set()


def test_yaml_matches_json_lowercased() -> None:
    dmap = DerpMap((DerpRegion(900, "home", "Home: \"DERP\" #1", (
        DerpNode("900a", 900, "localhost", ipv4="127.0.0.1", derp_port=8443, stun_port=3478,
                 cert_name="sha256-raw:" + "0" * 64, insecure_for_tests=True),
        DerpNode("true", 900, "null", stun_only=True),
    ), latitude=52.5, no_measure_no_home=True),), omit_default_regions=True)
    text = to_yaml(dmap)
    doc = yaml.safe_load(text)
    assert doc == _lower(dmap.to_json())
    assert _keys(doc) <= HEADSCALE_KEYS
    assert doc["regions"][900]["nodes"][1]["name"] == "true"  # strings stay strings
    assert doc["regions"][900]["nodes"][1]["hostname"] == "null"


def test_empty_map() -> None:
    assert yaml.safe_load(to_yaml(DerpMap())) == {"regions": {}}


@settings(max_examples=60)
@given(st.lists(st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=12),
                min_size=1, max_size=3, unique=True),
       st.text(st.characters(exclude_categories=["Cs"]), max_size=20))
def test_any_strings_survive(names: list[str], region_name: str) -> None:
    dmap = DerpMap((DerpRegion(5, "c", region_name, tuple(DerpNode(n, 5, "h") for n in names)),))
    assert yaml.safe_load(to_yaml(dmap)) == _lower(dmap.to_json())
