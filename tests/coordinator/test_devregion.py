"""`derpd dev`: certificates, the in-process region, and a clean stop on Ctrl-C."""

from __future__ import annotations

import datetime as dt
import json
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from derpd.coordinator.httpclient import request
from derpd.devregion import RunningDevRegion, ensure_dev_certs, serve_dev_region
from derpd.keys import NodePrivate


def _relay_tls_works() -> bool:
    try:
        from derpd.relay.tls import make_meta_cert
        make_meta_cert(NodePrivate.generate().public)
    except ValueError:
        return False
    return True


needs_relay_tls = pytest.mark.xfail(
    not _relay_tls_works(), strict=True,
    reason="derpd/relay/tls.py: meta-cert CN longer than 64 characters is rejected by cryptography")


def test_certs_chain_to_ca_and_are_reused(tmp_path: Path) -> None:
    certs = ensure_dev_certs(tmp_path)
    ctx = ssl.create_default_context(cafile=str(certs.ca_path))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certs.cert_path, certs.key_path)
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):  # drive the handshake in memory: the leaf verifies against ca.pem for localhost
        for side in (client, srv):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    client.do_handshake()
    assert client.getpeercert()["subject"] == ((("commonName", "localhost"),),)
    assert certs.pin.startswith("sha256-raw:") and len(certs.pin) == 75
    assert (certs.key_path.stat().st_mode & 0o777) == 0o600
    assert ensure_dev_certs(tmp_path).pin == certs.pin  # reused while valid
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=85)
    assert ensure_dev_certs(tmp_path, now=later).pin != certs.pin  # renewed before derpprobe's 7-day limit


@needs_relay_tls
async def test_dev_region_serves_a_healthy_map(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        region: RunningDevRegion = await nursery.start(lambda task_status: serve_dev_region(
            tmp_path, relay_port=0, stun_port=0, map_port=0, task_status=task_status))
        await region.coordinator.prober.wait_round()
        resp = await request(region.map_url)
        status = json.loads((await request(region.coordinator.url + "/status.json")).body)
    node = json.loads(resp.body)["Regions"]["900"]["Nodes"][0]
    assert node == {"Name": "900a", "RegionID": 900, "HostName": "localhost", "CertName": region.certs.pin,
                    "IPv4": "127.0.0.1", "STUNPort": region.stun_port, "DERPPort": region.relay_port}
    probed = status["regions"][0]["nodes"][0]
    assert probed["status"] == "up", probed["last_error"]
    banner = region.banner()
    assert f"SSL_CERT_FILE={region.certs.ca_path} derpprobe -derp-map={region.map_url} -once" in banner
    assert f"      - {region.map_url}" in banner


@needs_relay_tls
async def test_dev_command_stops_on_ctrl_c(tmp_path: Path) -> None:
    code = ("from derpd.cli import main; main(['dev', '--dir', %r, '--derp-port', '0', "
            "'--stun-port', '0', '--map-port', '0'])" % str(tmp_path))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proc = await nursery.start(lambda task_status: trio.run_process(
                [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False,
                task_status=task_status))
            out = b""
            while b"headscale config" not in out:
                chunk = await proc.stdout.receive_some(65536)
                assert chunk, (out + await proc.stderr.receive_some(65536)).decode()
                out += chunk
            proc.send_signal(signal.SIGINT)
            while chunk := await proc.stdout.receive_some(65536):
                out += chunk
            await proc.wait()
    assert proc.returncode == 0
    text = out.decode()
    assert "DERP map     http://127.0.0.1:" in text and "derpd dev: stopped" in text
