"""Fuzz target: the DERP frame decoder, both directions, fed in chunks, then each frame's payload
parser.  Only ``derpd.protocol.errors.RemoteProtocolError`` may escape for bad input."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _modules() -> None:
    import derpd.protocol.frames  # noqa: F401
    import derpd.protocol.messages  # noqa: F401


def one_input(data: bytes) -> None:
    from derpd.protocol.errors import RemoteProtocolError
    from derpd.protocol.frames import CLIENT_READ_LIMITS, SERVER_READ_LIMITS, FrameDecoder
    from derpd.protocol.messages import parse_client_frame, parse_server_frame

    if not data:
        return
    step = data[0] % 17 + 1  # the first byte picks the chunk size
    body = data[1:]
    for limits, parse in ((SERVER_READ_LIMITS, parse_client_frame), (CLIENT_READ_LIMITS, parse_server_frame)):
        dec = FrameDecoder(limits)
        try:
            for i in range(0, len(body), step):
                dec.receive_data(body[i:i + step])
                for ftype, payload in dec.frames():
                    parse(ftype, payload)
            dec.receive_data(b"")
            for ftype, payload in dec.frames():
                parse(ftype, payload)
        except RemoteProtocolError:
            pass


if __name__ == "__main__":
    from _harness import main

    main("frames", one_input, _modules)
