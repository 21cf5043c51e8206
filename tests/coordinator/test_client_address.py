"""Who a registration comes from: the prober is never aimed at loopback unless the config says
so (whatever address the registration came from), and PROXY headers and X-Forwarded-For name
the client only when a trusted proxy sends them; from anyone else they are refused or ignored,
and counted."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import trio

from derpd.coordinator.front import FrontOptions
from derpd.coordinator.server import RunningCoordinator, serve_coordinator
from derpd.keys import NodePrivate
from derpd.relay.client_address import parse_cidrs

from .conftest import TOKEN, FakeProbe, make_config


async def post_from(source: str, port: int, doc: dict[str, Any], *, prefix: bytes = b"",
                    headers: str = "") -> bytes:
    """POST /v1/nodes from ``source`` (a loopback address this test binds), after ``prefix``
    (a PROXY header); returns the answer, or b"" if the connection was closed."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    body = json.dumps(doc).encode()
    await stream.send_all(prefix + (
        f"POST /v1/nodes HTTP/1.1\r\nHost: coord\r\nAuthorization: Bearer {TOKEN}\r\n{headers}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body)
    got = b""
    try:
        while data := await stream.receive_some(65536):
            got += data
    except trio.BrokenResourceError:
        pass
    await stream.aclose()
    return got


def node(name: str, **fields: Any) -> dict[str, Any]:
    return {"Name": name, "RegionID": 901, "RegionCode": "edge", "HostName": "relay.example.net",
            "PublicKey": str(NodePrivate.generate().public), **fields}


async def start(nursery: trio.Nursery, front: FrontOptions | None = None, **config: Any) -> RunningCoordinator:
    with trio.fail_after(10):
        return await nursery.start(lambda task_status: serve_coordinator(  # type: ignore[no-any-return]
            make_config(**config), listen="127.0.0.1:0", probe=FakeProbe(), probing=False, front=front,
            task_status=task_status))


async def test_loopback_from_another_loopback_address_is_refused(nursery: trio.Nursery) -> None:
    """The reproduced attack: a registration from 127.0.0.2 naming 127.0.0.1:<a plain TCP
    service> was accepted, and the prober connected to that service."""
    service = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = service.socket.getsockname()[1]
    coord = await start(nursery, allow_loopback_nodes=False)
    with trio.fail_after(10):
        answer = await post_from("127.0.0.2", coord.port, node("901a", IPv4="127.0.0.1", DERPPort=port))
        assert answer.startswith(b"HTTP/1.1 403 ") and b"allow_loopback_nodes" in answer
        # no address at all: the prober would dial the source, loopback again
        answer = await post_from("127.0.0.2", coord.port, node("901b"))
        assert answer.startswith(b"HTTP/1.1 403 ")
    assert "901a" not in coord.state.entries and not coord.state.probe_targets()[2:]
    coord.state.reload(replace(coord.state.config, allow_loopback_nodes=True))  # derpd dev's setting
    with trio.fail_after(10):
        answer = await post_from("127.0.0.2", coord.port, node("901a", IPv4="127.0.0.1", DERPPort=port))
    assert answer.startswith(b"HTTP/1.1 200 ")
    await service.aclose()


async def test_proxy_header_names_the_client_only_from_a_trusted_proxy(nursery: trio.Nursery) -> None:
    front = FrontOptions(proxy_protocol=True, trusted_proxies=parse_cidrs("127.0.0.2"))
    coord = await start(nursery, front)
    header = b"PROXY TCP4 8.8.4.4 127.0.0.1 40000 8080\r\n"
    refusals = coord.state.metrics.proxy_refusals
    assert refusals.labels("proxy_header_untrusted")._value.get() == 0
    with trio.fail_after(10):
        # through the trusted proxy: the header's address is the registration's source
        answer = await post_from("127.0.0.2", coord.port, node("901a", IPv4="8.8.8.8"), prefix=header)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert coord.state.entries["901a"].source_addr == "8.8.4.4"
        # the same header from anyone else closes the connection, counted
        assert await post_from("127.0.0.3", coord.port, node("901b", IPv4="8.8.8.8"), prefix=header) == b""
        assert refusals.labels("proxy_header_untrusted")._value.get() == 1
        # the trusted proxy must send a header
        assert await post_from("127.0.0.2", coord.port, node("901c", IPv4="8.8.8.8")) == b""
        assert refusals.labels("proxy_header")._value.get() == 1
        # a direct client without a header is served as itself
        answer = await post_from("127.0.0.3", coord.port, node("901d", IPv4="8.8.8.8"))
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert coord.state.entries["901d"].source_addr == "127.0.0.3"
    assert "901b" not in coord.state.entries and "901c" not in coord.state.entries


async def test_forwarded_for_only_from_a_trusted_proxy(nursery: trio.Nursery) -> None:
    coord = await start(nursery, FrontOptions(trusted_proxies=parse_cidrs("127.0.0.2")))
    xff = "X-Forwarded-For: 9.9.9.9, 8.8.4.4\r\n"
    with trio.fail_after(10):
        answer = await post_from("127.0.0.2", coord.port, node("901a", IPv4="8.8.8.8"), headers=xff)
        assert answer.startswith(b"HTTP/1.1 200 ")
        # an untrusted peer's header is ignored (its own address counts) and counted
        answer = await post_from("127.0.0.3", coord.port, node("901b", IPv4="8.8.8.8"), headers=xff)
        assert answer.startswith(b"HTTP/1.1 200 ")
    assert coord.state.entries["901a"].source_addr == "8.8.4.4"
    assert coord.state.entries["901b"].source_addr == "127.0.0.3"
    assert coord.state.metrics.proxy_refusals.labels("forwarded_untrusted")._value.get() == 1
