"""ACME failure behaviour without a real CA: a CA answering 5xx or garbage, a failed order
never touching --certdir, hostile TLS-ALPN peeks, the port-80 challenge path, and the
start-up errors of `derpd serve` (one line, exit 2)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trustme
from click.testing import CliRunner

from derpd.acme import AcmeConfig, AcmeManager, decode_eab_key, start_acme
from derpd.cli import main
from derpd.keyfile import load_or_create
from derpd.keys import NodePrivate
from derpd.relay.listener import RunningRelay, serve_relay
from derpd.settings import RelaySettings, SettingsError

from ..derpd.conftest import read_until_closed

DERPD = [sys.executable, "-m", "derpd"]
# derpd serves TLS (and so ACME) only on port 443, as derper: the real processes here listen on
# 443 of loopback addresses nothing else uses.
ACME_ADDR = "127.8.4.3:443"


async def serve_fake_ca(status: int, body: bytes, content_type: bytes = b"application/json", *,
                        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Answers every request with ``status`` and ``body`` (a CA that is down or broken)."""

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            head = b""
            with trio.move_on_after(5):
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    head += chunk
            await stream.send_all(b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                                  b"Connection: close\r\n\r\n%s" % (status, content_type, len(body), body))

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(answer, listeners)


async def acme_relay(nursery: trio.Nursery, certdir: Path, directory: str, **relay: object
                     ) -> tuple[RunningRelay, AcmeManager]:
    settings = RelaySettings(addr="127.0.0.1:0", private_key=NodePrivate.generate(), certmode="letsencrypt",
                             certdir=certdir, hostname="derp.test", http_port=0, **relay)  # type: ignore[arg-type]
    running = await nursery.start(serve_relay, settings)
    config = AcmeConfig(hostname="derp.test", certdir=certdir, directory=directory, backoff_min=0.1,
                        backoff_max=0.2)
    return running, await start_acme(running.server, config, nursery)


@pytest.mark.parametrize("status, body, content_type, expect", [
    (500, b"<html>oops</html>", b"text/html", "HTTP 500"),
    (503, b'{"type": "urn:ietf:params:acme:error:serverInternal", "detail": "down for maintenance"}',
     b"application/problem+json", "down for maintenance"),
    (200, b"this is not json", b"text/plain", "not ACME"),
    (200, b'{"hello": "world"}', b"application/json", "not ACME"),
])
async def test_broken_ca_is_retried_with_one_clear_line(nursery, tmp_path, caplog, status, body, content_type,
                                                         expect):
    with trio.fail_after(20):
        port = await nursery.start(serve_fake_ca, status, body, content_type)
        running, manager = await acme_relay(nursery, tmp_path, f"http://127.0.0.1:{port}/dir")
        while manager.failures < 3:  # keeps retrying, backing off
            await manager.wait_changed()
    assert expect in (manager.last_error or "")
    lines = [m for m in caplog.messages if m.startswith("ACME order for derp.test failed")]
    assert len(lines) >= 3 and all("\n" not in m and "retrying in" in m for m in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acme-account.key"]  # no certificate written
    assert running.server.ssl_context is None and manager.issued == 0
    text = running.server.metrics_text().decode()
    assert f"derp_acme_consecutive_failures {float(manager.consecutive_failures)}" in text
    assert manager.consecutive_failures >= 3


async def test_failed_renewal_never_touches_the_files_in_use(nursery, tmp_path):
    """A certificate due for renewal (two thirds of its life gone) and a CA answering 500:
    the files stay byte for byte, and the relay keeps serving that certificate."""
    ca = trustme.CA()
    now = dt.datetime.now(dt.timezone.utc)
    leaf = ca.issue_cert("derp.test", not_before=now - dt.timedelta(days=70), not_after=now + dt.timedelta(days=20))
    (tmp_path / "derp.test.crt").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(tmp_path / "derp.test.key"))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with trio.fail_after(20):
        port = await nursery.start(serve_fake_ca, 500, b"no", b"text/plain")
        running, manager = await acme_relay(nursery, tmp_path, f"http://127.0.0.1:{port}/dir")
        assert running.server.ssl_context is not None  # the cached certificate is in use at once
        assert manager.next_due() is not None and manager.next_due() <= 0
        while manager.failures < 2:
            await manager.wait_changed()
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
        tls = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", running.port), client_ctx,
                             server_hostname="derp.test")
        await tls.do_handshake()  # verified: still the cached certificate
        await tls.aclose()
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "acme-account.key"}
    assert after == before


async def test_port_80_answers_only_pending_tokens(nursery, tmp_path):
    """/.well-known/acme-challenge/ is never redirected: a pending token gets its key
    authorization, anything else 404 (also with --certmode manual)."""
    with trio.fail_after(20):
        port = await nursery.start(serve_fake_ca, 500, b"no", b"text/plain")
        running, manager = await acme_relay(nursery, tmp_path, f"http://127.0.0.1:{port}/dir")
        manager.offer("http-01", "derp.test", "tok_en-1", "tok_en-1.thumb")  # as an order in flight does
        for path, status, body in (
            (b"/.well-known/acme-challenge/tok_en-1", b"200", b"tok_en-1.thumb"),
            (b"/.well-known/acme-challenge/other", b"404", b""),
            (b"/.well-known/acme-challenge/", b"404", b""),
            (b"/elsewhere", b"302", b""),
        ):
            stream = await trio.open_tcp_stream("127.0.0.1", running.http_port)
            await stream.send_all(b"GET " + path + b" HTTP/1.1\r\nHost: derp.test\r\nConnection: close\r\n\r\n")
            response = await read_until_closed(stream)
            assert response.startswith(b"HTTP/1.1 " + status), (path, response)
            assert response.endswith(body)


async def test_stalled_or_garbage_hello_while_a_challenge_is_pending(nursery, tmp_path):
    """While TLS-ALPN-01 is pending connections are peeked at: a peer that stalls is closed
    after the (short) deadline, garbage is handed to OpenSSL and fails there, and a hello
    for acme-tls/1 naming another host gets no challenge certificate."""
    with trio.fail_after(20):
        port = await nursery.start(serve_fake_ca, 500, b"no", b"text/plain")
        running, manager = await acme_relay(nursery, tmp_path, f"http://127.0.0.1:{port}/dir", http_timeout=0.5)
        manager.offer("tls-alpn-01", "derp.test", "tok", "tok.thumb")
        stream = await trio.open_tcp_stream("127.0.0.1", running.port)
        await stream.send_all(b"\x16\x03\x01\x02\x00\x01")  # a hello that never completes
        assert await read_until_closed(stream) == b""
        stream = await trio.open_tcp_stream("127.0.0.1", running.port)
        await stream.send_all(b"GET / HTTP/1.1\r\n\r\n")
        assert await read_until_closed(stream) == b""  # no certificate yet: closed
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.set_alpn_protocols(["acme-tls/1"])
        s = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", running.port), ctx, server_hostname="other.test")
        with pytest.raises(trio.BrokenResourceError):
            await s.do_handshake()
        s = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", running.port), ctx, server_hostname="derp.test")
        await s.do_handshake()
        assert s.selected_alpn_protocol() == "acme-tls/1"
    stats = running.server.stats.handshake_failures
    assert stats["no_certificate"] >= 2 and stats["acme_tls_alpn_unknown"] == 1
    assert manager.answered["tls-alpn-01"] == 1


# ---------------------------------------------------------------------------- start-up errors


def serve(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["serve", "-a", ACME_ADDR, "--acme-directory", "http://127.0.0.1:9/dir",
                                       *args])
    return result.exit_code, result.output


@pytest.mark.parametrize("args, words", [
    (["--certmode", "letsencrypt", "--hostname", "203.0.113.7"], ["IP address", "--acme-ip-certs"]),
    (["--certmode", "letsencrypt", "--hostname", "derp.example.com", "--acme-ip-certs"], ["needs an IP"]),
    (["--certmode", "letsencrypt", "--hostname", "203.0.113.7", "--acme-ip-certs", "--http-port", "-1"],
     ["HTTP-01", "--http-port -1"]),
    (["--certmode", "gcp", "--hostname", "derp.example.com"], ["--acme-eab-kid", "--acme-eab-key"]),
    (["--certmode", "gcp", "--hostname", "derp.example.com", "--acme-eab-kid", "k", "--acme-eab-key", "a2V5"],
     ["--acme-email"]),
    (["--certmode", "gcp", "--hostname", "derp.example.com", "--acme-eab-kid", "k", "--acme-eab-key", "!!",
      "--acme-email", "a@b.c"], ["not valid base64"]),
    (["--certmode", "letsencrypt", "--hostname", "derp.example.com", "--workers", "2"], ["--workers"]),
    (["--certmode", "manual", "--acme-ip-certs"], ["--acme-ip-certs is for"]),
])
def test_acme_flag_errors_are_one_line_exit_2(tmp_path, args, words):
    code, output = serve("-c", str(tmp_path / "k"), "--certdir", str(tmp_path / "certs"), *args)
    assert code == 2 and output.count("\n") == 1 and output.startswith("derpd: "), output
    for word in words:
        assert word in output


def test_default_letsencrypt_directory_refuses_a_single_label_hostname(tmp_path):
    result = CliRunner().invoke(main, ["serve", "-c", str(tmp_path / "k"), "-a", ACME_ADDR, "--certmode",
                                       "letsencrypt", "--certdir", str(tmp_path), "--hostname", "localhost"])
    assert result.exit_code == 2 and "--hostname derp.example.com" in result.output


def test_unwritable_certdir_is_one_line_exit_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the certdir's parent should be")
    code, output = serve("-c", str(tmp_path / "k"), "--certmode", "letsencrypt", "--hostname", "derp.example.com",
                         "--certdir", str(blocker / "certs"))
    assert code == 2 and output.count("\n") == 1 and "cannot write to --certdir" in output


def test_port_80_taken_is_one_line_exit_2(tmp_path):
    load_or_create(tmp_path / "k")
    with socket.socket() as taken:
        taken.bind(("127.8.4.3", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([*DERPD, "serve", "-c", str(tmp_path / "k"), "-a", ACME_ADDR, "--stun-port", "-1",
                               "--certmode",
                               "letsencrypt", "--hostname", "derp.example.com", "--certdir", str(tmp_path / "c"),
                               "--http-port", str(port), "--acme-directory", "http://127.0.0.1:9/dir"],
                              capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f":{port}" in proc.stderr and "--http-port" in proc.stderr and "Traceback" not in proc.stderr


async def test_serve_with_a_broken_ca_keeps_running_and_says_why(nursery, tmp_path):
    """`derpd serve` as a real process, its CA answering 502: it starts, writes one line per
    failed attempt saying what the CA answered, and keeps going."""
    with trio.fail_after(30):
        ca_port = await nursery.start(serve_fake_ca, 502, b"bad gateway", b"text/plain")
        proc = await nursery.start(lambda task_status: trio.run_process(
            [*DERPD, "serve", "-c", str(tmp_path / "k"), "-a", "127.8.4.4:443", "--certmode", "letsencrypt",
             "--hostname", "derp.example.com", "--certdir", str(tmp_path / "c"), "--http-port", "0",
             "--stun-port", "-1", "--acme-directory", f"http://127.0.0.1:{ca_port}/dir"],
            stderr=subprocess.PIPE, check=False, task_status=task_status))
        buf = b""
        while b"retrying in" not in buf:
            chunk = await proc.stderr.receive_some(4096)
            assert chunk, buf.decode()
            buf += chunk
        assert proc.returncode is None
        proc.terminate()
    line = next(x for x in buf.decode().splitlines() if "failed" in x)
    assert "HTTP 502" in line and "has no certificate yet" in line and "Traceback" not in buf.decode()


def test_eab_key_accepts_base64url_and_standard():
    assert decode_eab_key("a2V5") == b"key"
    assert decode_eab_key("_-8") == b"\xff\xef"
    assert decode_eab_key("/+8=") == b"\xff\xef"
    with pytest.raises(SettingsError):
        decode_eab_key("!!")


def test_acme_config_defaults(tmp_path):
    cfg = AcmeConfig.from_options(certmode="gcp", hostname="Derp.Example.com", certdir=tmp_path, http_port=80,
                                  directory=None, email="a@b.c", eab_kid="k", eab_key="a2V5", ip_certs=False)
    assert cfg.directory.startswith("https://dv.acme-v02.api.pki.goog/") and cfg.name == "derp.example.com" and cfg.hostname == "Derp.Example.com"
    assert cfg.challenges == ("tls-alpn-01", "http-01") and cfg.eab_key == b"key"
    cfg = dataclasses.replace(cfg, ip_cert=False)
    le = AcmeConfig.from_options(certmode="letsencrypt", hostname="derp.example.com", certdir=tmp_path,
                                 http_port=-1, directory=None, email="", eab_kid="", eab_key="", ip_certs=False)
    assert le.directory == "https://acme-v02.api.letsencrypt.org/directory" and le.challenges == ("tls-alpn-01",)


async def test_derper_autocert_cache_is_adopted(nursery, tmp_path):
    """A --certdir that derper (Go's autocert) filled: its account key and its <hostname> file
    (EC key and chain in one PEM) are taken over; derper's files are left as they were."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    leaf = ca.issue_cert("derp.test", key_type=trustme.KeyType.ECDSA)
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    ec_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                               serialization.NoEncryption())
    assert ec_pem.startswith(b"-----BEGIN EC PRIVATE KEY-----")  # as autocert writes it
    (tmp_path / "derp.test").write_bytes(ec_pem + b"".join(p.bytes() for p in leaf.cert_chain_pems))
    account = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "acme_account+key").write_bytes(account.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    derper_files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with trio.fail_after(20):
        port = await nursery.start(serve_fake_ca, 500, b"no", b"text/plain")
        running, manager = await acme_relay(nursery, tmp_path, f"http://127.0.0.1:{port}/dir")
        assert running.server.ssl_context is not None and manager.next_due() > 0  # no order needed
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
        tls = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", running.port), client_ctx,
                             server_hostname="derp.test")
        await tls.do_handshake()
        await tls.aclose()
    ours = serialization.load_pem_private_key((tmp_path / "acme-account.key").read_bytes(), password=None)
    assert ours.private_numbers() == account.private_numbers()
    assert {n: (tmp_path / n).read_bytes() for n in derper_files} == derper_files
    assert manager.failures == 0 and (tmp_path / "derp.test.crt").exists()
