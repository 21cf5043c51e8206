"""Registration bodies: validation names the field; garbage raises only RegistrationError."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derpd.coordinator.registration import RegistrationError, parse_registration
from derpd.keys import NodePrivate

GOOD = {"Name": "901a", "RegionID": 901, "RegionCode": "edge", "HostName": "localhost", "IPv4": "127.0.0.1",
        "DERPPort": 8443, "STUNPort": 3478, "CertName": "sha256-raw:" + "0" * 64}


def test_good() -> None:
    key = str(NodePrivate.generate().public)
    reg = parse_registration(json.dumps({**GOOD, "PublicKey": key}).encode())
    assert reg.node.name == "901a" and reg.node.derp_port == 8443 and reg.region_code == "edge"
    assert reg.public_key == key


@pytest.mark.parametrize(("change", "field", "words"), [
    ({"DERPPort": 70000}, "DERPPort", "0..65535"),
    ({"STUNPort": -5}, "STUNPort", "-1..65535"),
    ({"DERPPort": "443"}, "DERPPort", "an integer"),
    ({"STUNOnly": 1}, "STUNOnly", "true or false"),
    ({"RegionID": True}, "RegionID", "an integer"),
    ({"IPv4": "::1"}, "IPv4", "IPv4"),
    ({"Hostname": "x"}, "Hostname", "unknown field"),
    ({"PublicKey": "nodekey:zz"}, "PublicKey", "64 hex"),
    ({"PublicKey": "nodekey:" + "0" * 64}, "PublicKey", "zero key"),
    ({"Name": ""}, "Name", "must not be empty"),
])
def test_bad_fields(change: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(RegistrationError) as info:
        parse_registration(json.dumps({**GOOD, **change}).encode())
    assert info.value.status == 400
    assert info.value.field == field
    assert words in info.value.message


@pytest.mark.parametrize("body", [b"", b"[]", b"{", b"null", b"\xff\xfe", b'{"Name": "a"}', b"[" * 100000])
def test_wrong_shape(body: bytes) -> None:
    with pytest.raises(RegistrationError) as info:
        parse_registration(body)
    assert info.value.status == 400


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200),
                 st.builds(lambda d: json.dumps(d).encode(),
                           st.fixed_dictionaries({}, optional={k: json_values for k in [*GOOD, "PublicKey"]}))))
def test_garbage_raises_only_registration_error(body: bytes) -> None:
    try:
        parse_registration(body)
    except RegistrationError as exc:
        assert 400 <= exc.status < 500
