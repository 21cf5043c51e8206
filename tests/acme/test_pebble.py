"""derpd's ACME client against a real ACME server (Pebble), on loopback.

Each test runs a derpd relay in-process with ``--certmode letsencrypt`` pointed at Pebble
(``--acme-directory``), Pebble's challenge ports pointed at the relay's TLS and HTTP ports and
its resolver at a DNS responder that answers 127.0.0.1, then checks the certificate a client
sees, verified against the root Pebble issued from.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import stat

import pytest
import trio
from cryptography import x509

from derpd import client as derp_client
from derpd.node import node_registration
from derpd.settings import NodeSettings
from derpd.keys import NodePrivate
from derpd.protocol.messages import RecvPacket

from ..derpd.conftest import recv_skipping_keepalives

pytestmark = pytest.mark.interop


async def served_leaf(port: int, server_name: str | None) -> x509.Certificate:
    """The leaf certificate the relay presents (not verified: for comparing serials)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), ctx, server_hostname=server_name)
    try:
        await stream.do_handshake()
        der = stream.getpeercert(binary_form=True)
    finally:
        await stream.aclose()
    return x509.load_der_x509_certificate(der)


async def relay_roundtrip(url: str, ctx: ssl.SSLContext, connect_host: str = "127.0.0.1") -> None:
    a, b = NodePrivate.generate(), NodePrivate.generate()
    async with (
        derp_client.connect(url, a, ssl_context=ctx, connect_host=connect_host) as ca,
        derp_client.connect(url, b, ssl_context=ctx, connect_host=connect_host) as cb,
    ):
        await ca.send(b.public, b"through an ACME certificate")
        assert await recv_skipping_keepalives(cb) == RecvPacket(a.public, b"through an ACME certificate")


@pytest.mark.parametrize("challenge", ["tls-alpn-01", "http-01"])
async def test_dns_name_certificate(start_acme_relay, challenge, tmp_path):
    with trio.fail_after(60):
        r = await start_acme_relay("derp.test", challenges=(challenge,))
        await r.wait_issued()
        ctx = await r.client_context()
        await relay_roundtrip(f"https://derp.test:{r.running.port}/derp", ctx)
    leaf = x509.load_pem_x509_certificate((tmp_path / "certs" / "derp.test.crt").read_bytes())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["derp.test"]
    for name in ("derp.test.key", "acme-account.key"):
        assert stat.S_IMODE((tmp_path / "certs" / name).stat().st_mode) == 0o600
    assert r.manager.failures == 0 and r.server.stats.tls_reloads["ok"] == 1
    assert r.manager.answered[challenge] >= 1 and sum(r.manager.answered.values()) == r.manager.answered[challenge]
    text = r.server.metrics_text().decode()
    assert 'derp_acme_attempts_total{result="ok"} 1.0' in text and "derp_acme_consecutive_failures 0.0" in text
    assert f'derp_acme_validations_answered_total{{challenge="{challenge}"}}' in text


async def test_ip_certificate_short_lived_profile(start_acme_relay, tmp_path):
    with trio.fail_after(60):
        r = await start_acme_relay("127.0.0.1", ip_cert=True)
        assert r.manager.config.challenges == ("http-01",)
        await r.wait_issued()
        ctx = await r.client_context()
        await relay_roundtrip(f"https://127.0.0.1:{r.running.port}/derp", ctx)
    leaf = x509.load_pem_x509_certificate((tmp_path / "certs" / "127.0.0.1.crt").read_bytes())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert abs(lifetime - dt.timedelta(seconds=518400)) < dt.timedelta(seconds=2)  # Pebble's shortlived profile
    assert r.manager.answered["http-01"] >= 1
    # Publicly trusted: no sha256-raw: pin in the DERP map entry registered for it.
    node = node_registration(NodeSettings(relay=r.server.settings), r.running, 3478)
    assert "CertName" not in node and node["HostName"] == "127.0.0.1"


async def test_renewal_while_a_client_stays_connected(start_acme_relay):
    """Pebble's 12-second profile: renewal is due 8 s after issuance.  Two clients stay
    logged in across it and keep relaying; a new connection sees the new certificate."""
    with trio.fail_after(90):
        r = await start_acme_relay("derp.test", profile="tiny")
        await r.wait_issued()
        ctx = await r.client_context()
        first = await served_leaf(r.running.port, "derp.test")
        url = f"https://derp.test:{r.running.port}/derp"
        a, b = NodePrivate.generate(), NodePrivate.generate()
        async with (
            derp_client.connect(url, a, ssl_context=ctx, connect_host="127.0.0.1") as ca,
            derp_client.connect(url, b, ssl_context=ctx, connect_host="127.0.0.1") as cb,
        ):
            await ca.send(b.public, b"before")
            assert await recv_skipping_keepalives(cb) == RecvPacket(a.public, b"before")
            await r.wait_issued(2)
            second = await served_leaf(r.running.port, "derp.test")
            assert second.serial_number != first.serial_number
            assert second.not_valid_after_utc > first.not_valid_after_utc
            await ca.send(b.public, b"after")
            assert await recv_skipping_keepalives(cb) == RecvPacket(a.public, b"after")
            await cb.send(a.public, b"and back")
            assert await recv_skipping_keepalives(ca) == RecvPacket(b.public, b"and back")
        await relay_roundtrip(url, ctx)  # new connections verify the renewed certificate
    assert r.server.stats.tls_reloads == {"ok": 2, "error": 0}
    assert r.server.stats.handshake_failures["no_certificate"] == 0


async def test_ca_down_at_start_then_up(start_acme_relay, nursery, caplog):
    """No CA: the relay runs, refuses TLS clients (it has no certificate), says why, and keeps
    retrying; once the CA is up, the certificate arrives."""
    with trio.fail_after(60):
        r = await start_acme_relay("derp.test", start_pebble=False)
        await r.wait(lambda: r.manager.failures >= 2)
        assert "cannot connect to the CA" in r.manager.last_error
        lines = [m for m in caplog.messages if "ACME order for derp.test failed" in m]
        assert lines and "the relay has no certificate yet" in lines[0] and "\n" not in lines[0]
        stream = await trio.open_tcp_stream("127.0.0.1", r.running.port)
        with pytest.raises(trio.BrokenResourceError):
            s = trio.SSLStream(stream, ssl.create_default_context(), server_hostname="derp.test")
            await s.do_handshake()
        assert r.server.stats.handshake_failures["no_certificate"] >= 1
        await r.pebble.start(nursery)
        await r.wait(lambda: r.manager.issued >= 1)
        await relay_roundtrip(f"https://derp.test:{r.running.port}/derp", await r.client_context())


async def test_ca_down_during_renewal_keeps_the_certificate(start_acme_relay, nursery, tmp_path):
    """The CA goes away before renewal: the relay keeps serving the certificate it has and
    its files stay as they were; when a CA is back, renewal succeeds."""
    with trio.fail_after(90):
        r = await start_acme_relay("derp.test", profile="tiny")
        await r.wait_issued()
        first = await served_leaf(r.running.port, "derp.test")
        files = {p.name: p.read_bytes() for p in (tmp_path / "certs").iterdir()}
        await r.pebble.stopped()
        await r.wait(lambda: r.manager.failures >= 2)
        assert "cannot connect to the CA" in r.manager.last_error
        assert (await served_leaf(r.running.port, "derp.test")).serial_number == first.serial_number
        assert {p.name: p.read_bytes() for p in (tmp_path / "certs").iterdir()} == files
        await r.pebble.start(nursery)  # a new Pebble: new roots, the account is registered again
        await r.wait(lambda: r.manager.issued >= 2)
        assert (await served_leaf(r.running.port, "derp.test")).serial_number != first.serial_number


async def test_external_account_binding(start_acme_relay):
    """--certmode gcp's external account binding against a Pebble that requires it: without
    the binding the CA's refusal is the logged reason; with it the certificate is issued."""
    from derpd.acme import decode_eab_key

    from .pebble_harness import EAB_KEYS

    with trio.fail_after(60):
        refused = await start_acme_relay("derp.test", eab_required=True)
        await refused.wait(lambda: refused.manager.failures >= 1)
        assert "externalAccountRequired" in refused.manager.last_error, refused.manager.last_error
        refused.pebble.stop()
        r = await start_acme_relay("derp.test", eab_required=True, email="ops@derp.test", eab_kid="kid-1",
                                   eab_key=decode_eab_key(EAB_KEYS["kid-1"]), certdir=refused.manager.config.certdir.parent / "eab")
        await r.wait_issued()
        await relay_roundtrip(f"https://derp.test:{r.running.port}/derp", await r.client_context())


async def test_directory_tls_is_verified_with_ssl_cert_file(start_acme_relay, monkeypatch, pebble_build):
    """No CA file given: the directory's certificate is checked against the system roots (which
    do not know Pebble's test CA, so the attempt fails and says so), or SSL_CERT_FILE."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    with trio.fail_after(60):
        r = await start_acme_relay("derp.test", ca_file=None)
        await r.wait(lambda: r.manager.failures >= 1)
        assert "TLS verification of the CA failed" in r.manager.last_error and "SSL_CERT_FILE" in r.manager.last_error
        monkeypatch.setenv("SSL_CERT_FILE", str(pebble_build.minica))
        await r.wait(lambda: r.manager.issued >= 1)


async def test_derpd_serve_process_gets_and_uses_a_certificate(pebble_build, nursery, tmp_path):
    """The command line end to end: `derpd serve --hostname localhost --acme-directory <Pebble>`
    as a real process on port 443 (of a loopback address nothing else uses; derpd, as derper,
    runs ACME only there), Pebble's own TLS trusted through SSL_CERT_FILE; then `derpd check`
    through the certificate it obtained, trusting Pebble's root."""
    import os
    import subprocess
    import sys

    from .pebble_harness import Pebble, serve_dns, unused_tcp_port

    ip = "127.8.4.5"
    http_port = unused_tcp_port(ip)
    with trio.fail_after(90):
        dns_port = await nursery.start(serve_dns, ip)
        pebble = Pebble(pebble_build, tmp_path, dns_port, http_port=http_port, tls_port=443)
        await pebble.start(nursery)
        env = dict(os.environ, SSL_CERT_FILE=str(pebble_build.minica))
        proc = await nursery.start(lambda task_status: trio.run_process(
            [sys.executable, "-m", "derpd", "serve", "-c", str(tmp_path / "k"), "-a", f"{ip}:443",
             "--http-port", str(http_port), "--stun-port", "-1", "--hostname", "localhost",
             "--certdir", str(tmp_path / "certs"), "--acme-directory", pebble.directory],
            stderr=subprocess.PIPE, env=env, check=False, task_status=task_status))
        try:
            buf = b""
            while b"certificate for localhost issued" not in buf:
                chunk = await proc.stderr.receive_some(4096)
                assert chunk, buf.decode()
                buf += chunk
            root = tmp_path / "root.pem"
            root.write_bytes(await pebble.root_pem())
            check = await trio.run_process(
                [sys.executable, "-m", "derpd", "check", f"https://{ip}/derp", "--server-name", "localhost",
                 "--ca-file", str(root), "-n", "20"], capture_stdout=True, capture_stderr=True, check=False)
        finally:
            proc.terminate()
            pebble.stop()
    assert check.returncode == 0 and b"delivered 20/20" in check.stdout, check.stdout + check.stderr
    assert b"Traceback" not in buf and b"sha256-raw" not in buf and b"self-signed" not in buf
