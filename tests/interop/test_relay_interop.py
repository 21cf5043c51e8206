"""Tailscale's own DERP client (derphttp, pinned in go.mod) against derpd's relay.

Each test starts the relay in-process on 127.0.0.1 port 0 and runs one
``derpinterop`` scenario (cmd/derpinterop), which prints one JSON line.
"""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.interop

PAIRS, PACKETS = 50, 200  # the bar: 50 pairs x 200 packets each way
BULK = ("--pairs", str(PAIRS), "--packets", str(PACKETS))

# Tailscale's WebSocket library (github.com/coder/websocket) refuses any single
# message over 32768 bytes with close code 1009, in derper's server and in the Go
# client alike. 32 KiB packets are the largest that Go peers can carry both ways.
GO_WEBSOCKET_MESSAGE_LIMIT = 32768


def derp_url(relay: Any) -> str:
    return f"{relay.url}/derp"


def assert_relayed_everything(data: dict[str, Any], pairs: int, packets: int) -> None:
    assert data["sent"] == data["received"] == 2 * pairs * packets, data
    gone = {k: v for k, v in data["other_frames"].items() if "PeerGone" in k}
    assert not gone, f"PeerGone while every peer was connected: {data}"


async def test_relay_plain_http(start_relay, scenario) -> None:
    relay = await start_relay()
    r = await scenario("relay", "--url", derp_url(relay), *BULK)
    assert_relayed_everything(r.data, PAIRS, PACKETS)
    assert r.data["websocket_dials"] == 0
    assert r.data["max_packet"] == 65536


async def test_relay_tls_fast_start(start_relay, scenario, test_ca) -> None:
    """Every connection takes the fast-start path (TLS 1.3 + meta-certificate) and relays."""
    relay = await start_relay(tls="ca")
    assert relay.url.startswith("https://localhost:")
    r = await scenario("fastclient", "--url", derp_url(relay), "--ca", str(test_ca.ca_file),
                       "--server-key", str(relay.public_key), *BULK)
    assert r.data["fast_start"] is True
    assert r.data["tls_version"] == "TLS 1.3"
    assert r.data["meta_cert_key"] == str(relay.public_key)
    assert_relayed_everything(r.data, PAIRS, PACKETS)


async def test_relay_pinned_self_signed_ip_cert(start_relay, scenario) -> None:
    """A DERP-map node with HostName 127.0.0.1 and a sha256-raw CertName pin connects;
    the same node with a wrong pin is refused (checked inside the scenario)."""
    relay = await start_relay(tls="self-signed")
    assert relay.cert_pin and relay.cert_pin.startswith("sha256-raw:")
    r = await scenario("pin", "--url", f"https://127.0.0.1:{relay.port}",
                       "--certname", relay.cert_pin, *BULK)
    assert r.data["wrong_pin_refused"] is True
    assert_relayed_everything(r.data, PAIRS, PACKETS)


async def test_relay_websocket(start_relay, scenario) -> None:
    relay = await start_relay()
    r = await scenario("relay", "--url", derp_url(relay), "--websocket",
                       "--max-packet", str(GO_WEBSOCKET_MESSAGE_LIMIT), *BULK)
    assert r.data["websocket_dials"] == 2 * PAIRS
    assert_relayed_everything(r.data, PAIRS, PACKETS)


async def test_relay_websocket_over_tls(start_relay, scenario, test_ca) -> None:
    relay = await start_relay(tls="ca")
    r = await scenario("relay", "--url", derp_url(relay), "--websocket", "--ca", str(test_ca.ca_file),
                       "--max-packet", str(GO_WEBSOCKET_MESSAGE_LIMIT), "--pairs", "5", "--packets", "100")
    assert r.data["websocket_dials"] == 10
    assert_relayed_everything(r.data, 5, 100)


async def test_relay_websocket_max_size_packets(start_relay, scenario) -> None:
    """64 KiB packets over WebSocket.  Stricter than derper, which fails this: a Go peer
    reads at most 32768 bytes per WebSocket message, so the relay must split what it
    writes into messages of at most that size, and must itself accept the larger
    messages a Go client writes for a 64 KiB packet."""
    relay = await start_relay()
    r = await scenario("relay", "--url", derp_url(relay), "--websocket",
                       "--max-packet", "65536", "--pairs", "2", "--packets", "100")
    assert_relayed_everything(r.data, 2, 100)


async def test_peer_gone(start_relay, scenario) -> None:
    relay = await start_relay()
    r = await scenario("peergone", "--url", derp_url(relay))
    assert r.data["disconnected_reason"] == 0
    assert r.data["not_here_reason"] == 1


async def test_ping(start_relay, scenario) -> None:
    relay = await start_relay()
    r = await scenario("ping", "--url", derp_url(relay), "--count", "5")
    assert len(r.data["rtt_ms"]) == 5


async def test_health_frames_reach_the_go_client(start_relay, scenario) -> None:
    """A cloned node key: derp.Client parses the relay's Health frames as HealthMessage (what
    tailscaled shows in `tailscale status`), on both connections, then the empty one."""
    relay = await start_relay()
    relay.server.health.hold = 0.5  # 10 s in production
    r = await scenario("health", "--url", derp_url(relay))
    assert "node key" in r.data["older_problem"] and r.data["older_problem"] == r.data["newer_problem"]
    assert r.data["cleared"] is True
