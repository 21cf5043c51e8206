"""Tailscale's own DERP client (derphttp, through the interop suite's ``derpinterop``)
connecting to derpd through a certificate derpd obtained from Pebble, with Pebble's root as
its only extra CA: TLS 1.3 fast start with the meta-certificate, then relaying."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.interop.interop_harness import parse_scenario, run_go

pytestmark = pytest.mark.interop


async def go_fastclient(go_tools, r, hostname: str, root: Path, pairs: int, packets: int) -> None:
    """derpinterop fastclient through the relay's ACME certificate, trusting only ``root``
    beyond the system roots; checks the meta-certificate's key and every packet."""
    root.write_bytes(await r.pebble.root_pem())
    argv = [go_tools.derpinterop, "fastclient", "--url", f"https://{hostname}:{r.running.port}/derp",
            "--ca", str(root), "--server-key", str(r.running.public_key), "--pairs", str(pairs),
            "--packets", str(packets)]
    result = parse_scenario(argv, *await run_go(argv))
    assert result.returncode == 0 and result.data.get("ok") is True, result.explain()
    assert result.data["meta_cert_key"] == str(r.running.public_key)
    assert result.data["sent"] == result.data["received"] == 2 * pairs * packets


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
async def test_go_client_through_acme_certificate(start_acme_relay, go_tools, tmp_path, hostname):
    with trio.fail_after(120):
        r = await start_acme_relay(hostname, ip_cert=hostname == "127.0.0.1")
        await r.wait_issued()
        await go_fastclient(go_tools, r, hostname, tmp_path / "pebble-root.pem", 4, 50)


async def test_go_fast_start_after_renewal(start_acme_relay, go_tools, tmp_path):
    """After a renewal (Pebble's 12-second profile) the served chain still carries the
    meta-certificate: Go clients verify the renewed certificate and take the fast start."""
    with trio.fail_after(120):
        r = await start_acme_relay("localhost", profile="tiny")
        await r.wait_issued(2)
        await go_fastclient(go_tools, r, "localhost", tmp_path / "pebble-root.pem", 2, 20)
    assert r.server.stats.tls_reloads["ok"] >= 2
