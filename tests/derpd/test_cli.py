"""The derpd command line: key files, serve as a real process (plain and --workers), check,
genkey, close-peer, and its one-line errors."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner

from derpd import client as derp_client
from derpd.cli import main
from derpd.keyfile import KeyFileError, load_or_create
from derpd.keys import NodePrivate
from derpd.protocol.errors import RemoteProtocolError

from .conftest import held_clients, relay_in_a_ring, start_relay

DERPD = [sys.executable, "-m", "derpd"]


def test_key_file_created_0600_and_stable(tmp_path):
    path = tmp_path / "sub" / "derper.key"
    key, created = load_or_create(path)
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"PrivateKey": str(key)}
    again, created = load_or_create(path)
    assert not created and again == key


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"PrivateKey": 3}', b'{"PrivateKey": "privkey:12"}',
                                     b'{"Other": "x"}'])
def test_bad_key_file_is_an_error_and_never_overwritten(tmp_path, content):
    path = tmp_path / "derper.key"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match=str(path)):
        load_or_create(path)
    assert path.read_bytes() == content


def test_key_file_field_name_is_case_insensitive(tmp_path):
    path = tmp_path / "k"
    key = NodePrivate.generate()
    path.write_text(json.dumps({"privatekey": str(key)}))
    assert load_or_create(path) == (key, False)


def test_serve_with_bad_key_file_exits_2_with_one_line(tmp_path):
    path = tmp_path / "derper.key"
    path.write_text("not json")
    result = CliRunner().invoke(main, ["serve", "-c", str(path), "-a", "127.0.0.1:0"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and str(path) in result.output
    assert path.read_text() == "not json"


def test_serve_needs_a_key_file_or_dev(monkeypatch):
    monkeypatch.setattr("derpd.derperflags.os.getuid", lambda: 1000)  # as derper: only root has a default
    result = CliRunner().invoke(main, ["serve", "-a", "127.0.0.1:0"])
    assert result.exit_code == 2 and "-c PATH" in result.output


def test_serve_as_root_uses_derper_s_key_file(monkeypatch, tmp_path):
    monkeypatch.setattr("derpd.derperflags.os.getuid", lambda: 0)
    monkeypatch.setattr("derpd.derperflags.ROOT_KEY_FILE", tmp_path / "var/lib/derper/derper.key")
    # port 443 with derper's default certmode stops right after the key file is made
    result = CliRunner().invoke(main, ["serve", "-a", "127.0.0.1:443"])
    assert result.exit_code == 2 and "--hostname" in result.output  # ACME needs this relay's own name
    assert (tmp_path / "var/lib/derper/derper.key").exists()


def test_port_443_with_derper_s_default_hostname_explains(tmp_path):
    result = CliRunner().invoke(main, ["serve", "-c", str(tmp_path / "k"), "-a", "127.0.0.1:443"])
    assert result.exit_code == 2 and "derp.tailscale.com" in result.output and "--hostname" in result.output


def test_genkey_prints_a_key_file_and_refuses_to_overwrite(tmp_path):
    result = CliRunner().invoke(main, ["genkey"])
    assert result.exit_code == 0
    assert NodePrivate.parse(json.loads(result.stdout)["PrivateKey"])
    path = tmp_path / "k"
    assert CliRunner().invoke(main, ["genkey", "-c", str(path)]).exit_code == 0
    before = path.read_text()
    result = CliRunner().invoke(main, ["genkey", "-c", str(path)])
    assert result.exit_code == 2 and "not overwriting" in result.output
    assert path.read_text() == before


def test_help_everywhere():
    for args in (["--help"], ["serve", "--help"], ["check", "--help"], ["genkey", "--help"],
                 ["close-peer", "--help"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0 and "Usage:" in result.output


async def start_serve(*args: str, nursery: trio.Nursery) -> tuple[trio.Process, int]:
    """``derpd serve`` as a real process on a port it picks; returns it and the port."""
    proc = await nursery.start(lambda task_status: trio.run_process(
        [*DERPD, "serve", *args, "-v"], stderr=subprocess.PIPE, check=False, task_status=task_status))
    buf = b""
    while True:
        chunk = await proc.stderr.receive_some(4096)
        assert chunk, f"derpd serve exited early: {buf.decode()}"
        buf += chunk
        m = re.search(rb"relay https?://[^ ]+:(\d+)/derp|(\d+) workers on port (\d+)", buf)
        if m:
            port = int(m.group(1) or m.group(3))
            break
    if b"workers on port" in buf:  # wait for both workers' mesh links
        while buf.count(b"connected") < 2:
            chunk = await proc.stderr.receive_some(4096)
            assert chunk, buf.decode()
            buf += chunk

    async def drain() -> None:
        while await proc.stderr.receive_some(4096):
            pass

    nursery.start_soon(drain)
    return proc, port


async def test_serve_process_check_and_graceful_sigterm(nursery):
    with trio.fail_after(30):
        proc, port = await start_serve("--dev", "-a", "127.0.0.1:0", "--stun-port", "-1", nursery=nursery)
        url = f"http://127.0.0.1:{port}/derp"
        result = await trio.run_process([*DERPD, "check", url, "-n", "300"], capture_stdout=True, check=False)
        assert result.returncode == 0, result.stdout
        assert b"delivered 300/300, lost 0" in result.stdout
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0


async def test_check_fails_against_nothing():
    with trio.fail_after(20):
        result = await trio.run_process([*DERPD, "check", "http://127.0.0.1:1/derp"], capture_stderr=True,
                                        check=False)
    assert result.returncode == 1 and b"cannot log in" in result.stderr


async def test_workers_share_the_port_and_reach_each_other(nursery):
    with trio.fail_after(60):
        proc, port = await start_serve("--dev", "-a", "127.0.0.1:0", "--stun-port", "-1", "--workers", "2",
                                       nursery=nursery)
        url = f"http://127.0.0.1:{port}/derp"
        keys = [NodePrivate.generate() for _ in range(16)]
        # With 16 clients spread by the kernel over 2 workers, some pairs cross workers.
        async with held_clients(url, keys) as clients:
            await relay_in_a_ring(keys, clients)
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0


async def test_close_peer_command(nursery, tmp_path):
    mesh_file = tmp_path / "mesh.key"
    mesh_key = os.urandom(32)
    mesh_file.write_text(mesh_key.hex() + "\n")
    relay = await start_relay(nursery, mesh_key=mesh_key)
    victim = NodePrivate.generate()
    with trio.fail_after(20):
        async with derp_client.connect(relay.derp_url, victim) as cv:
            result = await trio.run_process(
                [*DERPD, "close-peer", relay.derp_url, str(victim.public), "--mesh-psk-file", str(mesh_file)],
                capture_stdout=True, check=False)
            assert result.returncode == 0
            with pytest.raises((trio.EndOfChannel, trio.BrokenResourceError)):
                while True:
                    await cv.recv()


def test_close_peer_bad_key_says_what_to_do(tmp_path):
    mesh = Path(tmp_path / "m")
    mesh.write_text("00" * 32)
    result = CliRunner().invoke(main, ["close-peer", "http://127.0.0.1:1/derp", "nodekey:zz", "--mesh-psk-file",
                                       str(mesh)])
    assert result.exit_code == 2 and "nodekey:<64 hex>" in result.output


async def start_coordinator(nursery: trio.Nursery, tmp_path: Path) -> tuple[object, trio.Event, Path]:
    """A coordinator on a free port; returns it, an event set at the first registration, and
    the token file to pass to ``derpd serve --coordinator-token-file``."""
    from tests.coordinator.conftest import TOKEN, FakeProbe, make_config

    from derpd.coordinator.server import serve_coordinator

    coordinator = await nursery.start(lambda task_status: serve_coordinator(
        make_config(), listen="127.0.0.1:0", probe=FakeProbe(), probing=False, task_status=task_status))
    registered = trio.Event()
    real_register = coordinator.state.register

    def spy(reg, now, *args):  # noqa: ANN001, ANN002, ANN202
        accepted = real_register(reg, now, *args)
        registered.set()
        return accepted

    coordinator.state.register = spy
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    return coordinator, registered, token_file


async def test_serve_registers_with_the_coordinator(nursery, tmp_path):
    from tests.coordinator.conftest import http

    coordinator, registered, token_file = await start_coordinator(nursery, tmp_path)
    with trio.fail_after(30):
        proc, port = await start_serve(
            "-c", str(tmp_path / "k"), "-a", "127.0.0.1:0", "--certmode", "manual", "--certdir", str(tmp_path),
            "--hostname", "127.0.0.1", "--http-port", "-1", "--stun-port", "-1",
            "--coordinator", coordinator.url, "--coordinator-token-file", str(token_file),
            "--region-id", "901", "--node-name", "901x", nursery=nursery)
        await registered.wait()
        doc = json.loads((await http(coordinator.url + "/derpmap/default")).body)
        node = next(n for r in doc["Regions"].values() for n in r["Nodes"] if n["Name"] == "901x")
        assert node["RegionID"] == 901 and node["HostName"] == "127.0.0.1" and node["DERPPort"] == port
        assert node["CertName"].startswith("sha256-raw:") and node["IPv4"] == "127.0.0.1"
        assert node["STUNPort"] == -1
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0


def test_coordinator_flag_needs_a_token(tmp_path):
    result = CliRunner().invoke(main, ["serve", "--dev", "-a", "127.0.0.1:0", "--coordinator", "http://127.0.0.1:1"])
    assert result.exit_code == 2 and "--coordinator-token-file" in result.output


async def test_workers_enforce_the_allow_list(nursery, tmp_path):
    allowed, stranger = NodePrivate.generate(), NodePrivate.generate()
    (tmp_path / "allow").write_text(f"{allowed.public}\n")
    with trio.fail_after(60):
        proc, port = await start_serve("--dev", "-a", "127.0.0.1:0", "--stun-port", "-1", "--workers", "2",
                                       "--allow-keys", str(tmp_path / "allow"), nursery=nursery)
        url = f"http://127.0.0.1:{port}/derp"
        for _ in range(4):  # the kernel spreads connections over both workers: every one must refuse
            with pytest.raises(RemoteProtocolError, match="closed during login"):  # no ServerInfo
                async with derp_client.connect(url, stranger):
                    pass
        async with derp_client.connect(url, allowed) as c:
            assert await c.ping() >= 0
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0


def test_workers_metrics_are_summed_sample_by_sample():
    from derpd.workers import aggregate_metrics

    a = ('# HELP derp_packets_sent_total Sent.\n# TYPE derp_packets_sent_total counter\n'
         'derp_packets_sent_total 3.0\n# HELP derp_packets_dropped_total Dropped.\n'
         '# TYPE derp_packets_dropped_total counter\n'
         'derp_packets_dropped_total{kind="other",reason="queue_head"} 2.0\n')
    b = a.replace(" 3.0", " 4.0").replace(" 2.0", " 5.0")
    text = aggregate_metrics([a, b]).decode()
    assert "derp_packets_sent_total 7.0" in text
    assert 'derp_packets_dropped_total{kind="other",reason="queue_head"} 7.0' in text
    assert text.count("# TYPE derp_packets_sent_total counter") == 1


async def test_printed_and_registered_node_carry_the_bound_stun_port_and_the_names(nursery, tmp_path):
    """--stun-port 0 binds a free port: the node printed for the pinned certificate and the
    node registered with the coordinator both name that port, and the printed node takes
    --region-id and --node-name."""
    from tests.coordinator.conftest import http

    from stund.client import stun_query

    coordinator, registered, token_file = await start_coordinator(nursery, tmp_path)
    with trio.fail_after(30):
        proc = await nursery.start(lambda task_status: trio.run_process(
            [*DERPD, "serve", "-c", str(tmp_path / "k"), "-a", "127.0.0.1:0", "--certmode", "manual",
             "--certdir", str(tmp_path), "--hostname", "127.0.0.1", "--http-port", "-1", "--stun-port", "0",
             "--region-id", "901", "--node-name", "901s", "--coordinator", coordinator.url,
             "--coordinator-token-file", str(token_file)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=False, task_status=task_status))
        out = b""
        while not out.endswith(b"\n"):
            chunk = await proc.stdout.receive_some(4096)
            assert chunk, out
            out += chunk
        printed = json.loads(out)
        assert printed["Name"] == "901s" and printed["RegionID"] == 901
        stun_port = printed["STUNPort"]
        assert stun_port not in (0, 3478, -1)
        assert (await stun_query("127.0.0.1", stun_port, timeout=5)).address[0] == "127.0.0.1"
        await registered.wait()
        doc = json.loads((await http(coordinator.url + "/derpmap/default")).body)
        node = next(n for r in doc["Regions"].values() for n in r["Nodes"] if n["Name"] == "901s")
        assert node["STUNPort"] == stun_port and node["CertName"] == printed["CertName"]
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0
