"""`derpd coordinator --certmode letsencrypt` against a real ACME server (Pebble): the
coordinator obtains its certificate with the relay's ACME client over HTTP-01 on its plain
port (with and without External Account Binding) and serves the map over HTTPS with it."""

from __future__ import annotations

import ssl
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from derpd.acme import HTTP_01, AcmeConfig
from derpd.coordinator.front import FrontOptions
from derpd.coordinator.server import RunningCoordinator, serve_coordinator

from ..coordinator.conftest import FakeProbe, make_config
from .pebble_harness import EAB_KEYS, Pebble, PebbleBuild, serve_dns

pytestmark = pytest.mark.interop

HOST = "coord.test"


async def _stop_at_exit(pebble: Pebble) -> None:
    try:
        await trio.sleep_forever()
    finally:
        pebble.stop()


@pytest.mark.parametrize("eab", [False, True])
async def test_coordinator_gets_its_certificate_over_http01(nursery: trio.Nursery, tmp_path: Path,
                                                            pebble_build: PebbleBuild, eab: bool) -> None:
    certdir = tmp_path / "certs"
    with trio.fail_after(60):
        dns_port = await nursery.start(serve_dns)
        pebble = Pebble(pebble_build, tmp_path, dns_port, http_port=1, tls_port=1, eab=eab)
        kid, key = next(iter(EAB_KEYS.items())) if eab else ("", "")
        acme = replace(
            AcmeConfig.from_options(certmode="letsencrypt", hostname=HOST, certdir=certdir, http_port=0,
                                    directory=pebble.directory, email="", eab_kid=kid, eab_key=key,
                                    ip_certs=False),
            challenges=(HTTP_01,), ca_file=str(pebble_build.minica), backoff_min=0.2, backoff_max=1.0,
            order_timeout=20.0)
        front = FrontOptions(certmode="letsencrypt", certdir=certdir, hostname=HOST, http_port=0, acme=acme)
        coord: RunningCoordinator = await nursery.start(lambda task_status: serve_coordinator(
            make_config(), listen="127.0.0.1:0", probe=FakeProbe(), probing=False, front=front,
            task_status=task_status))
        assert coord.http_port and coord.front.acme is not None
        # no certificate yet: TLS clients are turned away
        early = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", coord.port), ssl.create_default_context(),
                               server_hostname=HOST)
        with pytest.raises(trio.BrokenResourceError):
            await early.do_handshake()
        pebble.http_port = coord.http_port  # Pebble validates HTTP-01 on the coordinator's plain port
        await pebble.start(nursery)
        nursery.start_soon(_stop_at_exit, pebble)
        manager = coord.front.acme
        while manager.issued < 1:
            await manager.wait_changed()
        assert manager.answered[HTTP_01] >= 1
        ctx = ssl.create_default_context()
        ctx.load_verify_locations(cadata=(await pebble.root_pem()).decode())
        stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", coord.port), ctx, server_hostname=HOST)
        await stream.send_all(f"GET /derpmap/default HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
                              .encode())
        answer = b""
        try:
            while data := await stream.receive_some(65536):
                answer += data
        except trio.BrokenResourceError:
            pass
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"Regions"' in answer
    assert (certdir / f"{HOST}.crt").exists() and coord.state.metrics.tls_reloads.labels("ok")._value.get() >= 1
