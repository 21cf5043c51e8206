"""A Tailscale Go client and derpd's Python client exchange packets through derpd."""

from __future__ import annotations

import struct

import pytest
import trio

pytestmark = pytest.mark.interop

PACKETS = 50  # packet 49 is 64 KiB, the largest a DERP client may send


def make_packet(pair: int, direction: int, seq: int) -> bytes:
    """The packet cmd/derpinterop sends (relay.go makePacket), rebuilt byte for byte."""
    size = 65536 if seq % 50 == 49 else 14 + (seq * 97) % 1400
    header = b"DI" + struct.pack(">HBxII", pair, direction, seq, size)
    base = seq * 131 + pair * 3 + direction
    return header + bytes((base + 7 * j) & 0xFF for j in range(14, size))


async def test_go_and_python_clients_exchange_packets(start_relay, scenario) -> None:
    from derpd import client as derp_client
    from derpd.keys import NodePrivate
    from derpd.protocol.messages import RecvPacket

    relay = await start_relay()
    url = f"{relay.url}/derp"
    private = NodePrivate.generate()
    me = private.public
    go_result = {}

    async def recv_packet(c) -> RecvPacket:
        while True:
            ev = await c.recv()
            if isinstance(ev, RecvPacket):
                return ev

    with trio.fail_after(90):
        async with derp_client.connect(url, private) as py:
            # A packet to ourselves comes back only once the relay has registered us,
            # so the Go client cannot race ahead of our registration.
            await py.send(me, b"self-check")
            echo = await recv_packet(py)
            assert (echo.src, echo.data) == (me, b"self-check")

            async with trio.open_nursery() as nursery:

                async def run_go() -> None:
                    go_result["r"] = await scenario("mixed", "--url", url, "--py-key", str(me),
                                                    "--packets", str(PACKETS), "--timeout", "60s")

                nursery.start_soon(run_go)
                go_key = None
                for seq in range(PACKETS):
                    ev = await recv_packet(py)
                    go_key = go_key or ev.src
                    assert ev.src == go_key, f"packet {seq} from {ev.src}, earlier ones from {go_key}"
                    assert ev.data == make_packet(0, 0, seq), f"Go packet {seq} arrived altered"
                    await py.send(ev.src, b"PY" + ev.data[2:])

    r = go_result["r"]
    assert r.data["received"] == PACKETS
    assert r.data["go_key"] == str(go_key)
