"""Fuzz target: the relay's HTTP front door -- h11 parsing requests with the relay's head
limit, then ``route_request`` deciding the answer.  Only ``h11.RemoteProtocolError`` may
escape for bad input (the relay answers it with 400)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MAX_HEAD = 16 * 1024  # derpd.relay.http_front.MAX_HEAD


def _modules() -> None:
    import derpd.protocol.upgrade  # noqa: F401


def one_input(data: bytes) -> None:
    import h11

    from derpd.protocol.upgrade import Response, redirect_to_https, route_request

    if not data:
        return
    step = data[0] % 97 + 1
    body = data[1:]
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    try:
        for i in range(0, len(body) + 1, step):
            conn.receive_data(body[i:i + step])  # the last chunk is b"": EOF
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                    break
                if isinstance(event, h11.Request):
                    for home in ("", "blank", "https://example.com/"):
                        route = route_request(event, home=home)
                        if isinstance(route, Response):
                            route.to_h11()
                    route_request(event, derp_enabled=False)
                    redirect_to_https(event, b"derp.example.com").to_h11()
            if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                break
    except h11.RemoteProtocolError:
        pass


if __name__ == "__main__":
    from _harness import main

    main("http_front", one_input, _modules)
