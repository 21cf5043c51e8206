"""`derpd coordinator` behind a real HAProxy (Debian's package), both ways docs/proxy.md
describes: a TCP proxy that opens each connection with a PROXY v2 header, and an HTTP proxy
that adds X-Forwarded-For.  The coordinator records the registrant's real address, not the
proxy's, and a registration through the proxy naming a loopback service is refused (behind a
proxy on the same host every registration arrives from loopback).

Without ``haproxy`` the test is skipped with a message saying what to install, unless
``DERPD_REQUIRE_INTEROP=1`` (CI), which turns the skip into a failure.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import trio

from derpd.coordinator.front import FrontOptions
from derpd.relay.client_address import parse_cidrs

from ..coordinator.test_client_address import node, post_from, start
from .test_haproxy import free_port, haproxy_binary, wait_listening

TCP_PROXY = "127.0.0.2"  # HAProxy's source towards the PROXY-protocol coordinator
HTTP_PROXY = "127.0.0.4"  # ...and towards the X-Forwarded-For one
CLIENT = "127.0.0.3"  # where the relays' registrations come from

CONFIG = """
global
    maxconn 200
defaults
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend tcp_in
    mode tcp
    bind 127.0.0.1:{tcp_port}
    default_backend coordinator_proxy_protocol
backend coordinator_proxy_protocol
    mode tcp
    server c 127.0.0.1:{pp_port} send-proxy-v2 source {tcp_proxy}
frontend http_in
    mode http
    bind 127.0.0.1:{http_port}
    option forwardfor
    default_backend coordinator_forwarded_for
backend coordinator_forwarded_for
    mode http
    server c 127.0.0.1:{xff_port} source {http_proxy}
"""


async def test_coordinator_behind_haproxy(nursery: trio.Nursery, tmp_path: Path) -> None:
    haproxy = haproxy_binary()
    pp = await start(nursery, FrontOptions(proxy_protocol=True, trusted_proxies=parse_cidrs(TCP_PROXY)),
                     allow_loopback_nodes=False)
    xff = await start(nursery, FrontOptions(trusted_proxies=parse_cidrs(HTTP_PROXY)), allow_loopback_nodes=False)
    tcp_port, http_port = free_port(), free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(CONFIG.format(tcp_port=tcp_port, http_port=http_port, pp_port=pp.port, xff_port=xff.port,
                                 tcp_proxy=TCP_PROXY, http_proxy=HTTP_PROXY))
    proc = await trio.lowlevel.open_process([haproxy, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
    try:
        with trio.fail_after(30):
            await wait_listening(tcp_port, proc)
            await wait_listening(http_port, proc)
            for coord, port in ((pp, tcp_port), (xff, http_port)):
                answer = await post_from(CLIENT, port, node("901a", IPv4="8.8.8.8"))
                assert answer.startswith(b"HTTP/1.1 200 "), answer
                assert coord.state.entries["901a"].source_addr == CLIENT  # not the proxy's address
                # the attack through the proxy: a loopback service as the node's address
                answer = await post_from(CLIENT, port, node("901b", IPv4="127.0.0.1", DERPPort=22))
                assert answer.startswith(b"HTTP/1.1 403 "), answer
                assert "901b" not in coord.state.entries
            # past the proxy, straight to the PROXY-protocol coordinator: a forged header is refused
            forged = b"PROXY TCP4 8.8.4.4 127.0.0.1 40000 80\r\n"
            assert await post_from(CLIENT, pp.port, node("901c", IPv4="8.8.8.8"), prefix=forged) == b""
            # ...and a forged X-Forwarded-For is ignored: the registration is the sender's own
            answer = await post_from(CLIENT, xff.port, node("901c", IPv4="8.8.8.8"),
                                     headers="X-Forwarded-For: 8.8.4.4\r\n")
            assert answer.startswith(b"HTTP/1.1 200 ")
    finally:
        proc.kill()
        await proc.wait()
    assert pp.state.metrics.proxy_refusals.labels("proxy_header_untrusted")._value.get() == 1
    assert "901c" not in pp.state.entries
    assert xff.state.entries["901c"].source_addr == CLIENT
    assert xff.state.metrics.proxy_refusals.labels("forwarded_untrusted")._value.get() == 1
