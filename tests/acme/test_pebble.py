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
from derpd.cli import node_registration
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
