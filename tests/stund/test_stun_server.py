"""Real UDP tests of serve_stun on 127.0.0.1, ::1 and dual-stack ::."""

import os
import socket

import pytest
import trio
from prometheus_client import REGISTRY, generate_latest

from . import stun_vectors as V
from stund.client import StunErrorResponse, nat_discovery, parse_response, stun_query
from stund.message import (
    Attribute,
    AttrType,
    MessageClass,
    Method,
    encode_change_request,
    encode_message,
    parse_message,
    tailscale_request,
)
from stund.server import StunConfigError, parse_hostport, serve_stun

TIMEOUT = 10


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="SKIPPED LOUDLY: no IPv6 loopback (::1) on this host")


def sample(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def start(nursery, addrs, **kw):
    return await nursery.start(lambda task_status: serve_stun(addrs, task_status=task_status, **kw))


async def exchange(family, dest, data, *, expect_reply=True):
    """Sends one datagram from a fresh socket; returns (reply, reply source, our local address)."""
    with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
        await sock.sendto(data, dest)
        reply, src = await sock.recvfrom(4096)
        return reply, src, sock.getsockname()


async def test_ipv4_answers_every_kind():
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            [(host, port)] = await start(nursery, [("127.0.0.1", 0)])
            assert host == "127.0.0.1" and port > 0
            txid = os.urandom(12)
            reply, _, local = await exchange(socket.AF_INET, (host, port), tailscale_request(txid))
            assert len(reply) == 40 and parse_response(reply, txid).address == local  # + FINGERPRINT
            reply, _, local = await exchange(socket.AF_INET, (host, port), encode_message(
                Method.BINDING, MessageClass.REQUEST, txid, add_fingerprint=True))
            assert parse_response(reply, txid).address == local
            txid16 = os.urandom(16)
            reply, _, local = await exchange(socket.AF_INET, (host, port), encode_message(
                Method.BINDING, MessageClass.REQUEST, txid16))
            assert parse_response(reply, txid16).address == local
            for style in (True, False):
                result = await stun_query(host, port, tailscale_style=style)
                assert result.address[0] == "127.0.0.1" and result.rtt > 0
            nursery.cancel_scope.cancel()


@needs_ipv6
async def test_ipv6_loopback():
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            [(host, port)] = await start(nursery, [("::1", 0)])
            txid = os.urandom(12)
            reply, _, local = await exchange(socket.AF_INET6, (host, port), tailscale_request(txid))
            assert len(reply) == 52 and parse_response(reply, txid).address == local[:2]
            assert (await stun_query("::1", port)).address[0] == "::1"
            nursery.cancel_scope.cancel()


@needs_ipv6
async def test_dual_stack_answers_ipv4_clients_with_family_1():
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            [(_, port)] = await start(nursery, [("::", 0)])
            before = sample("stun_requests_total", family="ipv4", kind="tailscale")
            txid = os.urandom(12)
            reply, _, local = await exchange(socket.AF_INET, ("127.0.0.1", port), tailscale_request(txid))
            assert len(reply) == 40 and reply[25] == 1  # family 1, not ::ffff:127.0.0.1 (P-26)
            assert parse_response(reply, txid).address == local
            assert sample("stun_requests_total", family="ipv4", kind="tailscale") == before + 1
            reply, _, local = await exchange(socket.AF_INET6, ("::1", port), tailscale_request(txid))
            assert len(reply) == 52 and parse_response(reply, txid).address == local[:2]
            nursery.cancel_scope.cancel()


async def test_bad_packets_are_ignored_counted_and_serving_continues():
    bad = {
        "too_short": b"\x00\x01\x00",
        "not_stun": b"\xff" * 40,
        "bad_length": V.APPENDIX_A_REQUEST + b"\0\0\0\0",
        "bad_fingerprint": V.APPENDIX_A_REQUEST[:-1] + bytes([V.APPENDIX_A_REQUEST[-1] ^ 1]),
        "not_request": V.APPENDIX_A_RESPONSE_V4,
        "malformed": b"\x00\x01\x00\x04\x21\x12\xa4\x42" + bytes(12) + b"\x80\x22\x00\x09",
        "unsupported_method": encode_message(0x003, MessageClass.REQUEST, os.urandom(12)),
    }
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            [addr] = await start(nursery, [("127.0.0.1", 0)])
            before = {r: sample("stun_ignored_total", reason=r) for r in bad}
            ok_before = sample("stun_responses_total", result="success")
            with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                await sock.bind(("127.0.0.1", 0))
                for data in bad.values():
                    await sock.sendto(data, addr)
                # The server handles one socket's datagrams in order: when the good request is
                # answered, every bad one before it has been dealt with.
                txid = os.urandom(12)
                await sock.sendto(tailscale_request(txid), addr)
                reply = await sock.recv(4096)
                assert parse_response(reply, txid).address == sock.getsockname()
            for reason in bad:
                assert sample("stun_ignored_total", reason=reason) == before[reason] + 1, reason
            assert sample("stun_responses_total", result="success") == ok_before + 1
            nursery.cancel_scope.cancel()


async def test_unknown_required_attribute_gets_420_over_udp():
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            [addr] = await start(nursery, [("127.0.0.1", 0)])
            txid = os.urandom(12)
            before = sample("stun_responses_total", result="error")
            reply, _, _ = await exchange(socket.AF_INET, addr, encode_message(
                Method.BINDING, MessageClass.REQUEST, txid, [Attribute(0x7123, b"abcd")]))
            with pytest.raises(StunErrorResponse) as info:
                parse_response(reply, txid)
            assert info.value.code == 420
            assert sample("stun_responses_total", result="error") == before + 1
            nursery.cancel_scope.cancel()


async def test_tailscale_only_ignores_others():
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            [addr] = await start(nursery, [("127.0.0.1", 0)], tailscale_only=True)
            before = sample("stun_ignored_total", reason="not_tailscale")
            with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                await sock.bind(("127.0.0.1", 0))
                await sock.sendto(encode_message(Method.BINDING, MessageClass.REQUEST, os.urandom(12)), addr)
                txid = os.urandom(12)
                await sock.sendto(tailscale_request(txid), addr)
                assert parse_response(await sock.recv(4096), txid).address == sock.getsockname()
            assert sample("stun_ignored_total", reason="not_tailscale") == before + 1
            nursery.cancel_scope.cancel()


@needs_ipv6
async def test_several_addresses():
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            bound = await start(nursery, [("127.0.0.1", 0), ("::1", 0)])
            assert [h for h, _ in bound] == ["127.0.0.1", "::1"]
            for host, port in bound:
                assert (await stun_query(host, port)).address[0] == host
            nursery.cancel_scope.cancel()


async def test_rfc5780_on_two_loopback_addresses():
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            bound = await start(nursery, [("127.0.0.1", 0)], alternate_ip="127.0.0.2")
            (p_ip, p_port), (_, a_port), (alt_ip, p_port2), (alt_ip2, a_port2) = bound
            assert (p_ip, alt_ip, alt_ip2) == ("127.0.0.1", "127.0.0.2", "127.0.0.2")
            assert p_port == p_port2 and a_port == a_port2 and a_port != p_port
            # CHANGE-REQUEST: the answer comes from the socket asked for.
            for change_ip, change_port, want in [
                (False, False, ("127.0.0.1", p_port)),
                (True, False, ("127.0.0.2", p_port)),
                (False, True, ("127.0.0.1", a_port)),
                (True, True, ("127.0.0.2", a_port)),
            ]:
                txid = os.urandom(12)
                data = encode_message(Method.BINDING, MessageClass.REQUEST, txid, [
                    Attribute(AttrType.CHANGE_REQUEST, encode_change_request(change_ip, change_port)),
                    Attribute(AttrType.SOFTWARE, b"pad to make room for all RFC 5780 attributes")])
                reply, src, local = await exchange(socket.AF_INET, (p_ip, p_port), data)
                assert src == want
                parsed = parse_response(reply, txid)
                assert parsed.address == local
                assert parsed.other_address == ("127.0.0.2", a_port)
                assert parsed.response_origin == want
            report = await nat_discovery("127.0.0.1", p_port)
            assert (report.mapping, report.filtering) == ("no-nat", "endpoint-independent")
            assert report.other_address == ("127.0.0.2", a_port)
            nursery.cancel_scope.cancel()


async def test_nat_discovery_needs_rfc5780_server():
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            [(host, port)] = await start(nursery, [("127.0.0.1", 0)])
            with pytest.raises(Exception, match="alternate-addr"):
                await nat_discovery(host, port)
            nursery.cancel_scope.cancel()


async def test_query_timeout(autojump_clock):
    from stund.client import StunTimeout

    # A bound UDP socket that never answers.
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        await silent.bind(("127.0.0.1", 0))
        with trio.fail_after(TIMEOUT):
            with pytest.raises(StunTimeout, match="no STUN answer"):
                await stun_query("127.0.0.1", silent.getsockname()[1], timeout=2.0)


@pytest.mark.parametrize(
    "addrs, kw, match",
    [
        ([("0.0.0.0", 0)], {"alternate_ip": "127.0.0.2"}, "specific"),
        ([("127.0.0.1", 0)], {"alternate_ip": "::1"}, "family"),
        ([("127.0.0.1", 0)], {"alternate_ip": "127.0.0.1"}, "differ"),
        ([("localhost", 0)], {}, "not an IP"),
        ([], {}, "no address"),
    ],
)
async def test_config_errors(addrs, kw, match):
    with trio.fail_after(TIMEOUT):
        with pytest.raises(StunConfigError, match=match):
            await serve_stun(addrs, **kw)


def test_parse_hostport():
    assert parse_hostport(":3478") == ("::", 3478)
    assert parse_hostport("[::]:0") == ("::", 0)
    assert parse_hostport("127.0.0.1") == ("127.0.0.1", 3478)
    assert parse_hostport("[2001:db8::1]:9") == ("2001:db8::1", 9)
    assert parse_hostport("2001:db8::1") == ("2001:db8::1", 3478)
    for bad in ("1.2.3.4:x", "[::1", "1.2.3.4:70000"):
        with pytest.raises(StunConfigError):
            parse_hostport(bad)


def test_metrics_are_in_the_default_registry():
    text = generate_latest(REGISTRY).decode()
    for name in ("stun_requests_total", "stun_responses_total", "stun_ignored_total",
                 "stun_read_errors_total", "stun_write_errors_total"):
        assert f"# TYPE {name} counter" in text
    assert 'stun_requests_total{family="ipv4",kind="rfc3489"}' in text
