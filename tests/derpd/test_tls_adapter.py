"""The one adapter to trio's private ``SSLStream`` attributes (``session_of`` in
derpd/transport/tls_stream.py), on a real ``trio.SSLStream`` over a memory stream pair: it finds
the SSLObject and the two BIOs, and they are the ones the stream uses.  When trio changes its
internals this fails with the trio version and what to update."""

from __future__ import annotations

import ssl
import tempfile
from pathlib import Path

import pytest
import trio
import trio.testing

from derpd.transport.tls_stream import TRIO_PRIVATE, DrainingSSLStream, held_back, session_of


def _trio_changed(what: str) -> None:
    pytest.fail(f"trio {trio.__version__}: {what}.  trio.SSLStream's private attributes {TRIO_PRIVATE} changed: "
                "update session_of() in derpd/transport/tls_stream.py (until then TLS draining and the data "
                "plane's TLS takeover are off)", pytrace=False)


@pytest.fixture(scope="module")
def contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    import trustme

    ca = trustme.CA()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as d:
        pem = Path(d) / "server.pem"
        ca.issue_cert("derp.test").private_key_and_cert_chain_pem.write_to_path(str(pem))
        server.load_cert_chain(pem)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client)
    return server, client


async def _handshake(server: trio.abc.Stream, client: trio.SSLStream) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            nursery.start_soon(client.do_handshake)


async def test_the_adapter_finds_the_session_a_trio_sslstream_uses(contexts):
    server_ctx, client_ctx = contexts
    server_end, client_end = trio.testing.memory_stream_pair()
    server = trio.SSLStream(server_end, server_ctx, server_side=True)
    client = trio.SSLStream(client_end, client_ctx, server_hostname="derp.test")
    session = session_of(server)
    if session is None:
        _trio_changed("session_of() found no SSLObject and MemoryBIOs on a trio.SSLStream")
    await _handshake(server, client)
    if session.obj.version() is None:
        _trio_changed("the SSLObject found is not the one that made the handshake")
    tickets = held_back(server)
    if tickets is None or (session.obj.version() == "TLSv1.3" and not tickets):
        _trio_changed("held_back() found no session tickets held back after a TLS 1.3 handshake")
    with trio.fail_after(10):
        await server.send_all(b"through trio")  # sends what was held back first
        assert await client.receive_some(100) == b"through trio"
        if held_back(server) != b"":
            _trio_changed("held_back() still reports ciphertext after trio's first send")
        # what the SSLObject encrypts waits in the outgoing BIO, and is what trio would send
        session.obj.write(b"from the adapter")
        if not session.outgoing.pending:
            _trio_changed("the outgoing BIO found is not the SSLObject's")
        await server_end.send_all(session.outgoing.read())
        assert await client.receive_some(100) == b"from the adapter"
        # ciphertext written into the incoming BIO is what the SSLObject decrypts
        await client.send_all(b"to the adapter")
        session.incoming.write(await server_end.receive_some())
        try:
            got = session.obj.read(100)
        except ssl.SSLWantReadError:
            got = b""
        if got != b"to the adapter":
            _trio_changed(f"the incoming BIO found is not the SSLObject's (read {got!r})")


async def test_draining_returns_every_record_already_received(contexts):
    server_ctx, client_ctx = contexts
    server_end, client_end = trio.testing.memory_stream_pair()
    server = DrainingSSLStream(server_end, server_ctx, server_side=True)
    client = trio.SSLStream(client_end, client_ctx, server_hostname="derp.test")
    await _handshake(server, client)
    with trio.fail_after(10):
        for i in range(5):
            await client.send_all(b"record %d;" % i)  # one TLS record each
        got = await server.receive_some(65536)
    if got == b"record 0;":
        _trio_changed("a DrainingSSLStream returned one record where five were received")
    assert got == b"".join(b"record %d;" % i for i in range(5))
    assert server.takeover() is None  # not on a TCP socket: the data plane cannot take it over
