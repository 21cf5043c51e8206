"""Third-party STUN clients against serve_stun: coturn's turnutils_stunclient and
turnutils_natdiscovery, Debian's classic `stun` (RFC 3489) and aioice's STUN codec.

A missing tool skips loudly, naming the Debian package; with CI=true or
DERPD_REQUIRE_INTEROP=1 it fails instead (.ci/setup.d/20-stun-tools.sh installs them).
"""

import os
import re
import shutil
import socket

import pytest
import trio

from stund.server import serve_stun

TIMEOUT = 30


def _required() -> bool:
    return os.environ.get("CI") == "true" or os.environ.get("DERPD_REQUIRE_INTEROP") == "1"


def need_tool(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        msg = (f"STUN INTEROP NOT RUN: `{binary}` is missing; install the Debian package `{package}` "
               f"(sudo apt-get install {package}, or run .ci/setup.d/20-stun-tools.sh as root)")
        if _required():
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def need_aioice():
    try:
        import aioice.stun
    except ImportError:
        msg = "STUN INTEROP NOT RUN: the aioice package is missing; run `pip install -e '.[test]'`"
        if _required():
            pytest.fail(msg)
        pytest.skip(msg)
    return aioice.stun


def _free_port(family=socket.AF_INET, host="127.0.0.1") -> int:
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _has_ipv6() -> bool:
    try:
        _free_port(socket.AF_INET6, "::1")
        return True
    except OSError:
        return False


async def start(nursery, addrs, **kw):
    return await nursery.start(lambda task_status: serve_stun(addrs, task_status=task_status, **kw))


async def run(argv):
    result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    return result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
async def test_turnutils_stunclient(family):
    tool = need_tool("turnutils_stunclient", "coturn")
    host = "127.0.0.1" if family == "ipv4" else "::1"
    if family == "ipv6" and not _has_ipv6():
        pytest.skip("STUN INTEROP NOT RUN over IPv6: no ::1 on this host")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            [(_, port)] = await start(nursery, [("::" if family == "ipv6" else host, 0)])
            out = await run([tool, "-p", str(port), host])
            found = re.findall(r"UDP reflexive addr: (\S+):(\d+)", out)
            assert found, out
            assert {ip for ip, _ in found} == {host}, out
            nursery.cancel_scope.cancel()


async def test_turnutils_stunclient_rfc5780():
    tool = need_tool("turnutils_stunclient", "coturn")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            bound = await start(nursery, [("127.0.0.1", 0)], alternate_ip="127.0.0.2")
            out = await run([tool, "-f", "-p", str(bound[0][1]), "127.0.0.1"])
            assert f"Other addr: : 127.0.0.2:{bound[1][1]}" in out, out
            assert "UDP reflexive addr: 127.0.0.1:" in out, out
            # the CHANGE-REQUEST answers came from the alternate address
            assert f"Response origin: : 127.0.0.2:{bound[1][1]}" in out, out
            nursery.cancel_scope.cancel()


async def test_turnutils_natdiscovery_rfc5780():
    tool = need_tool("turnutils_natdiscovery", "coturn")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            bound = await start(nursery, [("127.0.0.1", 0)], alternate_ip="127.0.0.2")
            out = await run([tool, "-m", "-f", "-p", str(bound[0][1]), "127.0.0.1"])
            assert "NAT with Endpoint Independent Mapping!" in out, out
            assert "NAT with Endpoint Independent Filtering!" in out, out
            # reflexive address = the local address (loopback has no NAT)
            refl = set(re.findall(r"UDP reflexive addr: 127\.0\.0\.1:(\d+)", out))
            local = set(re.findall(r"Local addr: : 0\.0\.0\.0:(\d+)", out))
            assert refl and refl == local, out
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("alternate", [False, True])
async def test_debian_stun_rfc3489_client(alternate):
    tool = need_tool("stun", "stun-client")
    src_port = _free_port()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            kw = {"alternate_ip": "127.0.0.2"} if alternate else {}
            bound = await start(nursery, [("127.0.0.1", 0)], **kw)
            out = await run([tool, f"127.0.0.1:{bound[0][1]}", "-v", "-p", str(src_port)])
            assert f"MappedAddress = 127.0.0.1:{src_port}" in out, out
            if alternate:
                assert f"ChangedAddress = 127.0.0.2:{bound[1][1]}" in out, out
                assert "Primary: Open" in out, out
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
async def test_aioice_codec_reads_our_answers(family):
    stun = need_aioice()
    fam = socket.AF_INET if family == "ipv4" else socket.AF_INET6
    host = "127.0.0.1" if family == "ipv4" else "::1"
    if family == "ipv6" and not _has_ipv6():
        pytest.skip("STUN INTEROP NOT RUN over IPv6: no ::1 on this host")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            [(_, port)] = await start(nursery, [(host, 0)])
            with trio.socket.socket(fam, socket.SOCK_DGRAM) as sock:
                await sock.bind((host, 0))
                for fingerprint in (False, True):
                    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
                    if fingerprint:
                        request.add_fingerprint()
                    await sock.sendto(bytes(request), (host, port))
                    response = stun.parse_message(await sock.recv(4096))  # checks FINGERPRINT too
                    assert response.message_class == stun.Class.RESPONSE
                    assert response.transaction_id == request.transaction_id
                    assert response.attributes["XOR-MAPPED-ADDRESS"] == sock.getsockname()[:2]
                    assert ("FINGERPRINT" in response.attributes) == fingerprint
            nursery.cancel_scope.cancel()


async def test_aioice_codec_reads_rfc5780_and_error_answers():
    stun = need_aioice()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            bound = await start(nursery, [("127.0.0.1", 0)], alternate_ip="127.0.0.2")
            with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                await sock.bind(("127.0.0.1", 0))
                request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST,
                                       attributes={"SOFTWARE": "aioice interop padding"})
                await sock.sendto(bytes(request), bound[0])
                response = stun.parse_message(await sock.recv(4096))
                assert response.attributes["XOR-MAPPED-ADDRESS"] == sock.getsockname()
                assert response.attributes["OTHER-ADDRESS"] == ("127.0.0.2", bound[1][1])
                # An unknown comprehension-required attribute -> 420 that aioice decodes.
                raw = bytearray(bytes(stun.Message(message_method=stun.Method.BINDING,
                                                   message_class=stun.Class.REQUEST)))
                raw[2:4] = (8).to_bytes(2, "big")
                raw += b"\x7f\x01\x00\x04abcd"
                await sock.sendto(bytes(raw), bound[0])
                err = stun.parse_message(await sock.recv(4096))
                assert err.message_class == stun.Class.ERROR
                assert err.attributes["ERROR-CODE"][0] == 420
            nursery.cancel_scope.cancel()
