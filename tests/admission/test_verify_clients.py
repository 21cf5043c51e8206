"""``--verify-clients``: the local tailscaled's LocalAPI decides, through admission's cache, caps,
metrics and (closed) failure rule.  Against a stand-in for the LocalAPI on a unix socket; the
real-tailscaled test lives with the tailnet suite."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest
import trio

from derpd.admission import VerifyClientURL
from derpd.keys import NodePrivate
from derpd.node import load_protection
from derpd.settings import AdmissionSettings
from derpd.localapi import CAPABILITY_VERSION, LocalAPI, judge_whois, tailscaled_verifier

from .conftest import logs_in
from .fake_tailscaled import FakeTailscaled


@pytest.fixture
async def tailscaled(nursery, tmp_path):
    return await nursery.start(FakeTailscaled(str(tmp_path / "tailscaled.sock")).serve)


async def test_tailnet_nodes_are_admitted_and_strangers_refused(relay, tailscaled):
    member, stranger = NodePrivate.generate(), NodePrivate.generate()
    tailscaled.node_keys.add(str(member.public))
    relay.server.admission_checks.append(tailscaled_verifier(tailscaled.path).check)
    with trio.fail_after(10):
        assert await logs_in(relay, member)
        assert not await logs_in(relay, stranger)
    assert relay.server.stats.admission_refused["verify_denied"] == 1
    # What went over the socket: tailscale's own LocalAPI request.
    target, headers = tailscaled.seen[0]
    assert target == b"/localapi/v0/whois?addr=nodekey%3A" + member.public.raw.hex().encode()
    assert headers[b"host"] == b"local-tailscaled.sock"
    assert headers[b"tailscale-cap"] == str(CAPABILITY_VERSION).encode()


async def test_answers_are_cached_per_key_and_source(relay, tailscaled):
    member = NodePrivate.generate()
    tailscaled.node_keys.add(str(member.public))
    verify = tailscaled_verifier(tailscaled.path)
    relay.server.admission_checks.append(verify.check)
    with trio.fail_after(10):
        for _ in range(3):
            assert await logs_in(relay, member)
    assert verify.requests == 1 and len(tailscaled.seen) == 1


async def test_no_tailscaled_fails_closed(relay, tmp_path):
    member = NodePrivate.generate()
    verify = tailscaled_verifier(str(tmp_path / "absent.sock"))
    relay.server.admission_checks.append(verify.check)
    with trio.fail_after(10):
        assert not await logs_in(relay, member)
    assert relay.server.stats.admission_refused["verify_unreachable"] == 1


async def test_a_hung_tailscaled_times_out_and_refuses(tailscaled):
    tailscaled.hang = True
    api = LocalAPI(tailscaled.path, timeout=0.3)
    verify = VerifyClientURL("tailscaled", fail_open=False, timeout=0.3, query=api.query)
    with trio.fail_after(10):
        assert await verify.check(NodePrivate.generate().public, None, "192.0.2.1") == (False, "verify_unreachable")
    await api.aclose()


async def test_an_old_tailscaled_is_refused_and_logged(tailscaled, caplog):
    tailscaled.old = True
    api = LocalAPI(tailscaled.path)
    with trio.fail_after(10):
        assert await api.query(NodePrivate.generate().public, "192.0.2.1") == (False, "verify_status")
    assert "too old" in caplog.text
    await api.aclose()


async def test_concurrent_logins_of_one_key_ask_once(tailscaled):
    member = NodePrivate.generate()
    tailscaled.node_keys.add(str(member.public))
    verify = tailscaled_verifier(tailscaled.path)
    results = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(lambda: _append(results, verify.check(member.public, None, "192.0.2.9")))
    assert results == [(True, "")] * 8 and verify.requests == 1


async def _append(results: list, awaitable) -> None:  # noqa: ANN001
    results.append(await awaitable)


@pytest.mark.parametrize(("status", "body", "decision"), [
    (200, b'{"Node": {}, "UserProfile": {}}', (True, "")),
    (404, b"no match for IP:port\n", (False, "verify_denied")),
    (403, b"invalid localapi request\n", (False, "verify_status")),
    (500, b"", (False, "verify_status")),
    (200, b"not json", (False, "verify_bad_response")),
    (200, b"[]", (False, "verify_bad_response")),
    (200, b"", (False, "verify_bad_response")),
])
def test_judging_whois_answers(status, body, decision):
    assert judge_whois(status, body) == decision


def test_the_flags_build_the_check(tmp_path):
    p = load_protection(AdmissionSettings(verify_clients=True, socket=str(tmp_path / "ts.sock")))
    assert p.tailscaled is not None and p.tailscaled.fail_open is False and str(tmp_path) in p.tailscaled.url
    assert load_protection(AdmissionSettings(verify_clients=False)).tailscaled is None


async def test_serve_verify_clients_socket_as_a_real_process(tailscaled, nursery):
    member, stranger = NodePrivate.generate(), NodePrivate.generate()
    tailscaled.node_keys.add(str(member.public))
    with trio.fail_after(60):
        proc = await nursery.start(lambda task_status: trio.run_process(
            [sys.executable, "-m", "derpd", "serve", "-dev", "-a=127.0.0.1:0", "-stun=false", "-verify-clients",
             "-socket", tailscaled.path, "-v"], stderr=subprocess.PIPE, check=False, task_status=task_status))
        buf = b""
        while not (m := re.search(rb"relay (http://[^ ]+/derp)", buf)):
            chunk = await proc.stderr.receive_some(4096)
            assert chunk, buf.decode()
            buf += chunk
        nursery.start_soon(_drain, proc)

        class _Relay:
            derp_url = m.group(1).decode()

        assert await logs_in(_Relay, member)  # type: ignore[arg-type]
        assert not await logs_in(_Relay, stranger)  # type: ignore[arg-type]
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0


async def _drain(proc: trio.Process) -> None:
    while await proc.stderr.receive_some(4096):
        pass
