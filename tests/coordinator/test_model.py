"""The map model: Tailscale's field names, omitempty rules, and validation naming the field."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from derpd.coordinator.model import (
    DerpMap,
    DerpNode,
    DerpRegion,
    InvalidMapError,
    map_problems,
    node_problems,
    validate_map,
)

NODE_KEYS = ["Name", "RegionID", "HostName", "CertName", "IPv4", "IPv6", "STUNPort", "STUNOnly",
             "DERPPort", "InsecureForTests", "STUNTestIP", "CanPort80"]
PIN = "sha256-raw:" + "ab" * 32


def test_spec_example_round_trip() -> None:
    """Spec 15.2's example, built from the model, gives the same JSON."""
    dmap = DerpMap((DerpRegion(900, "home", "Home DERP", (
        DerpNode("900a", 900, "derp1.example.net", ipv4="198.51.100.1", ipv6="2001:db8::1", can_port_80=True),
        DerpNode("900b", 900, "203.0.113.9", cert_name=PIN, derp_port=8443, stun_port=3479),
        DerpNode("900s", 900, "stun.example.net", stun_only=True),
    )),), omit_default_regions=True)
    assert validate_map(dmap) is dmap
    doc = json.loads(dmap.to_json_bytes())
    assert list(doc) == ["Regions", "omitDefaultRegions"]
    region = doc["Regions"]["900"]
    assert list(region) == ["RegionID", "RegionCode", "RegionName", "Nodes"]
    assert region["Nodes"][0] == {"Name": "900a", "RegionID": 900, "HostName": "derp1.example.net",
                                  "IPv4": "198.51.100.1", "IPv6": "2001:db8::1", "CanPort80": True}
    assert list(region["Nodes"][1]) == ["Name", "RegionID", "HostName", "CertName", "STUNPort", "DERPPort"]
    assert region["Nodes"][2] == {"Name": "900s", "RegionID": 900, "HostName": "stun.example.net",
                                  "STUNOnly": True}


def test_empty_map_has_object_regions_never_null() -> None:
    assert json.loads(DerpMap().to_json_bytes()) == {"Regions": {}}


def test_regions_sorted_and_keyed_by_decimal_id() -> None:
    dmap = DerpMap((DerpRegion(910, "b", "B"), DerpRegion(2, "a", "A")))
    assert list(dmap.to_json()["Regions"]) == ["2", "910"]


@pytest.mark.parametrize(("kwargs", "attr"), [
    ({"derp_port": 65536}, "derp_port"),
    ({"derp_port": -1}, "derp_port"),
    ({"stun_port": -2}, "stun_port"),
    ({"ipv4": "2001:db8::1"}, "ipv4"),
    ({"ipv4": "300.1.2.3"}, "ipv4"),
    ({"ipv6": "192.0.2.1"}, "ipv6"),
    ({"cert_name": "sha256-raw:" + "AB" * 32}, "cert_name"),
    ({"cert_name": "sha256-raw:abc"}, "cert_name"),
    ({"name": ""}, "name"),
    ({"host_name": ""}, "host_name"),
    ({"region_id": 0}, "region_id"),
    ({"stun_test_ip": "nope"}, "stun_test_ip"),
])
def test_node_problem_names_the_field(kwargs: dict[str, object], attr: str) -> None:
    base = {"name": "n", "region_id": 900, "host_name": "localhost"}
    problems = node_problems(DerpNode(**{**base, **kwargs}))  # type: ignore[arg-type]
    assert [p.attr for p in problems] == [attr]


def test_none_and_empty_ip_are_allowed() -> None:
    assert node_problems(DerpNode("n", 1, "h", ipv4="none", ipv6="")) == []


def test_duplicate_names_across_regions_and_mismatched_region_id() -> None:
    dmap = DerpMap((
        DerpRegion(1, "a", "A", (DerpNode("x", 1, "h"),)),
        DerpRegion(2, "b", "B", (DerpNode("x", 2, "h"), DerpNode("y", 1, "h"))),
        DerpRegion(2, "c", "C"),
    ))
    problems = map_problems(dmap)
    assert {(p.region, p.node, p.attr) for p in problems} == {(1, 0, "name"), (1, 1, "region_id"), (2, None, "region_id")}
    with pytest.raises(InvalidMapError, match="duplicate node name 'x'"):
        validate_map(dmap)


nodes = st.builds(
    DerpNode,
    name=st.text(min_size=1, max_size=8),
    region_id=st.integers(1, 999),
    host_name=st.from_regex(r"[a-z][a-z0-9.-]{0,20}", fullmatch=True),
    cert_name=st.sampled_from(["", PIN, "derp.example.net"]),
    ipv4=st.sampled_from(["", "none", "127.0.0.1"]),
    ipv6=st.sampled_from(["", "none", "::1"]),
    stun_port=st.integers(-1, 65535),
    stun_only=st.booleans(),
    derp_port=st.integers(0, 65535),
    insecure_for_tests=st.booleans(),
    can_port_80=st.booleans(),
)


@given(nodes)
def test_json_omits_exactly_the_zero_fields(node: DerpNode) -> None:
    doc = node.to_json()
    assert [k for k in NODE_KEYS if k in doc] == list(doc)  # Go struct order
    assert {"Name", "RegionID", "HostName"} <= set(doc)
    for key, value in doc.items():
        assert value not in ("", 0, False) or key in ("Name", "RegionID", "HostName")
    json.dumps(doc)
