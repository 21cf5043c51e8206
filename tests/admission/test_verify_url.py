"""``--verify-client-url`` against a server that answers like headscale's ``/verify``."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from derpd import client as derp_client
from derpd.admission import (
    MAX_IN_FLIGHT_PER_SOURCE,
    MAX_QUEUED_PER_SOURCE,
    MAX_RESPONSE_BODY,
    AdmissionConfigError,
    FairShare,
    Protection,
    VerifyClientURL,
    parse_verify_response,
    post_json,
    request_body,
    source_of,
)
from derpd.keys import NodePrivate, NodePublic
from derpd.protocol.handshake import ClientHandshake
from derpd.protocol.messages import ClientInfo

from .conftest import logs_in, recv_data, start_relay


async def test_headscale_round_trip_admits_registered_and_refuses_others(relay, headscale):
    known, stranger = NodePrivate.generate(), NodePrivate.generate()
    headscale.node_keys.add(str(known.public))
    relay.server.admission_checks.append(VerifyClientURL(headscale.url).check)
    with trio.fail_after(10):
        assert await logs_in(relay, known)
        assert not await logs_in(relay, stranger)
    assert relay.server.stats.admission_refused["verify_denied"] == 1
    # What the relay sent: derper's exact request (spec 7.2).
    assert [s.method for s in headscale.seen] == [b"POST", b"POST"]
    first = headscale.seen[0]
    assert first.target == b"/verify"
    assert b"content-type" not in first.headers
    assert first.headers[b"content-length"] == str(len(first.body)).encode()
    assert first.body == b'{"NodePublic":"%s","Source":"127.0.0.1"}' % str(known.public).encode()
    assert json.loads(headscale.seen[1].body)["NodePublic"] == str(stranger.public)


async def test_admitted_clients_relay_and_refused_ones_get_no_server_info(relay, headscale):
    a, b, c = NodePrivate.generate(), NodePrivate.generate(), NodePrivate.generate()
    headscale.node_keys |= {str(a.public), str(b.public)}
    relay.server.admission_checks.append(VerifyClientURL(headscale.url).check)
    with trio.fail_after(10):
        async with derp_client.connect(relay.derp_url, a) as ca, derp_client.connect(relay.derp_url, b) as cb:
            await ca.send(b.public, b"admitted")
            assert await recv_data(cb) == b"admitted"
        with pytest.raises(Exception) as info:
            async with derp_client.connect(relay.derp_url, c):
                pass
        assert not isinstance(info.value, trio.TooSlowError)  # closed at once, not left hanging
    assert relay.server.registry.connections(c.public.raw) == []


async def test_headscale_answers_as_specified(headscale):
    """Our client's view of each of headscale's answers."""
    key = NodePrivate.generate().public
    headscale.node_keys.add(str(key))
    with trio.fail_after(10):
        assert await post_json(headscale.url, request_body(key, "192.0.2.1")) == (200, b'{"Allow":true}\n')
        status, body = await post_json(headscale.url, request_body(NodePrivate.generate().public, ""))
        assert (status, body) == (200, b'{"Allow":false}\n')
        assert parse_verify_response(status, body) == (False, "verify_denied")
        assert (await post_json(headscale.url, b"{not json"))[0] == 400
        assert (await post_json(headscale.url, b"{" + b" " * MAX_RESPONSE_BODY + b"}"))[0] == 413
    assert headscale.seen[0].headers.get(b"content-type") is None


async def test_wrong_method_gets_405(headscale):
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", headscale.port)
        await stream.send_all(b"GET /verify HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        got = b""
        while data := await stream.receive_some(4096):
            got += data
    assert got.startswith(b"HTTP/1.1 405 ")


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (500, None, "verify_status"),
        (403, None, "verify_status"),
        (None, b"<html>not json</html>", "verify_bad_response"),
        (None, b'{"Allow":"yes"}', "verify_bad_response"),
        (None, b"{}", "verify_denied"),
        (None, b"null", "verify_denied"),
    ],
)
async def test_fail_open_does_not_cover_bad_answers(relay, headscale, status, body, reason):
    headscale.status, headscale.body = status, body
    relay.server.admission_checks.append(VerifyClientURL(headscale.url, fail_open=True).check)
    with trio.fail_after(10):
        assert not await logs_in(relay, NodePrivate.generate())
    assert relay.server.stats.admission_refused[reason] == 1


async def test_case_insensitive_allow_and_extra_fields(relay, headscale):
    headscale.body = b'{"allow": true, "Reason": "ok"}\ntrailing'
    relay.server.admission_checks.append(VerifyClientURL(headscale.url).check)
    with trio.fail_after(10):
        assert await logs_in(relay, NodePrivate.generate())


async def closed_port_url() -> str:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connect is refused
    return f"http://127.0.0.1:{port}/verify"


@pytest.mark.parametrize("fail_open", [True, False])
async def test_unreachable_url_follows_fail_open(relay, fail_open, caplog):
    url = await closed_port_url()
    relay.server.admission_checks.append(VerifyClientURL(url, fail_open=fail_open).check)
    with trio.fail_after(10):
        assert await logs_in(relay, NodePrivate.generate()) is fail_open
        assert await logs_in(relay, NodePrivate.generate()) is fail_open
    refused = relay.server.stats.admission_refused["verify_unreachable"]
    assert refused == (0 if fail_open else 2)
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1  # logged once, not per client


@pytest.mark.parametrize("fail_open", [True, False])
async def test_timeout_follows_fail_open(relay, headscale, fail_open):
    headscale.hang = True
    relay.server.admission_checks.append(VerifyClientURL(headscale.url, fail_open=fail_open, timeout=0.3).check)
    with trio.fail_after(10):
        assert await logs_in(relay, NodePrivate.generate()) is fail_open


async def test_decisions_are_cached_and_concurrent_checks_share_one_request(relay, headscale):
    key = NodePrivate.generate()
    headscale.node_keys.add(str(key.public))
    verify = VerifyClientURL(headscale.url, cache_ttl=60)
    relay.server.admission_checks.append(verify.check)
    results = []
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            for _ in range(20):  # a reconnect storm of one client
                n.start_soon(lambda: verify.check(key.public, None, "127.0.0.1"))
        assert verify.requests == 1
        for _ in range(5):
            results.append(await logs_in(relay, key))
    assert results == [True] * 5
    assert verify.requests == 1 and len(headscale.seen) == 1


async def test_mesh_peers_skip_admission(nursery, headscale):
    mesh_key = bytes(range(32))
    relay = await start_relay(nursery, mesh_key=mesh_key)
    verify = VerifyClientURL(headscale.url)  # knows no keys: refuses everyone
    relay.server.admission_checks.append(verify.check)
    with trio.fail_after(10):
        assert await logs_in(relay, NodePrivate.generate(), mesh_key=mesh_key)
        assert not await logs_in(relay, NodePrivate.generate(), mesh_key=bytes(32 * [7]))  # wrong key
    assert verify.requests == 1


def test_bad_urls_fail_at_start():
    for url in ("ftp://x/verify", "/verify", "http://:80/", "http://host:notaport/"):
        with pytest.raises(AdmissionConfigError):
            VerifyClientURL(url)


@given(st.integers(0, 999), st.binary(max_size=6000))
def test_any_answer_is_judged_without_raising(status, body):
    ok, reason = parse_verify_response(status, body)
    assert ok == (reason == "")
    if ok:
        assert status == 200


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3)))
def test_only_allow_true_admits(value):
    body = json.dumps(value).encode()
    ok, _ = parse_verify_response(200, body)
    expect = isinstance(value, dict) and any(k.lower() == "allow" for k in value) and \
        [v for k, v in value.items() if k.lower() == "allow"][-1] is True
    assert ok == expect


def test_request_body_matches_derper():
    key = NodePublic.parse("nodekey:64b101b1d0be5a8704bd078f9895001fc03e8e9f9522f188dd128d9846d48466")
    assert request_body(key, "2001:db8::1") == (
        b'{"NodePublic":"nodekey:64b101b1d0be5a8704bd078f9895001fc03e8e9f9522f188dd128d9846d48466",'
        b'"Source":"2001:db8::1"}')


async def raw_login_from(relay, source_ip: str) -> trio.SocketStream:
    """Start a login from ``source_ip`` (any 127.0.0.0/8 address): upgrade and ClientInfo, no wait."""
    sock = trio.socket.socket()
    await sock.bind((source_ip, 0))
    await sock.connect(("127.0.0.1", relay.port))
    stream = trio.SocketStream(sock)
    hs = ClientHandshake(NodePrivate.generate(), ClientInfo(), server_key=relay.public_key)
    await stream.send_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n"
                          b"Derp-Fast-Start: 1\r\n\r\n" + hs.client_info_frame())
    return stream


async def test_one_busy_source_cannot_starve_other_logins(nursery, headscale):
    """A controller that never answers one address: that address's 100 logins get at most
    their per-source share of the checks, a bounded number wait, the rest are refused at once
    and counted, and a login from another address is admitted as quickly as ever."""
    relay = await start_relay(nursery)
    headscale.hang_sources.add("127.0.0.2")
    verify = VerifyClientURL(headscale.url, timeout=30)
    Protection(verify=verify).install(relay.server, nursery)  # as derpd serve wires it
    honest = NodePrivate.generate()
    headscale.node_keys.add(str(honest.public))
    stats = relay.server.stats
    refused = 100 - MAX_IN_FLIGHT_PER_SOURCE - MAX_QUEUED_PER_SOURCE
    with trio.fail_after(20):
        flood = [await raw_login_from(relay, "127.0.0.2") for _ in range(100)]
        while stats.admission_refused["admission_busy_source"] < refused or len(headscale.seen) < 8:
            await trio.sleep(0.02)
        await trio.testing.wait_all_tasks_blocked(0.1)
        assert len(headscale.seen) == MAX_IN_FLIGHT_PER_SOURCE
        assert stats.admission_refused["admission_busy_source"] == refused
        start = trio.current_time()
        with trio.fail_after(3):
            assert await logs_in(relay, honest)
        print(f"\n[admission] honest login beside 100 stalled ones took {trio.current_time() - start:.3f}s")
    for s in flood:
        await trio.aclose_forcefully(s)


def test_ipv6_sources_count_per_64():
    assert source_of("2001:db8:1:2::1") == source_of("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert source_of("2001:db8:1:3::1") != source_of("2001:db8:1:2::1")
    assert source_of("::ffff:192.0.2.7") == "192.0.2.7" == source_of("192.0.2.7")


async def test_per_key_cap():
    gate = trio.Event()

    async def slow(key, info, ip):
        await gate.wait()
        return True, ""

    fair = FairShare(per_source=100, per_key=2, queue=0).wrap(slow)
    key = NodePrivate.generate().public
    got = []

    async def one(i: int) -> None:
        got.append(await fair(key, None, f"192.0.2.{i}"))

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            for i in range(5):
                n.start_soon(one, i)
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
    assert sorted(got) == [(False, "admission_busy_key")] * 3 + [(True, "")] * 2


async def test_controller_connections_are_kept_alive(relay, headscale):
    headscale.allow_all = True
    relay.server.admission_checks.append(VerifyClientURL(headscale.url).check)
    with trio.fail_after(10):
        for _ in range(5):
            assert await logs_in(relay, NodePrivate.generate())
    assert len(headscale.seen) == 5 and headscale.connections == 1


@pytest.mark.parametrize("where,requests", [("http://127.0.0.2:{port}/verify", 1), ("/elsewhere", 4)])
async def test_redirects_only_to_the_same_origin(relay, headscale, where, requests):
    """A 307 to another host is an answer (refused, verify_status), never followed; one to the
    same origin is followed, at most 3 times."""
    headscale.location = where.format(port=headscale.port)
    relay.server.admission_checks.append(VerifyClientURL(headscale.url, fail_open=True).check)
    with trio.fail_after(10):
        assert not await logs_in(relay, NodePrivate.generate())
    assert relay.server.stats.admission_refused["verify_status"] == 1
    assert len(headscale.seen) == requests
