"""Writes the seed corpus under fuzz/corpus/<target>/ from the spec's Appendix A vectors and
real requests (a Go client's DERP upgrade, Tailscale's STUN request, RFC 3489/5780 requests).
Each seed starts with one byte the targets use to pick a chunk size.  Re-run after changing it:

    python fuzz/make_corpus.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "corpus"
sys.path.insert(0, str(ROOT.parents[1]))


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


CLIENT = "64b101b1d0be5a8704bd078f9895001fc03e8e9f9522f188dd128d9846d48466"
SERVER = "07a37cbc142093c8b755dc1b10e86cb426374ad16aa853ed0bdfc0b2b86d1c7c"
FRAMES = {
    "server_key": h(f"01 00000028 44455250f09f9491 {SERVER}"),
    "client_info": h(f"""02 00000068 {CLIENT} 000102030405060708090a0b0c0d0e0f1011121314151617
        adae4041b70fe715a2dcf63c8ac02df1e4e99f7e03896c0d8df02f11f38281e1 fd9e1b60e2040edd9003eadd2e2a72bf"""),
    "server_info": h("""03 00000035 808182838485868788898a8b8c8d8e8f9091929394959697
        4b70c74eea433a804d1a82486c9f6b15a0dbfc2e43e308cae5993c0f52"""),
    "send_packet": h(f"04 00000025 {CLIENT} 68656c6c6f"),
    "recv_packet": h(f"05 00000025 {SERVER} 68656c6c6f"),
    "keep_alive": h("06 00000000"),
    "note_preferred": h("07 00000001 01"),
    "peer_gone": h(f"08 00000021 {CLIENT} 00"),
    "peer_present": h(f"09 00000033 {CLIENT} 00000000000000000000ffffcb007107 a2a9 01"),
    "forward_packet": h(f"0a 00000045 {SERVER} {CLIENT} 68656c6c6f"),
    "watch_conns": h("10 00000000"),
    "close_peer": h(f"11 00000020 {CLIENT}"),
    "ping": h("12 00000008 0102030405060708"),
    "pong": h("13 00000008 0102030405060708"),
    "health": h("14 00000004 6f6f7073"),
    "restarting": h("15 00000008 000005dc 00002710"),
    "unknown_type": h("0b 00000003 010203"),
}
UPGRADE = (b"GET /derp HTTP/1.1\r\nHost: derp.example.com\r\nUser-Agent: Go-http-client/1.1\r\n"
           b"Connection: Upgrade\r\nUpgrade: DERP\r\nDerp-Fast-Start: 1\r\nIdeal-Node: 1a\r\n\r\n")
WEBSOCKET = (b"GET /derp HTTP/1.1\r\nHost: derp.example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
             b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
             b"Sec-WebSocket-Protocol: derp\r\n\r\n")
HTTP = {
    "derp_upgrade": UPGRADE,
    "websocket": WEBSOCKET,
    "probe": b"HEAD /derp/probe HTTP/1.1\r\nHost: x\r\n\r\nGET /derp/latency-check HTTP/1.1\r\nHost: x\r\n\r\n",
    "generate_204": b"GET /generate_204 HTTP/1.1\r\nHost: x\r\nX-Tailscale-Challenge: abc123\r\n\r\n",
    "metrics": b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    "post_body": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "http10": b"GET / HTTP/1.0\r\n\r\n",
}
STUN = {
    "tailscale_request": h("0001 0014 2112a442 0102030405060708090a0b0c 8022 0008 7461696c6e6f6465 8028 0004 b32c370f"),
    "response_v4": h("0101 000c 2112a442 0102030405060708090a0b0c 0020 0008 0001f523e112a643"),
    "response_v6": h("0101 0018 2112a442 0102030405060708090a0b0c 0020 0014 0002f523 0113a9fa0102030405060708090a0b0d"),
    "classic_request": h("0001 0000 0102030405060708090a0b0c0d0e0f10"),
    "rfc5780_change": h("0001 0008 2112a442 0102030405060708090a0b0c 0003 0004 00000006"),
    "plain_request": h("0001 0000 2112a442 0102030405060708090a0b0c"),
}

# fuzz/engine.py programs: a first byte (bit 0: the third client speaks TLS), then steps of
# (operation, client, arguments); see that file for the operations.
POLL = bytes([3, 0, 0, 0])
ENGINE = {
    "send_and_poll": bytes([0, 1, 0, 0, 0x01, 5]) + b"hello" + bytes([3]) + POLL + bytes([9, 1]) + POLL,
    "tls_records_split": bytes([1, 1, 2, 1, 0x00, 4]) + b"abcd" + bytes([0x21, 2]) + b"zz" + bytes([7]) + POLL * 3
    + bytes([9, 0]),
    "unknown_key_then_resume": bytes([0, 1, 0, 0, 0x04, 3]) + b"xyz" + bytes([0]) + POLL + bytes([4, 0, 3]) + b"\x04\x00\x00"
    + bytes([0]) + POLL,
    "half_close_mid_frame": bytes([0, 0, 0, 3]) + b"\x04\x00\x00" + bytes([1, 8, 0]) + POLL + POLL,
    "zero_and_oversize_lengths": bytes([0, 1, 1, 1, 0x41, 0, 0x40, 0, 0]) + POLL + POLL,
    "queue_control_remove": bytes([0, 5, 1, 10, 1, 6, 1, 5]) + b"hello" + bytes([9, 1]) + POLL + bytes([7, 1, 10, 0, 1])
    + POLL,
    "close_mid_stream": bytes([0, 1, 0, 2, 0x12, 9]) + bytes(36) + bytes([0x02, 1, 0, 5, 11, 0]) + POLL + POLL,
}


def write(target: str, seeds: dict[str, bytes], prefix: bytes = b"\x00") -> None:
    d = ROOT / target
    d.mkdir(parents=True, exist_ok=True)
    for name, data in seeds.items():
        (d / name).write_bytes(prefix + data)


if __name__ == "__main__":
    write("frames", FRAMES)
    write("frames", {"all_frames": b"".join(FRAMES.values())}, b"\x06")
    write("login", {"client_info": FRAMES["client_info"],
                    "client_info_then_frames": FRAMES["client_info"] + FRAMES["send_packet"] + FRAMES["ping"]
                    + FRAMES["note_preferred"] + FRAMES["unknown_type"],
                    "server_side_view": FRAMES["server_key"] + FRAMES["server_info"]})
    write("http_front", HTTP)
    write("http_front", {"upgrade_then_client_info": UPGRADE + FRAMES["client_info"]}, b"\x20")
    write("stun", STUN, b"")
    write("engine", ENGINE, b"")
    print(f"wrote {sum(1 for _ in ROOT.rglob('*') if _.is_file())} seeds under {ROOT.name}/")
