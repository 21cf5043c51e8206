"""headscale reads our maps: /derpmap/default through encoding/json and /derpmap/default.yaml
through gopkg.in/yaml.v3, both into tailscale.com's tailcfg.DERPMap (as headscale's derp.urls and
derp.paths do), decode to the same map with every field we publish."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import trio

from derpd.coordinator.config import parse_config
from derpd.coordinator.server import RunningCoordinator, serve_coordinator
from derpd.keys import NodePrivate
from tests.coordinator.conftest import TOKEN, FakeProbe, http, register

from .conftest import RunScenario

CONFIG = """
[coordinator]
omit_default_regions = true
allow_loopback_nodes = true

[[regions]]
id = 900
code = "yes"
name = "Quotes \\" and null, 0x10, ~, été"
latitude = 52.5
longitude = -13.25

[[regions.nodes]]
name = "900a"
hostname = "derp1.example.net"
ipv4 = "198.51.100.7"
ipv6 = "2001:db8::7"
derp_port = 8443
stun_port = -1
can_port_80 = true

[[regions.nodes]]
name = "true"
hostname = "198.51.100.8"
cert_name = "sha256-raw:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
stun_port = 3479

[[regions]]
id = 901
code = "stun"
[[regions.nodes]]
name = "901s"
hostname = "stun.example.net"
stun_only = true
stun_test_ip = "203.0.113.9"
"""


def expected(doc: dict) -> list[str]:
    out = []
    for rid, region in doc["Regions"].items():
        nodes = [f"{n['Name']}@{n['HostName']}:{n.get('DERPPort', 0)}/stun{n.get('STUNPort', 0)}/"
                 f"{n.get('CertName', '')}/ipv4={n.get('IPv4', '')}/insecure=false" for n in region["Nodes"]]
        out.append(f"{rid}:{region['RegionCode']}:{','.join(nodes)}")
    return sorted(out)


async def test_headscale_decoders_read_both_maps(nursery: trio.Nursery, scenario: RunScenario,
                                                 tmp_path: Path) -> None:
    probe = FakeProbe()
    config = replace(parse_config(CONFIG, "maps.toml"), token=TOKEN)
    with trio.fail_after(120):
        coord: RunningCoordinator = await nursery.start(lambda task_status: serve_coordinator(
            config, listen="127.0.0.1:0", probe=probe, probing=False, state_dir=tmp_path, task_status=task_status))
        resp = await register(coord.url, {"Name": "910a", "RegionID": 910, "RegionCode": "edge",
                                          "RegionName": "Edge: registered", "HostName": "127.0.0.1",
                                          "IPv4": "127.0.0.1", "DERPPort": 3340, "STUNPort": 3478,
                                          "CertName": "sha256-raw:" + "ab" * 32,
                                          "PublicKey": str(NodePrivate.generate().public)})
        assert resp.status == 200, resp.body
        doc = json.loads((await http(coord.url + "/derpmap/default")).body)
        assert set(doc["Regions"]) == {"900", "901", "910"}
        result = await scenario("derpmap", "--url", coord.url)
    assert result.data["regions"] == expected(doc)
    assert result.data["yaml_regions"] == result.data["regions"]
    assert result.data["omit_default_regions"] is True
