"""One node assembly from typed settings: ``derpd serve``'s flags become ``NodeSettings`` in one
place (``derpd.cli_settings``), the settings refuse what does not combine in one line and cross
into worker processes as they are, and ``derpd.node.start_node`` runs the node they describe."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import trio

from derpd.cli import serve
from derpd.cli_settings import node_settings
from derpd.node import node_registration, prepare, start_node
from derpd.settings import (AdmissionSettings, AnnounceSettings, BootstrapDNSSettings, MapNodeSettings, MeshSettings,
                            MetricsSettings, NodeSettings, RelaySettings, SettingsError, StunSettings)

from .test_cli import start_coordinator

MESH_KEY = "ab" * 32


def settings_of(*argv: str) -> NodeSettings:
    """What ``derpd serve ARGV`` runs with, without running it."""
    with serve.make_context("serve", list(argv)) as ctx:
        return node_settings(ctx.params)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "mesh.key").write_text(MESH_KEY)
    (tmp_path / "token").write_text("t0ken\n")
    return {"mesh": tmp_path / "mesh.key", "token": tmp_path / "token", "allow": tmp_path / "allow"}


def test_serve_flags_become_typed_settings(files):
    s = settings_of("--dev", "-a", "127.0.0.1:0", "-stun-port=3479", "--metrics-addr", "127.0.0.1:9100",
                    "--mesh-with", "a.example.com, b.example.com:8443/10.0.0.2", "--mesh-psk-file", str(files["mesh"]),
                    "--coordinator", "http://c1:8080,http://c2:8080", "--coordinator-token-file", str(files["token"]),
                    "--heartbeat-interval", "20s", "--region-id", "901", "--node-name", "901a",
                    "--advertise-ipv4", "192.0.2.1", "--allow-keys", str(files["allow"]),
                    "--verify-client-url", "http://v.example/verify", "--no-verify-client-url-fail-open",
                    "--bootstrap-dns-names", "a.example.com,b.example.com", "-v")
    assert (s.relay.addr, s.relay.hostname, s.relay.mesh_key) == ("127.0.0.1:0", "localhost", bytes.fromhex(MESH_KEY))
    assert s.stun == StunSettings(3479)
    assert s.metrics == MetricsSettings("127.0.0.1:9100")
    assert s.mesh == MeshSettings(("a.example.com", "b.example.com:8443/10.0.0.2"), None, files["mesh"], False)
    assert s.announce == AnnounceSettings(("http://c1:8080", "http://c2:8080"), "t0ken", 20.0)
    assert s.map_node == MapNodeSettings(region_id=901, node_name="901a", ipv4="192.0.2.1")
    assert s.admission == AdmissionSettings(allow_keys=files["allow"], verify_client_url="http://v.example/verify",
                                            verify_client_url_fail_open=False)
    assert s.bootstrap_dns == BootstrapDNSSettings(("a.example.com", "b.example.com"), ())
    assert (s.workers, s.verbose) == (1, 1)
    plain = settings_of("--dev", "-stun=false")
    assert plain.stun.port == -1 and plain.announce is None and plain.metrics.addr is None and not plain.mesh.peers


def test_settings_cross_into_worker_processes_as_they_are(files):
    s = settings_of("--dev", "--workers", "2", "--mesh-psk-file", str(files["mesh"]), "--coordinator", "http://c:1",
                    "--coordinator-token-file", str(files["token"]), "--rate-config", str(files["allow"]))
    assert pickle.loads(pickle.dumps(s)) == s


@pytest.mark.parametrize("argv, message", [
    (["--workers", "2", "--mesh-with", "b.example.com", "--mesh-psk-file", "{mesh}"],
     "--workers cannot be combined with --mesh-with"),
    (["--mesh-with", "b.example.com"], "--mesh-with needs the region's mesh key"),
    (["--acme-ip-certs"], "--acme-ip-certs is for --certmode letsencrypt or gcp"),
    (["--stun-port", "70000"], "--stun-port 70000"),
    (["--advertise-ipv6", "192.0.2.1"], "--advertise-ipv6 '192.0.2.1' is not an IPv6 address"),
    (["--coordinator", "http://c:1", "--coordinator-token-file", "{token}", "--heartbeat-interval", "2h"],
     "--heartbeat-interval"),
    (["--coordinator", "http://:1", "--coordinator-token-file", "{token}"], "has no host"),
], ids=["workers+mesh", "mesh without key", "acme flag without acme", "stun port", "advertise", "heartbeat",
        "coordinator host"])
def test_what_does_not_combine_is_one_line(files, argv, message):
    with pytest.raises(SettingsError) as e:
        settings_of("--dev", *[a.format(**files) for a in argv])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_acme_does_not_go_with_workers(tmp_path):
    with pytest.raises(SettingsError, match="ACME with --workers > 1"):
        settings_of("-c", str(tmp_path / "k"), "-a", ":443", "--hostname", "derp.example.com", "--certdir",
                    str(tmp_path), "--workers", "2")


def test_a_node_of_the_command_line_is_prepared_with_its_checks(files):
    files["allow"].write_text("# nobody yet\n")
    parts = prepare(settings_of("--dev", "--allow-keys", str(files["allow"])))
    assert parts.protection is not None and parts.protection.allow_list is not None and parts.acme is None
    files["allow"].write_text("not a key\n")
    with pytest.raises(SettingsError, match="line 1"):
        prepare(settings_of("--dev", "--allow-keys", str(files["allow"])))


async def test_start_node_runs_what_the_settings_describe(nursery, tmp_path):
    coordinator, registered, token_file = await start_coordinator(nursery, tmp_path)
    settings = NodeSettings(
        relay=RelaySettings(addr="127.0.0.1:0", hostname="127.0.0.1"),
        stun=StunSettings(0),
        metrics=MetricsSettings("127.0.0.1:0"),
        map_node=MapNodeSettings(region_id=901, node_name="901z"),
        announce=AnnounceSettings((coordinator.url,), token_file.read_text().strip(), interval=20.0),
    )
    with trio.fail_after(30):
        node = await start_node(nursery, settings, prepare(settings))
        assert node.stun and node.stun_port == node.stun[0][1] != 0
        assert node.announcer is not None and node.announcer.interval == 20.0
        await registered.wait()
        assert node.metrics is not None
        stream = await trio.open_tcp_stream(*node.metrics)
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := await stream.receive_some(65536):
                reply += chunk
    assert reply.startswith(b"HTTP/1.1 200") and b"derp_clients" in reply
    entry = node_registration(settings, node.relay, node.stun_port)
    assert entry["Name"] == "901z" and entry["RegionID"] == 901 and entry["IPv4"] == "127.0.0.1"
    assert entry["DERPPort"] == node.relay.port and entry["STUNPort"] == node.stun_port
