"""Operating the relay: graceful shutdown, TLS reload, accept-rate and per-IP limits."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket

import trio
import trio.testing

from derpd import client as derp_client
from derpd.keys import NodePrivate
from derpd.protocol.messages import Health, PeerGone, RecvPacket, Restarting
from derpd.relay.tls import generate_self_signed_ip_cert

from .conftest import raw_connect, read_until_closed, recv_skipping_keepalives, start_relay


async def test_graceful_shutdown_sends_restarting_and_drains_queues(nursery):
    sender, receiver = NodePrivate.generate(), NodePrivate.generate()
    done = trio.Event()

    async def serve_until_shutdown(task_status: trio.TaskStatus) -> None:
        from derpd.relay.listener import serve_relay
        from derpd.settings import RelaySettings

        await serve_relay(RelaySettings(addr="127.0.0.1:0"), task_status=task_status)
        done.set()

    relay = await nursery.start(serve_until_shutdown)
    with trio.fail_after(20):
        async with (
            derp_client.connect(relay.derp_url, sender) as cs,
            derp_client.connect(relay.derp_url, receiver) as cr,
        ):
            # Fill the receiver's queue while its client does not read, then shut down.
            await cs.send_many([(receiver.public, i.to_bytes(4, "big")) for i in range(30)])
            await cs.ping()  # the relay has queued all 30
            relay.shutdown(grace=5.0)
            got, restarting = [], None
            while len(got) < 30 or restarting is None:
                ev = await recv_skipping_keepalives(cr)
                if isinstance(ev, Restarting):
                    restarting = ev
                elif isinstance(ev, Health):  # the user's warning, ahead of Restarting
                    assert "restarting" in ev.problem and restarting is None
                else:
                    assert isinstance(ev, RecvPacket)
                    got.append(int.from_bytes(ev.data, "big"))
            assert got == list(range(30))  # every accepted packet arrived, in order
            assert restarting.reconnect_in_ms > 0 and restarting.try_for_ms > 0
            await done.wait()
    assert relay.server.stats.dropped_packets["gone_disconnected", "other"] == 0
    with trio.fail_after(5):
        try:
            await trio.open_tcp_stream("127.0.0.1", relay.port)
        except OSError:
            pass  # no longer accepting
        else:
            raise AssertionError("the relay still accepts connections after shutdown")


async def test_tls_reload_keeps_connections_and_rejects_bad_certs(nursery, tmp_path):
    relay = await start_relay(nursery, certmode="manual", certdir=tmp_path, hostname="127.0.0.1")
    server = relay.server
    old_pin = relay.cert_pin
    a, b = NodePrivate.generate(), NodePrivate.generate()
    with trio.fail_after(10):
        async with derp_client.connect(relay.derp_url, a, cert_pin=old_pin) as ca:
            # A broken certificate file: the old one stays in use.
            crt = tmp_path / "127.0.0.1.crt"
            good = crt.read_bytes()
            crt.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot a cert\n-----END CERTIFICATE-----\n")
            assert server.reload_tls() is False
            assert server.stats.tls_reloads["error"] == 1
            async with derp_client.connect(relay.derp_url, b, cert_pin=old_pin) as cb:
                await cb.send(a.public, b"old cert still served")
                assert (await recv_skipping_keepalives(ca)).data == b"old cert still served"
            crt.write_bytes(good)
            # A new certificate: new connections get it; the open one keeps working.
            os.unlink(tmp_path / "127.0.0.1.key")
            os.unlink(crt)
            generate_self_signed_ip_cert("127.0.0.1", crt, tmp_path / "127.0.0.1.key")
            assert server.cert_files_changed()
            server.reload()
            new_pin = server.cert.pin
            assert new_pin != old_pin and server.stats.tls_reloads["ok"] == 1
            assert await recv_skipping_keepalives(ca) == PeerGone(b.public)  # b's first connection left
            async with derp_client.connect(relay.derp_url, b, cert_pin=new_pin) as cb:
                await cb.send(a.public, b"new cert")
                assert (await recv_skipping_keepalives(ca)).data == b"new cert"
    text = server.metrics_text()
    assert b"derp_tls_cert_not_after_seconds" in text


async def probe(relay) -> bytes:
    stream = await raw_connect(relay)
    await stream.send_all(b"GET /derp/probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    return await read_until_closed(stream)


async def test_accept_rate_limit_closes_surplus_and_keeps_accepting(nursery):
    relay = await start_relay(nursery, accept_connection_limit=1.0, accept_connection_burst=1)
    with trio.fail_after(10):
        answers = [await probe(relay) for _ in range(4)]
        closed = answers.count(b"")
        assert answers[0].startswith(b"HTTP/1.1 200 ") and closed >= 2  # burst 1, then 1/s
        while not (await probe(relay)).startswith(b"HTTP/1.1 200 "):  # tokens refill: still accepting
            closed += 1
    assert relay.server.stats.accepts_rejected["rate_limit"] == closed


async def test_per_ip_connection_cap(nursery):
    relay = await start_relay(nursery, max_connections_per_ip=2)
    with trio.fail_after(10):
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(2):
                await stack.enter_async_context(derp_client.connect(relay.derp_url, NodePrivate.generate()))
            stream = await raw_connect(relay)
            await stream.send_all(b"GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await read_until_closed(stream) == b""
            assert relay.server.stats.accepts_rejected["per_ip_limit"] == 1
        while relay.server.connections_per_ip:  # the two clients' connections wind down
            await trio.testing.wait_all_tasks_blocked()
        assert (await probe(relay)).startswith(b"HTTP/1.1 200 ")  # slots free again


async def test_accepted_connections_carry_keepalive_and_user_timeout(nursery):
    """Set once on the listener (P-32): every accepted connection must still have them."""
    relay = await start_relay(nursery, tcp_keepalive=37.0, tcp_user_timeout=9.0)
    key = NodePrivate.generate()
    with trio.fail_after(10):
        async with derp_client.connect(relay.derp_url, key):
            while key.public.raw not in relay.server.registry.active:
                await trio.testing.wait_all_tasks_blocked()
            sock = relay.server.registry.active[key.public.raw].stream.socket
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            if hasattr(socket, "TCP_KEEPIDLE"):
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 37
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 37
            if hasattr(socket, "TCP_USER_TIMEOUT"):
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 9000


async def test_out_of_descriptors_is_logged_once_and_accepting_resumes(nursery):
    """EMFILE on accept: one error line, the connection waits in the backlog, and it is
    served once descriptors are available again."""
    relay = await start_relay(nursery)
    logged = trio.Event()
    lines: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())
            logged.set()

    handler = Catch(logging.ERROR)
    logger = logging.getLogger("derpd.relay")
    logger.addHandler(handler)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with trio.fail_after(10):
            sock = trio.socket.socket()  # its descriptor exists before the limit drops
            resource.setrlimit(resource.RLIMIT_NOFILE, (3, hard))  # no new descriptor above 2
            try:
                await sock.connect(("127.0.0.1", relay.port))
                stream = trio.SocketStream(sock)
                await stream.send_all(b"GET /derp/probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                await logged.wait()
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            assert (await read_until_closed(stream)).startswith(b"HTTP/1.1 200 ")
    finally:
        logger.removeHandler(handler)
    assert len(lines) == 1 and "out of file descriptors" in lines[0]
