"""``derpd doctor``: each check passes against a healthy node and fails against one that has
that problem (a wrong pin, an expired or untrusted certificate, no STUN, port 80 closed, a key
the allow-list refuses, a wrong mesh key, a coordinator without the node, a skewed clock, a
server that is no relay, a TLS terminator hiding the meta-certificate), all on loopback."""

from __future__ import annotations

import datetime as dt
import email.utils
import ipaddress
import json
import os
import socket
import ssl
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from derpd import client as derp_client
from derpd.admission import AllowList
from derpd.cli import main
from derpd.doctor import FAIL, OK, SKIP, WARN, DoctorOptions, Finding, parse_key_arg, run_doctor
from derpd.keys import NodePrivate
from stund.server import serve_stun

from ..coordinator.conftest import FakeProbe, make_config, register
from .conftest import start_relay
from .test_mesh import MESH_KEY, free_ports, start_node, wait_mesh
from .test_operator_errors import run

DERPD = [sys.executable, "-m", "derpd"]
T = 1.0  # the doctor's step timeout in these tests: every answer here is local


def closed_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def doctor(url: str, **options: object) -> dict[str, Finding]:
    options.setdefault("timeout", T)
    options.setdefault("stun_port", -1)
    options.setdefault("http_port", -1)
    with trio.fail_after(60):
        findings = await run_doctor(DoctorOptions(url, **options))  # type: ignore[arg-type]
    assert all(f.status in (OK, WARN, FAIL, SKIP) and f.text and "\n" not in f.text for f in findings)
    return {f.check if not f.check.startswith("port ") else "port80": f for f in findings}


def assert_status(found: dict[str, Finding], check: str, status: str, *needles: str) -> None:
    f = found[check]
    assert f.status == status, f.line()
    for needle in needles:
        assert needle in f.text, (needle, f.line())


def write_cert(certdir: Path, *, days_left: float, valid_days: float = 90) -> None:
    """A self-signed certificate for 127.0.0.1 that ends ``days_left`` days from now."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    end = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=days_left)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(end - dt.timedelta(days=valid_days)).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    certdir.mkdir(parents=True, exist_ok=True)
    (certdir / "127.0.0.1.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (certdir / "127.0.0.1.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))


async def tiny_http_server(nursery: trio.Nursery, *, skew: float = 0.0, ssl_context: ssl.SSLContext | None = None,
                           status: bytes = b"404 Not Found") -> int:
    """Answers every request with ``status`` and a Date ``skew`` seconds off; returns its port."""

    async def handle(stream: trio.abc.Stream) -> None:
        if ssl_context is not None:
            stream = trio.SSLStream(stream, ssl_context, server_side=True)
        try:
            with trio.fail_after(10):
                got = b""
                while b"\r\n\r\n" not in got:
                    data = await stream.receive_some(4096)
                    if not data:
                        return
                    got += data
                date = email.utils.formatdate(time.time() + skew, usegmt=True).encode()
                await stream.send_all(b"HTTP/1.1 " + status + b"\r\nDate: " + date
                                      + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        except (trio.BrokenResourceError, trio.TooSlowError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


@pytest.fixture
async def tls_relay(nursery, tmp_path):
    return await start_relay(nursery, certmode="manual", certdir=tmp_path / "certs", hostname="127.0.0.1",
                             http_port=0)


@pytest.fixture
async def coordinator(nursery):
    from derpd.coordinator.server import serve_coordinator

    with trio.fail_after(10):
        return await nursery.start(lambda task_status: serve_coordinator(
            make_config(), listen="127.0.0.1:0", probe=FakeProbe(), probing=False, task_status=task_status))


# ---------------------------------------------------------------------------- a healthy node


async def test_every_check_passes_on_a_healthy_tls_node(nursery, tls_relay, coordinator):
    stun = await nursery.start(lambda task_status: serve_stun([("127.0.0.1", 0)], task_status=task_status))
    doc = {"Name": "900z", "RegionID": 900, "HostName": "127.0.0.1", "IPv4": "127.0.0.1",
           "DERPPort": tls_relay.port, "CertName": tls_relay.cert_pin, "PublicKey": str(tls_relay.public_key)}
    assert (await register(coordinator.url, doc)).status == 200
    found = await doctor(tls_relay.derp_url, cert_pin=tls_relay.cert_pin, stun_port=stun[0][1],
                         http_port=tls_relay.http_port, key=NodePrivate.generate(), coordinators=[coordinator.url])
    for check in ("dns", "connect", "tls", "upgrade", "fast start", "websocket", "stun", "port80", "clock", "key",
                  "coordinator"):
        assert found[check].status == OK, found[check].line()
    assert_status(found, "tls", OK, "matches the pin", "expires", "TLSv1.3")
    assert_status(found, "upgrade", OK, str(tls_relay.public_key))
    assert_status(found, "fast start", OK, tls_relay.public_key.short())
    assert_status(found, "stun", OK, "reflexive address is 127.0.0.1:")
    assert_status(found, "coordinator", OK, "'900z'", "region 900")
    assert_status(found, "mesh", SKIP, "--mesh-psk-file")


async def test_a_chain_trusted_through_the_ca_file_and_a_plain_node(tls_relay, relay):
    ca = str(tls_relay.server.cert.cert_path)
    found = await doctor(tls_relay.derp_url, ca_file=ca)
    assert_status(found, "tls", OK, "trusted for '127.0.0.1' (by --ca-file)")
    found = await doctor(f"http://localhost:{relay.port}/derp", http_port=relay.port)
    assert_status(found, "dns", OK, "localhost -> ", "127.0.0.1")
    assert_status(found, "tls", SKIP, "http://")
    assert_status(found, "fast start", SKIP)
    for check in ("upgrade", "websocket", "port80", "clock"):
        assert found[check].status == OK, found[check].line()


# ---------------------------------------------------------------------------- TLS


async def test_wrong_pin_and_untrusted_certificate_fail_and_name_the_pin(tls_relay):
    found = await doctor(tls_relay.derp_url, cert_pin="sha256-raw:" + "00" * 32)
    assert_status(found, "tls", FAIL, "does not match the pin", tls_relay.cert_pin)
    found = await doctor(tls_relay.derp_url)  # no pin, no CA: the self-signed certificate is not trusted
    assert_status(found, "tls", FAIL, "not trusted for '127.0.0.1'", f"CertName {tls_relay.cert_pin}")


@pytest.mark.parametrize(("days_left", "status", "words"), [
    (-3, FAIL, "expired"), (3, WARN, "renew it now"), (60, OK, "expires")])
async def test_certificate_expiry(nursery, tmp_path, days_left, status, words):
    write_cert(tmp_path / "certs", days_left=days_left)
    relay = await start_relay(nursery, certmode="manual", certdir=tmp_path / "certs", hostname="127.0.0.1")
    found = await doctor(relay.derp_url, cert_pin=relay.cert_pin)
    assert_status(found, "tls", status, words)


async def test_a_tls_terminator_without_the_meta_certificate_and_no_relay_behind_it(nursery, tmp_path):
    write_cert(tmp_path, days_left=60)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(tmp_path / "127.0.0.1.crt"), str(tmp_path / "127.0.0.1.key"))
    port = await tiny_http_server(nursery, ssl_context=ctx)
    found = await doctor(f"https://127.0.0.1:{port}/derp", ca_file=str(tmp_path / "127.0.0.1.crt"))
    assert_status(found, "tls", OK)
    assert_status(found, "fast start", WARN, "no meta-certificate")
    assert_status(found, "upgrade", FAIL, "no 101", "404")
    assert_status(found, "websocket", FAIL, "no 101")


async def tls_proxy(nursery: trio.Nursery, backend: int, ctx: ssl.SSLContext) -> int:
    """A TLS terminator in front of the plain relay port ``backend``; returns its port."""

    async def pipe(src: trio.abc.Stream, dst: trio.abc.Stream) -> None:
        try:
            while data := await src.receive_some(65536):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await trio.aclose_forcefully(dst)

    async def handle(stream: trio.SocketStream) -> None:
        front = trio.SSLStream(stream, ctx, server_side=True)
        with trio.move_on_after(20):
            back = await trio.open_tcp_stream("127.0.0.1", backend)
            async with trio.open_nursery() as inner:
                inner.start_soon(pipe, front, back)
                inner.start_soon(pipe, back, front)

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


@pytest.mark.parametrize("meta", [None, "another node's"], ids=["no meta-certificate", "another node's"])
async def test_fast_start_behind_a_tls_terminator(nursery, tmp_path, relay, meta):
    from derpd.relay.tls import make_meta_cert

    write_cert(tmp_path, days_left=60)
    chain = tmp_path / "chain.pem"
    extra = make_meta_cert(NodePrivate.generate().public).decode() if meta else ""
    chain.write_text((tmp_path / "127.0.0.1.crt").read_text() + extra)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(chain), str(tmp_path / "127.0.0.1.key"))
    port = await tls_proxy(nursery, relay.port, ctx)
    found = await doctor(f"https://127.0.0.1:{port}/derp", ca_file=str(tmp_path / "127.0.0.1.crt"))
    assert_status(found, "upgrade", OK, str(relay.public_key))
    if meta:
        assert_status(found, "fast start", FAIL, "names [", f"relay is {relay.public_key.short()}")
    else:
        assert_status(found, "fast start", WARN, "no meta-certificate", "pass TLS through")


# ---------------------------------------------------------------------------- reachability


async def test_unresolvable_name_and_closed_port():
    found = await doctor("https://name.invalid/derp")
    assert_status(found, "dns", FAIL, "does not resolve")
    assert_status(found, "upgrade", SKIP, "does not answer")
    port = closed_port()
    found = await doctor(f"http://127.0.0.1:{port}/derp")
    assert_status(found, "connect", FAIL, "connection refused")
    for check in ("tls", "upgrade", "websocket", "key", "mesh"):
        assert found[check].status == SKIP, found[check].line()


async def test_no_stun_and_port_80_closed(relay):
    found = await doctor(relay.derp_url, stun_port=closed_port(socket.SOCK_DGRAM), http_port=closed_port())
    assert_status(found, "stun", FAIL, "no STUN answer", "open UDP")
    assert_status(found, "port80", FAIL, "connection refused", "--http-port")


async def test_port_80_held_by_another_server(nursery, relay):
    port = await tiny_http_server(nursery, status=b"200 OK")
    found = await doctor(relay.derp_url, http_port=port)
    assert_status(found, "port80", FAIL, "answered 200, not 204")


@pytest.mark.parametrize(("skew", "status"), [(600, FAIL), (-20, WARN)])
async def test_skewed_clock(nursery, skew, status):
    port = await tiny_http_server(nursery, skew=skew)
    found = await doctor(f"http://127.0.0.1:{port}/derp")
    assert_status(found, "clock", status, "ahead of" if skew > 0 else "behind")
    assert_status(found, "upgrade", FAIL, "404")


# ---------------------------------------------------------------------------- admission, mesh, coordinator


async def test_key_refused_by_the_allow_list_names_the_reason(relay, tmp_path):
    allowed, refused = NodePrivate.generate(), NodePrivate.generate()
    (tmp_path / "allow").write_text(f"{allowed.public}\n")
    allow = AllowList(tmp_path / "allow")
    allow.load()
    relay.server.admission_checks.append(allow.check)
    found = await doctor(relay.derp_url, key=refused)
    assert_status(found, "key", FAIL, str(refused.public), "--allow-keys", "not_allowed")
    found = await doctor(relay.derp_url, key=allowed)
    assert_status(found, "key", OK, "admitted")


async def test_mesh_peers_and_a_connected_public_key(nursery):
    ports = await free_ports(2)
    nodes = [await start_node(nursery, NodePrivate.generate(), ports[i], [ports[1 - i]]) for i in range(2)]
    client = NodePrivate.generate()
    with trio.fail_after(20):
        async with derp_client.connect(nodes[0].url, client):
            await wait_mesh(nodes, [client])
            found = await doctor(nodes[0].url, mesh_key=MESH_KEY, key=client.public)
            assert_status(found, "mesh", OK, "1 mesh peer connected", nodes[1].running.public_key.short(),
                          "(1 clients)")
            assert_status(found, "key", OK, "connected to this node now")
            found = await doctor(nodes[0].url, mesh_key=MESH_KEY, key=NodePrivate.generate().public)
            assert_status(found, "key", WARN, "not connected")
    found = await doctor(nodes[0].url, mesh_key=os.urandom(32))
    assert_status(found, "mesh", FAIL, "does not take this mesh key")


async def test_a_lone_node_has_no_mesh_peers(nursery):
    node = await start_relay(nursery, mesh_key=MESH_KEY)
    found = await doctor(node.derp_url, mesh_key=MESH_KEY)
    assert_status(found, "mesh", WARN, "no mesh peer", "--mesh-with")


async def test_coordinator_without_the_node_and_one_that_is_down(relay, coordinator):
    down = f"http://127.0.0.1:{closed_port()}"
    with trio.fail_after(30):
        findings = await run_doctor(DoctorOptions(relay.derp_url, timeout=T, stun_port=-1, http_port=-1,
                                                  coordinators=[coordinator.url, down]))
    first, second = (f for f in findings if f.check == "coordinator")
    assert first.status == FAIL and "is not in its published map" in first.text and "/status" in first.text, first
    assert second.status == FAIL and down in second.text and "connect" in second.text, second


# ---------------------------------------------------------------------------- the command


def test_key_argument_forms(tmp_path):
    key = NodePrivate.generate()
    (tmp_path / "derper.key").write_text(json.dumps({"PrivateKey": str(key)}))
    (tmp_path / "pub").write_text(f"{key.public}\n")
    assert parse_key_arg(str(tmp_path / "derper.key")).public == key.public
    assert parse_key_arg(str(tmp_path / "pub")) == key.public
    assert parse_key_arg(str(key.public)) == key.public
    result = CliRunner().invoke(main, ["doctor", "127.0.0.1", "--key", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "cannot read it" in result.output, result.output
    result = CliRunner().invoke(main, ["doctor", "127.0.0.1", "--key", "nodekey:zz"])
    assert result.exit_code == 2 and "no nodekey:<64 hex>" in result.output, result.output


async def test_the_command_prints_one_line_per_check_and_exits_1_on_a_failure(relay):
    argv = ["doctor", relay.derp_url, "--timeout", "1s", "--stun-port", str(closed_port(socket.SOCK_DGRAM)),
            "--http-port", str(relay.port)]
    result = await run([*DERPD, *argv])
    out = result.stdout.decode()
    assert result.returncode == 1 and result.stderr == b"", result.stderr
    lines = out.splitlines()
    assert len(lines) == 11 and all(line.split()[0] in (OK, WARN, FAIL, SKIP) for line in lines), out
    assert [line.split()[0] for line in lines if line.split()[1] == "stun"] == [FAIL], out
    # the same without the failing check: exit 0
    argv[argv.index("--stun-port") + 1] = "-1"
    result = await trio.to_thread.run_sync(lambda: CliRunner().invoke(main, argv))
    assert result.exit_code == 0 and "fail " not in result.output, result.output


async def hostile_server(nursery: trio.Nursery, answer: bytes | None) -> int:
    """Sends ``answer`` (garbage) to every connection, or with None holds it silently."""

    async def handle(stream: trio.SocketStream) -> None:
        with trio.move_on_after(20):
            try:
                if answer is not None:
                    await stream.send_all(answer)
                await trio.sleep_forever()
            except trio.BrokenResourceError:
                pass

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


@pytest.mark.parametrize("answer", [b"SSH-2.0-OpenSSH_9.6\r\n" + b"x" * 70000, None], ids=["garbage", "silent"])
async def test_a_server_that_is_no_relay_never_hangs_the_doctor(nursery, answer):
    port = await hostile_server(nursery, answer)
    key = NodePrivate.generate()
    start = trio.current_time()
    found = await doctor(f"http://127.0.0.1:{port}/derp", timeout=0.5, key=key, mesh_key=MESH_KEY, http_port=port)
    for check in ("upgrade", "websocket", "port80", "key", "mesh"):
        assert found[check].status == FAIL, found[check].line()
    words = "does not answer in HTTP/1.1" if answer else "no answer within 0.5s"
    assert words in found["key"].text, found["key"].line()
    assert trio.current_time() - start < 30
    # derpd check names the same cause in one line
    result = await trio.to_thread.run_sync(lambda: CliRunner().invoke(
        main, ["check", f"http://127.0.0.1:{port}/derp", "--timeout", "0.5"]))
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and result.exception.__class__ is SystemExit, \
        result.output


@pytest.mark.parametrize("url", ["https://[::1/derp", "ftp://127.0.0.1/derp", "https://127.0.0.1:99999/derp",
                                 "http://:80/derp", ""])
def test_a_url_that_is_no_relay_url_is_a_usage_error(url):
    result = CliRunner().invoke(main, ["doctor", url])
    assert result.exit_code == 2 and "is not a relay URL" in result.stderr and result.stdout == "", result.output
