"""``derpd check`` and ``derpd close-peer`` name the cause of a failure in one line (real
processes against relays on 127.0.0.1): an untrusted certificate and the name it was checked
for, a pin mismatch, a refused connection, a plain port spoken to with TLS, a login refused by
admission, and a wrong mesh key."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import trio

from derpd.keys import NodePrivate

from .conftest import start_relay
from .test_operator_errors import run

DERPD = [sys.executable, "-m", "derpd"]


def assert_cause(result, *needles: str) -> None:  # noqa: ANN001
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture
async def tls_relay(nursery, tmp_path):
    return await start_relay(nursery, certmode="manual", certdir=tmp_path, hostname="127.0.0.1")


async def test_untrusted_certificate_names_the_name(tls_relay):
    assert_cause(await run([*DERPD, "check", tls_relay.derp_url, "-n", "2"]),
                 "not trusted for the name '127.0.0.1'", "self-signed", "--cert-pin")


async def test_certificate_for_another_name_names_the_name(tls_relay):
    ca = str(tls_relay.server.cert.cert_path)
    assert_cause(await run([*DERPD, "check", tls_relay.derp_url, "-n", "2", "--ca-file", ca,
                            "--server-name", "derp.example.com"]),
                 "not trusted for the name 'derp.example.com'", "not valid for 'derp.example.com'")


async def test_pin_mismatch(tls_relay):
    assert_cause(await run([*DERPD, "check", tls_relay.derp_url, "-n", "2", "--cert-pin", "sha256-raw:" + "00" * 32]),
                 "pin mismatch", tls_relay.cert_pin)


async def test_connection_refused():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert_cause(await run([*DERPD, "check", f"http://127.0.0.1:{port}/derp", "-n", "2"]),
                 "connection refused", f"127.0.0.1:{port}")


async def test_tls_to_a_plain_port(relay):
    assert_cause(await run([*DERPD, "check", f"https://127.0.0.1:{relay.port}/derp", "-n", "2"]),
                 "TLS handshake", "http://")


async def test_login_refused_by_admission(relay):
    async def refuse(key, info, ip):  # noqa: ANN001, ANN202
        return False, "not_allowed"

    relay.server.admission_checks.append(refuse)
    assert_cause(await run([*DERPD, "check", relay.derp_url, "-n", "2"]), "refused the login", "admission")


@pytest.mark.parametrize("admission", [False, True], ids=["open relay", "relay with admission"])
async def test_close_peer_with_a_wrong_mesh_key(nursery, tmp_path: Path, admission):
    relay = await start_relay(nursery, mesh_key=os.urandom(32))
    if admission:
        async def refuse(key, info, ip):  # noqa: ANN001, ANN202
            return False, "not_allowed"

        relay.server.admission_checks.append(refuse)
    wrong = tmp_path / "mesh.key"
    wrong.write_text(os.urandom(32).hex())
    with trio.fail_after(30):
        result = await run([*DERPD, "close-peer", relay.derp_url, str(NodePrivate.generate().public),
                            "--mesh-psk-file", str(wrong)])
    assert_cause(result, "mesh key", "--mesh-psk-file")
