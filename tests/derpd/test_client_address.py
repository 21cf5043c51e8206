"""Real client addresses behind proxies: the PROXY protocol on the relay listener (from
trusted proxies only) and X-Forwarded-For on plain HTTP; the address feeds the per-IP limit,
admission's Source, the registry (logs, PeerPresent) and the /metrics loopback check."""

from __future__ import annotations

import pytest
import trio

from derpd import client as derp_client
from derpd.keys import NodePrivate
from derpd.protocol.proxy import encode_v1, encode_v2
from derpd.relay.client_address import client_from_forwarded_for, parse_cidrs

from .conftest import assert_relay_still_serves, http, raw_connect, read_until_closed, recv_skipping_keepalives, start_relay


async def pipe(src: trio.abc.Stream, dst: trio.abc.Stream) -> None:
    try:
        while data := await src.receive_some(65536):
            await dst.send_all(data)
        await dst.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def start_proxy(nursery: trio.Nursery, relay_port: int, header_for) -> int:
    """A TCP proxy on 127.0.0.1 that opens each connection to the relay with
    ``header_for(n)`` (n counts connections), then relays bytes both ways, as HAProxy's
    ``send-proxy`` does.  Returns its port."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    count = 0

    async def handle(client: trio.SocketStream) -> None:
        nonlocal count
        count += 1
        upstream = await trio.open_tcp_stream("127.0.0.1", relay_port)
        await upstream.send_all(header_for(count))
        async with client, upstream, trio.open_nursery() as n:
            n.start_soon(pipe, client, upstream)
            n.start_soon(pipe, upstream, client)

    nursery.start_soon(trio.serve_listeners, handle, listeners)
    return listeners[0].socket.getsockname()[1]


@pytest.mark.parametrize("encode", [encode_v1, encode_v2], ids=["v1", "v2"])
async def test_proxy_protocol_names_the_client(nursery, encode):
    relay = await start_relay(nursery, proxy_protocol=True, trusted_proxies=("127.0.0.1",),
                              max_connections_per_ip=1)
    sources = []

    async def record(key, info, ip):
        sources.append(ip)
        return True, ""

    relay.server.admission_checks.append(record)
    port = await start_proxy(nursery, relay.port, lambda n: encode((f"198.51.100.{n}", 40000 + n),
                                                                   ("192.0.2.1", 443)))
    url = f"http://127.0.0.1:{port}/derp"
    a, b = NodePrivate.generate(), NodePrivate.generate()
    with trio.fail_after(10):
        # Two clients through one proxy: the per-IP limit of 1 counts each real address.
        async with derp_client.connect(url, a) as ca, derp_client.connect(url, b) as cb:
            await ca.send(b.public, b"through the proxy")
            assert (await recv_skipping_keepalives(cb)).data == b"through the proxy"
            seen = {c.remote_ip: c.remote_port for k in (a, b) for c in relay.server.registry.connections(k.public.raw)}
            assert seen == {"198.51.100.1": 40001, "198.51.100.2": 40002}
            assert sorted(sources) == ["198.51.100.1", "198.51.100.2"]
            assert relay.server.stats.accepts_rejected["per_ip_limit"] == 0
        # /metrics through the proxy is refused, although the proxy is on loopback.
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await read_until_closed(stream)).startswith(b"HTTP/1.1 403 ")


async def test_trusted_proxy_without_header_and_health_checks(nursery):
    relay = await start_relay(nursery, proxy_protocol=True, trusted_proxies=("127.0.0.0/8",))
    with trio.fail_after(10):
        # A proxy's LOCAL health check, then a probe on the same connection: served.
        r = await http(relay, encode_v2(None) + b"GET /derp/probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert r.startswith(b"HTTP/1.1 200 ")
        # From a trusted address the header is required: plain HTTP is refused, counted.
        assert await http(relay, b"GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n") == b""
    assert relay.server.stats.handshake_failures["proxy_header"] == 1


async def test_proxy_header_from_an_untrusted_peer_closes_it(nursery):
    relay = await start_relay(nursery, proxy_protocol=True, trusted_proxies=("10.0.0.0/8",))
    with trio.fail_after(10):
        for header in (encode_v1(("203.0.113.5", 1), ("192.0.2.1", 443)), encode_v2(("203.0.113.5", 1))):
            r = await http(relay, header + b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert r == b""
        # A direct client (no header) is served as before, byte by byte if it likes.
        stream = await raw_connect(relay)
        for byte in b"GET /derp/probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n":
            await stream.send_all(bytes([byte]))
        assert (await read_until_closed(stream)).startswith(b"HTTP/1.1 200 ")
    assert relay.server.stats.handshake_failures["proxy_header_untrusted"] == 2
    await assert_relay_still_serves(relay)


async def test_x_forwarded_for_from_a_trusted_proxy(nursery):
    relay = await start_relay(nursery, trusted_proxies=("127.0.0.1", "10.0.0.0/8"), max_connections_per_ip=1)
    sources = []

    async def record(key, info, ip):
        sources.append(ip)
        return True, ""

    relay.server.admission_checks.append(record)
    with trio.fail_after(10):
        streams = []
        for i in (1, 2):  # two clients behind one proxy, each within the per-IP limit
            s = await raw_connect(relay)
            await s.send_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
                             b"X-Forwarded-For: 198.51.100.%d, 10.1.2.3\r\n\r\n" % i)
            streams.append(s)
            assert (await s.receive_some(12)).startswith(b"HTTP/1.1 101")
        assert relay.server.stats.accepts_rejected["per_ip_limit"] == 0
        # A request relayed by the proxy is never "local", with or without the header.
        for extra in (b"X-Forwarded-For: 127.0.0.1\r\n", b""):
            r = await http(relay, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + extra + b"\r\n")
            assert r.startswith(b"HTTP/1.1 403 "), extra
        for s in streams:
            await s.aclose()


async def test_forwarding_headers_from_anyone_are_never_local(relay):
    """No proxies configured: X-Forwarded-For names nobody, but a request that carries a
    forwarding header came through a proxy, so /metrics refuses it."""
    for h in (b"X-Forwarded-For: 127.0.0.1", b"Forwarded: for=127.0.0.1", b"X-Real-IP: 127.0.0.1"):
        r = await http(relay, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + h + b"\r\n\r\n")
        assert r.startswith(b"HTTP/1.1 403 "), h
    r = await http(relay, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert r.startswith(b"HTTP/1.1 200 ")


def test_forwarded_for_takes_the_rightmost_untrusted_entry():
    trusted = parse_cidrs("10.0.0.0/8,::1")
    assert client_from_forwarded_for([b"1.1.1.1, 203.0.113.9, 10.0.0.2"], trusted) == "203.0.113.9"
    assert client_from_forwarded_for([b"1.1.1.1", b"203.0.113.9"], trusted) == "203.0.113.9"
    assert client_from_forwarded_for([b"10.0.0.1, ::1"], trusted) is None
    assert client_from_forwarded_for([b"evil, 10.0.0.1"], trusted) is None
    assert client_from_forwarded_for([b"[2001:db8::7]"], trusted) == "2001:db8::7"
    with pytest.raises(ValueError, match="is not an address or CIDR"):
        parse_cidrs("10.0.0.0/8,nonsense")
