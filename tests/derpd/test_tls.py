"""TLS: --certmode manual files, self-signed IP certificates with a pin, the meta-certificate,
the port-80 companion, and the WebSocket stream adapter."""

from __future__ import annotations

import ssl
import stat
import warnings

import pytest
import trio
import trio.testing
import trustme
from cryptography import x509

from derpd import client as derp_client
from derpd.keys import NodePrivate
from derpd.protocol.messages import RecvPacket
from derpd.relay.tls import CertError, cert_file_base, load_manual_cert, make_meta_cert
from derpd.transport.websocket_stream import WebSocketStream

from .conftest import read_until_closed, recv_skipping_keepalives, start_relay


@pytest.fixture
def ca_and_certdir(tmp_path):
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    leaf.private_key_pem.write_to_path(tmp_path / "localhost.key")
    leaf.cert_chain_pems[0].write_to_path(tmp_path / "localhost.crt")
    return ca, tmp_path


async def test_manual_cert_tls_relay_and_http_redirect(nursery, ca_and_certdir):
    ca, certdir = ca_and_certdir
    relay = await start_relay(nursery, certmode="manual", certdir=certdir, hostname="localhost", http_port=0)
    assert relay.url.startswith("https://localhost:")
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    a, b = NodePrivate.generate(), NodePrivate.generate()
    with trio.fail_after(10):
        async with (
            derp_client.connect(relay.derp_url, a, ssl_context=ctx) as ca_client,
            derp_client.connect(relay.derp_url, b, ssl_context=ctx, server_key=relay.public_key) as cb,
            derp_client.connect(relay.derp_url.replace("https", "wss"), NodePrivate.generate(), ssl_context=ctx) as cw,
        ):
            await ca_client.send(b.public, b"over tls")
            assert await recv_skipping_keepalives(cb) == RecvPacket(a.public, b"over tls")
            await cb.send(cw.public_key, b"over wss")
            assert await recv_skipping_keepalives(cw) == RecvPacket(b.public, b"over wss")
        stream = await trio.open_tcp_stream("127.0.0.1", relay.http_port)
        await stream.send_all(b"GET /x?y=1 HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
        r = await read_until_closed(stream)
        # The target is --hostname and the relay's port, never the client's Host header.
        assert r.startswith(b"HTTP/1.1 302 ")
        assert b"location: https://localhost:%d/x?y=1\r\n" % relay.port in r.lower()
        stream = await trio.open_tcp_stream("127.0.0.1", relay.http_port)
        await stream.send_all(b"GET /generate_204 HTTP/1.1\r\nHost: x\r\nX-Tailscale-Challenge: ts_abc\r\n"
                              b"Connection: close\r\n\r\n")
        r = await read_until_closed(stream)
        assert r.startswith(b"HTTP/1.1 204 ") and b"response ts_abc" in r


async def test_self_signed_ip_cert_and_pin(nursery, tmp_path):
    relay = await start_relay(nursery, certmode="manual", certdir=tmp_path, hostname="127.0.0.1")
    assert relay.cert_pin and relay.cert_pin.startswith("sha256-raw:") and len(relay.cert_pin) == 11 + 64
    key_mode = stat.S_IMODE((tmp_path / "127.0.0.1.key").stat().st_mode)
    assert key_mode == 0o600
    a, b = NodePrivate.generate(), NodePrivate.generate()
    with trio.fail_after(10):
        async with (
            derp_client.connect(relay.derp_url, a, cert_pin=relay.cert_pin) as ca,
            derp_client.connect(relay.derp_url, b, cert_pin=relay.cert_pin) as cb,
        ):
            await ca.send(b.public, b"pinned")
            assert (await recv_skipping_keepalives(cb)).data == b"pinned"
        with pytest.raises(derp_client.DerpClientError, match="pin mismatch"):
            async with derp_client.connect(relay.derp_url, a, cert_pin="sha256-raw:" + "0" * 64):
                pass
    # The same files are reused on the next start: the pin is stable.
    assert load_manual_cert(tmp_path, "127.0.0.1").pin == relay.cert_pin


async def test_garbage_tls_handshake_closes_only_that_connection(nursery, tmp_path):
    relay = await start_relay(nursery, certmode="manual", certdir=tmp_path, hostname="127.0.0.1")
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
        await stream.send_all(b"\x16\x03\x01\x00\x05hello garbage" * 10)
        await read_until_closed(stream)
        async with derp_client.connect(relay.derp_url, NodePrivate.generate(), cert_pin=relay.cert_pin) as c:
            assert await c.ping() >= 0
    assert relay.server.stats.handshake_failures["tls"] == 1


def test_missing_cert_for_dns_name_says_what_to_do(tmp_path):
    with pytest.raises(CertError, match="put .*derp.example.com.crt"):
        load_manual_cert(tmp_path, "derp.example.com")


def test_cert_file_name_rule():
    assert cert_file_base("2001:db8::1") == "2001db81"
    assert cert_file_base("derp.example.com") == "derp.example.com"


def test_meta_certificate_fields():
    key = NodePrivate.generate().public
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        cert = x509.load_pem_x509_certificate(make_meta_cert(key))
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        assert cert.issuer == cert.subject
    assert cn == "derpkey" + key.hex()
    assert cert.serial_number == 2
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 60
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


async def test_websocket_stream_is_a_two_way_stream():
    async def make_pair():
        server_side, client_side = trio.testing.memory_stream_pair()
        return WebSocketStream(client_side, client=True), WebSocketStream(server_side)

    await trio.testing.check_two_way_stream(make_pair, None)
