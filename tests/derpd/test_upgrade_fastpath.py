"""``read_plain_derp_request``: the strict reader of a DERP client's login request agrees with
h11 and ``route_request`` on everything it accepts, and leaves everything else to them."""

from __future__ import annotations

import h11
from hypothesis import given, settings
from hypothesis import strategies as st

from derpd.protocol.upgrade import MAX_HEAD, DerpUpgrade, read_plain_derp_request, route_request

# What Tailscale's derphttp client sends (cmd/derper's logs and tests/interop agree).
GO_REQUEST = (b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1:3340\r\nUser-Agent: Go-http-client/1.1\r\n"
              b"Connection: Upgrade\r\nDerp-Fast-Start: 1\r\nDerp-Version: 2\r\nUpgrade: DERP\r\n\r\n")


def h11_view(data: bytes):
    """(route, trailing) as the h11 path sees ``data``, or None if h11 has no complete request."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return "error"
    if not isinstance(event, h11.Request):
        return None
    return route_request(event), conn.trailing_data[0]


def test_the_go_clients_request():
    got = read_plain_derp_request(GO_REQUEST + b"\x02\x00\x00\x00\x05hello")
    assert got is not None and got.upgrade == DerpUpgrade(fast_start=True)
    assert got.trailing == b"\x02\x00\x00\x00\x05hello"
    assert h11_view(GO_REQUEST + b"\x02\x00\x00\x00\x05hello") == (got.upgrade, got.trailing)


def test_a_repeated_head_reads_the_same():
    """The last accepted head is remembered (one entry): the same head again, with other
    trailing bytes, and a different head in between, each read as h11 reads them."""
    not_ideal = GO_REQUEST.replace(b"Upgrade: DERP\r\n", b"Upgrade: DERP\r\nIdeal-Node: x\r\n")
    for data in (GO_REQUEST + b"a", GO_REQUEST + b"bc", not_ideal, GO_REQUEST, GO_REQUEST + b"Upgrade: no\r\n\r\n",
                 not_ideal + b"d", GO_REQUEST[:-2], GO_REQUEST.replace(b"Upgrade: DERP", b"Upgrade: websocket")):
        got = read_plain_derp_request(data)
        if data.endswith((b"\r\n\r\n", b"a", b"bc", b"d")) and b"websocket" not in data:
            assert got is not None and h11_view(data) == (got.upgrade, got.trailing), data
        else:
            assert got is None, data
    assert read_plain_derp_request(not_ideal).upgrade.not_ideal
    assert not read_plain_derp_request(GO_REQUEST).upgrade.not_ideal


def test_what_it_leaves_to_h11():
    for data in (
        GO_REQUEST[:-2],  # incomplete head
        GO_REQUEST.replace(b"Upgrade: DERP", b"Upgrade: websocket"),
        GO_REQUEST.replace(b"GET /derp ", b"GET /derp?x=1 "),
        GO_REQUEST.replace(b"HTTP/1.1", b"HTTP/1.0"),
        GO_REQUEST.replace(b"Host: 127.0.0.1:3340\r\n", b""),
        GO_REQUEST.replace(b"Host: 127.0.0.1:3340\r\n", b"Host: a\r\nHost: b\r\n"),
        GO_REQUEST.replace(b"Derp-Version: 2\r\n", b"Content-Length: 0\r\n"),
        GO_REQUEST.replace(b"Derp-Version: 2\r\n", b"Transfer-Encoding: chunked\r\n"),
        GO_REQUEST.replace(b"Derp-Version: 2\r\n", b"Derp-Version: 2\r\n continued\r\n"),
        GO_REQUEST.replace(b"Derp-Version: 2", b"Derp-Version : 2"),
        GO_REQUEST.replace(b"Derp-Version: 2", b"Derp-Version: 2\x00"),
        b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n",
    ):
        assert read_plain_derp_request(data) is None, data


NAMES = st.sampled_from([b"Host", b"host", b"HOST", b"Upgrade", b"upgrade", b"Connection", b"Derp-Fast-Start",
                         b"Ideal-Node", b"X-Forwarded-For", b"Content-Length", b"Transfer-Encoding", b"Expect",
                         b"Derp-Version", b"X", b"Bad Name", b"Bad:Name", b"", b"\tHost", b"H\x7fost"])
VALUES = st.one_of(st.sampled_from([b"DERP", b"derp", b" DERP ", b"websocket", b"1", b"0", b"", b"x,y", b"a\tb",
                                    b"\x80\xff", b"a\x00b", b"a\rb", b"127.0.0.1"]),
                   st.binary(max_size=8))


HEADER = st.tuples(NAMES, VALUES, st.sampled_from([b": ", b":", b" : ", b":\t"]))
BASE = [(b"Host", b"127.0.0.1:3340", b": "), (b"Upgrade", b"DERP", b": ")]


@settings(max_examples=1000, deadline=None)
@given(extra=st.lists(HEADER, max_size=6), data=st.data(),
       line=st.sampled_from([b"GET /derp HTTP/1.1"] * 4 + [b"GET /derp HTTP/1.0", b"POST /derp HTTP/1.1",
                                                            b"GET /derp/ HTTP/1.1", b"GET  /derp HTTP/1.1"]),
       tail=st.binary(max_size=16), end=st.sampled_from([b"\r\n\r\n"] * 4 + [b"\r\n", b"\n\n", b""]))
def test_agrees_with_h11_on_everything_it_accepts(extra, data, line, tail, end):
    """Valid requests with random extra headers in random places, and some broken ones."""
    headers = data.draw(st.permutations(BASE + extra))
    raw = line + b"".join(b"\r\n" + n + sep + v for n, v, sep in headers) + end + tail
    got = read_plain_derp_request(raw)
    if got is not None:
        assert h11_view(raw) == (got.upgrade, got.trailing)
    elif h11_view(raw) not in (None, "error"):
        route, _ = h11_view(raw)
        # declined: fine, h11 serves it; but the plainest form must be accepted
        assert extra or line != b"GET /derp HTTP/1.1" or end != b"\r\n\r\n" or not isinstance(route, DerpUpgrade)


def test_accepted_share_of_generated_requests():
    """The property above is only worth something if it sees accepted requests."""
    accepted = 0

    @settings(max_examples=300, deadline=None, database=None, derandomize=True)
    @given(extra=st.lists(HEADER, max_size=3), data=st.data())
    def count(extra, data):
        nonlocal accepted
        headers = data.draw(st.permutations(BASE + extra))
        raw = b"GET /derp HTTP/1.1" + b"".join(b"\r\n" + n + sep + v for n, v, sep in headers) + b"\r\n\r\n"
        if read_plain_derp_request(raw) is not None:
            accepted += 1
            assert h11_view(raw) == (read_plain_derp_request(raw).upgrade, b"")

    count()
    assert accepted >= 30, accepted
