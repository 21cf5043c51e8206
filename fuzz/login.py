"""Fuzz target: the server's login state machine (ServerKey -> ClientInfo -> ServerInfo), then
the logged-in frame stream, and the client's side of the login.  Only
``derpd.protocol.errors.RemoteProtocolError`` may escape for bad input."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Appendix A keys of derp-protocol.md, so seeds holding its ClientInfo open for real.
SERVER_PRIVATE = "privkey:0002030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f60"
CLIENT_PRIVATE = "privkey:4042434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f60"


def _modules() -> None:
    import derpd.protocol.handshake  # noqa: F401
    import derpd.protocol.messages  # noqa: F401


def one_input(data: bytes) -> None:
    from derpd.keys import NodePrivate
    from derpd.protocol.errors import RemoteProtocolError
    from derpd.protocol.handshake import NEED_DATA, ClientHandshake, ServerHandshake
    from derpd.protocol.messages import ClientInfo, parse_client_frame

    if not data:
        return
    step = data[0] % 64 + 1
    body = data[1:]
    server = ServerHandshake(NodePrivate.parse(SERVER_PRIVATE), nonce=lambda: bytes(24))
    server.server_key_frame()
    try:
        event = NEED_DATA
        for i in range(0, len(body) + 1, step):
            server.receive_data(body[i:i + step] or b"")  # the last chunk is b"": EOF
            event = server.next_event()
            if event is not NEED_DATA:
                break
        if event is not NEED_DATA:
            server.server_info_frame()
            for ftype, payload in server.decoder.frames():
                parse_client_frame(ftype, payload)
    except RemoteProtocolError:
        pass
    client = ClientHandshake(NodePrivate.parse(CLIENT_PRIVATE), ClientInfo())
    try:
        client.receive_data(body)
        client.receive_data(b"")
        while client.next_event() is not NEED_DATA:
            pass
    except RemoteProtocolError:
        pass


if __name__ == "__main__":
    from _harness import main

    main("login", one_input, _modules)
