"""The CPU of one login's parts on the server, each on its own, in process.

Usage:  python bench/micro_login.py [--rounds 5] [--logins 2000]

No sockets and no event loop: the parts of a login that run Python on the server, timed
with the process CPU clock over ``--logins`` logins per round (rounds alternate the parts),
printed as microseconds per login (median and min-max over rounds):

* ``h11 head``      the upgrade request a Go client sends, through a fresh h11 connection,
                    ``route_request`` and the 101 bytes (derpd.relay.http_front's work);
* ``key agreement`` X25519 between the server key and the client's (crypto_box_beforenm);
* ``box open+seal`` opening ClientInfo and sealing ServerInfo with that shared key;
* ``json``          ClientInfo from JSON and ServerInfo to JSON;
* ``handshake``     the whole sans-IO ServerHandshake (ServerKey, ClientInfo, ServerInfo),
                    which contains the three rows above it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import h11  # noqa: E402

from derpd.keys import NodePrivate  # noqa: E402
from derpd.protocol.handshake import ClientHandshake, ServerHandshake  # noqa: E402
from derpd.protocol.messages import ClientInfo, ServerInfo  # noqa: E402
from derpd.protocol.upgrade import derp_switching_protocols, route_request  # noqa: E402

# What Tailscale's derphttp client sends (derp/derphttp/derphttp_client.go), fast start off.
REQUEST = (b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1:3340\r\nUser-Agent: Go-http-client/1.1\r\n"
           b"Connection: Upgrade\r\nDerp-Version: 2\r\nUpgrade: DERP\r\n\r\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--logins", type=int, default=2000)
    args = ap.parse_args()
    server = NodePrivate.generate()
    clients = [NodePrivate.generate() for _ in range(64)]
    infos = []
    for c in clients:
        ch = ClientHandshake(c, ClientInfo(), server_key=server.public)
        infos.append(ch.client_info_frame())
    sealed_info = {c.public.raw: c.box(server.public).seal(ClientInfo().to_json()) for c in clients}
    client_json = ClientInfo().to_json()

    def h11_head(i: int) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
        conn.receive_data(REQUEST)
        req = conn.next_event()
        route_request(req)
        derp_switching_protocols(server.public)

    def agreement(i: int) -> None:
        server.box(clients[i % 64].public)

    boxes = [server.box(c.public) for c in clients]

    def box_ops(i: int) -> None:
        c = clients[i % 64]
        b = boxes[i % 64]
        b.open(sealed_info[c.public.raw])
        b.seal(b"{}", bytes(24))

    def json_part(i: int) -> None:
        ClientInfo.from_json(client_json)
        ServerInfo().to_json()

    def handshake(i: int) -> None:
        hs = ServerHandshake(server)
        hs.server_key_frame()
        hs.receive_data(infos[i % 64])
        hs.next_event()
        hs.server_info_frame()

    parts = {"h11 head": h11_head, "key agreement": agreement, "box open+seal": box_ops, "json": json_part,
             "handshake": handshake}
    res: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(args.rounds):
        for name, fn in parts.items():
            t0 = time.process_time()
            for i in range(args.logins):
                fn(i)
            res[name].append((time.process_time() - t0) / args.logins * 1e6)
    print(f"{'part':16} {'us per login':>24}")
    for name, vals in res.items():
        s = sorted(vals)
        print(f"{name:16} {s[len(s) // 2]:>10.1f} ({s[0]:.1f}-{s[-1]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
