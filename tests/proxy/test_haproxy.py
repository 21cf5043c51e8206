"""derpd behind a real HAProxy (Debian's package) on a shared :443: HAProxy routes TLS by SNI
without terminating it and opens each connection to derpd with a PROXY v2 header, as
docs/proxy.md describes.  A DERP client through the proxy relays, derpd sees the client's
real address (admission's Source), and /metrics through the proxy is refused.

Without ``haproxy`` the test is skipped with a message saying what to install, unless
``DERPD_REQUIRE_INTEROP=1`` (CI), which turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess

import pytest
import trio
import trustme

from derpd import client as derp_client
from derpd.keys import NodePrivate
from derpd.protocol.messages import KeepAlive

from ..admission.fake_headscale import FakeHeadscale
from ..attack.relay_process import start_relay_process

PROXY_SOURCE = "127.0.0.2"  # HAProxy connects to derpd from here; clients come from 127.0.0.1

CONFIG = """
global
    maxconn 200
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend shared_443
    bind 127.0.0.1:{port}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    use_backend derp if {{ req.ssl_sni -i derp.test }}
    default_backend website
backend derp
    server derpd 127.0.0.1:{relay_port} send-proxy-v2 source {source}
backend website
    server web 127.0.0.1:{web_port}
"""


def haproxy_binary() -> str:
    path = shutil.which("haproxy")
    if path is None:
        message = "haproxy is not installed: apt-get install haproxy (or run .ci/setup.d/50-haproxy.sh)"
        if os.environ.get("DERPD_REQUIRE_INTEROP") == "1":
            pytest.fail(message + " (DERPD_REQUIRE_INTEROP=1 makes this a failure)", pytrace=False)
        pytest.skip(message)
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_listening(port: int, proc: trio.Process) -> None:
    while True:
        if proc.returncode is not None:
            raise RuntimeError(f"haproxy exited with {proc.returncode}")
        try:
            s = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            await trio.sleep(0.05)
            continue
        await s.aclose()
        return


async def get(port: int, ctx: ssl.SSLContext, path: bytes) -> bytes:
    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), ctx, server_hostname="derp.test")
    await stream.send_all(b"GET %s HTTP/1.1\r\nHost: derp.test\r\nConnection: close\r\n\r\n" % path)
    got = b""
    try:
        while data := await stream.receive_some(65536):
            got += data
    except trio.BrokenResourceError:
        pass
    return got


async def test_derp_through_haproxy_with_sni_routing_and_proxy_protocol(nursery, tmp_path):
    haproxy = haproxy_binary()
    ca = trustme.CA()
    leaf = ca.issue_cert("derp.test")
    leaf.private_key_pem.write_to_path(tmp_path / "derp.test.key")
    leaf.cert_chain_pems[0].write_to_path(tmp_path / "derp.test.crt")
    controller = FakeHeadscale(allow_all=True)
    await nursery.start(controller.serve)
    with trio.fail_after(60):
        relay = await start_relay_process(
            nursery, "--certmode", "manual", "--certdir", str(tmp_path), "--hostname", "derp.test",
            "--http-port", "-1", "--proxy-protocol", "--trusted-proxies", PROXY_SOURCE,
            "--verify-client-url", controller.url)
        port = free_port()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(CONFIG.format(port=port, relay_port=relay.port, source=PROXY_SOURCE, web_port=free_port()))
        proc = await trio.lowlevel.open_process([haproxy, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL)
        try:
            await wait_listening(port, proc)
            ctx = ssl.create_default_context()
            ca.configure_trust(ctx)
            url = f"https://derp.test:{port}/derp"
            a, b = NodePrivate.generate(), NodePrivate.generate()
            async with (derp_client.connect(url, a, ssl_context=ctx, connect_host="127.0.0.1") as ca_,
                        derp_client.connect(url, b, ssl_context=ctx, connect_host="127.0.0.1") as cb):
                await ca_.send(b.public, b"via haproxy")
                while isinstance(ev := await cb.recv(), KeepAlive):
                    pass
                assert ev.data == b"via haproxy"
            sources = [json.loads(s.body)["Source"] for s in controller.seen]
            print(f"\n[haproxy] admission saw Source {sources}; the proxy connects from {PROXY_SOURCE}")
            assert sources == ["127.0.0.1", "127.0.0.1"]
            # /metrics through the proxy is refused, though it arrives from loopback...
            assert (await get(port, ctx, b"/metrics")).startswith(b"HTTP/1.1 403 ")
            # ...while a direct loopback scrape (no proxy, no header) is still answered.
            m = await relay.metrics()
            assert m["derp_accepts_total"] >= 2
        finally:
            proc.kill()
            await proc.wait()
