"""derper's endpoints: /debug/ (index, varz; loopback and --debug-allow only; 404 for the rest)
and /bootstrap-dns (derper's JSON, resolved in the background, ``q`` for unpublished names)."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import trio

from derpd.bootstrapdns import BootstrapDNS, getaddrinfo_ips, go_json, parse_names
from derpd.relay.http_front import debug_allowed
from derpd.settings import SettingsError

from .conftest import read_until_closed, start_relay


async def get(port: int, target: str, *headers: str) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on a fresh connection; returns status, headers, body (de-chunked:
    the interop suite asks Go's server too)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    extra = "".join(f"{h}\r\n" for h in headers)
    await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: derp\r\n{extra}Connection: close\r\n\r\n".encode())
    raw = await read_until_closed(stream)
    await stream.aclose()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    fields = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    if fields.get("transfer-encoding") == "chunked":
        out, rest = bytearray(), body
        while (size := int(rest.partition(b"\r\n")[0], 16)):
            rest = rest.partition(b"\r\n")[2]
            out += rest[:size]
            rest = rest[size + 2:]
        body = bytes(out)
    return int(lines[0].split()[1]), fields, body


def metric_names(text: bytes) -> set[str]:
    return {line.split()[2] for line in text.decode().splitlines() if line.startswith("# TYPE")}


async def test_debug_varz_is_the_metrics_text(nursery):
    relay = await start_relay(nursery)
    with trio.fail_after(10):
        status, fields, varz = await get(relay.port, "/debug/varz")
        _, metrics_fields, metrics = await get(relay.port, "/metrics")
    assert status == 200 and fields["content-type"] == metrics_fields["content-type"]
    assert fields["content-type"].startswith("text/plain; version=")
    assert metric_names(varz) == metric_names(metrics) and b"derp_http_requests" in varz


async def test_debug_index_and_unknown_paths(nursery):
    relay = await start_relay(nursery, hostname="derp.example.com")
    with trio.fail_after(10):
        status, fields, body = await get(relay.port, "/debug/")
        assert status == 200 and fields["content-type"] == "text/html; charset=utf-8"
        assert b'href="/debug/varz"' in body and b"derp.example.com" in body
        for path in ("/debug/pprof/", "/debug/vars", "/debug/nope?x=1", "/debug/varz/"):
            status, _, body = await get(relay.port, path)
            assert status == 404 and b"DERP" not in body, path  # never the home page
        status, fields, _ = await get(relay.port, "/debug")
        assert status == 301 and fields["location"] == "/debug/"
    assert relay.server.stats.http_requests["debug"] == 6


async def test_debug_refuses_requests_relayed_by_a_proxy(nursery):
    relay = await start_relay(nursery)
    with trio.fail_after(10):
        for path in ("/debug/", "/debug/varz", "/debug/nope"):
            status, _, body = await get(relay.port, path, "X-Forwarded-For: 198.51.100.7")
            assert status == 403 and body == b"debug access denied\n"


def test_debug_peers_loopback_and_allowed_networks():
    server = SimpleNamespace(settings=SimpleNamespace(debug_allow=(ipaddress.ip_network("10.0.0.0/8"),
                                                                   ipaddress.ip_network("fd7a:115c:a1e0::/48"))))
    allowed = ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1", "10.1.2.3", "::ffff:10.0.0.9", "fd7a:115c:a1e0::5"]
    refused = ["192.0.2.1", "100.64.0.1", "2001:db8::1", "11.0.0.1", "not-an-ip"]
    assert all(debug_allowed(server, ip) for ip in allowed)  # type: ignore[arg-type]
    assert not any(debug_allowed(server, ip) for ip in refused)  # type: ignore[arg-type]


async def test_debug_on_the_port_80_listener(nursery, tmp_path):
    relay = await start_relay(nursery, certmode="manual", certdir=tmp_path, hostname="127.0.0.1", http_port=0)
    assert relay.http_port is not None
    with trio.fail_after(10):
        status, _, body = await get(relay.http_port, "/debug/varz")
        assert status == 200 and b"derp_http_requests" in body
        status, _, _ = await get(relay.http_port, "/debug/nope")
        assert status == 404
        status, fields, _ = await get(relay.http_port, "/other")
        assert status == 302 and fields["location"].startswith("https://")


# ---------------------------------------------------------------------------- /bootstrap-dns

ADDRESSES = {"controlplane.example.com": ["192.0.2.10", "2001:db8::10"], "login.example.com": ["192.0.2.11"],
             "hidden.example.com": ["198.51.100.5"]}


async def fake_resolve(name: str) -> list[str]:
    await trio.lowlevel.checkpoint()
    if name not in ADDRESSES:
        raise OSError(-2, "Name or service not known")
    return list(ADDRESSES[name])


async def test_bootstrap_dns_serves_derper_s_json(nursery):
    relay = await start_relay(nursery)
    names = BootstrapDNS(["controlplane.example.com", "nowhere.invalid", "login.example.com"],
                         ["hidden.example.com"], resolve=fake_resolve)
    relay.server.bootstrap_dns = names.answer
    with trio.fail_after(10):
        status, fields, body = await get(relay.port, "/bootstrap-dns")
        assert status == 200 and body == b""  # before the first round, as derper
        await nursery.start(names.run)
        status, fields, body = await get(relay.port, "/bootstrap-dns")
        assert status == 200 and fields["content-type"] == "application/json" and fields["connection"] == "close"
        assert "strict-transport-security" in fields  # derper's browser headers
        doc = json.loads(body)
        assert doc.keys() == {"controlplane.example.com", "login.example.com"}  # failed name left out
        assert sorted(doc["controlplane.example.com"]) == ["192.0.2.10", "2001:db8::10"]
        assert body.startswith(b'{\n\t"controlplane.example.com": [\n\t\t"')  # MarshalIndent, keys sorted
        # an unpublished name only when asked for by name, and alone
        _, _, body = await get(relay.port, "/bootstrap-dns?q=hidden.example.com")
        assert body == b'{\n\t"hidden.example.com": [\n\t\t"198.51.100.5"\n\t]\n}'
        _, _, other = await get(relay.port, "/bootstrap-dns?q=unknown.example.com")
        assert json.loads(other).keys() == doc.keys()
    assert names.requests == 4 and names.rounds == 1
    relay.server.metrics_registry.register(names)
    text = relay.server.metrics_text().decode()
    assert 'derp_bootstrap_dns_requests_total{answer="unpublished"} 1.0' in text
    assert 'derp_bootstrap_dns_requests_total{answer="published"} 3.0' in text
    assert "derp_bootstrap_dns_lookup_failures_total 1.0" in text
    assert 'derp_bootstrap_dns_names{list="published"} 2.0' in text


def test_go_json_matches_marshal_indent():
    assert go_json({"b": ["1.2.3.4"], "a": []}) == b'{\n\t"a": [],\n\t"b": [\n\t\t"1.2.3.4"\n\t]\n}'


async def test_a_round_is_bounded_and_keeps_what_it_found():
    async def slow(name: str) -> list[str]:
        if name == "stuck.example.com":
            await trio.sleep_forever()
        return await fake_resolve(name)

    names = BootstrapDNS(["login.example.com", "stuck.example.com"], resolve=slow, timeout=0.2)
    with trio.fail_after(10):
        await names.refresh()
    assert json.loads(names.published_body) == {"login.example.com": ["192.0.2.11"]}


async def test_nothing_resolved_is_go_s_null():
    names = BootstrapDNS(["nowhere.invalid"], resolve=fake_resolve)
    with trio.fail_after(10):
        await names.refresh()
    assert names.answer("", "192.0.2.1") == b"null"


async def test_the_real_resolver_on_localhost():
    with trio.fail_after(10):
        ips = await getaddrinfo_ips("localhost")
    assert "127.0.0.1" in ips or "::1" in ips
    assert len(ips) == len(set(ips))


def test_name_lists():
    assert parse_names("--x", " a.example.com,,b.example.com ") == ("a.example.com", "b.example.com")
    with pytest.raises(SettingsError, match="TXT"):
        parse_names("--unpublished-bootstrap-dns-names", "a.example.com/rollout.example.com")


@pytest.mark.parametrize(("args", "words"), [
    (["--unpublished-bootstrap-dns-names=a.example.com/pct.example.com"], "TXT-record rollout"),
    (["--debug-allow", "10.0.0.0/33"], "--debug-allow"),
])
def test_bad_endpoint_flags_are_one_line(args, words):
    result = subprocess.run([sys.executable, "-m", "derpd", "serve", "--dev", "-a", "127.0.0.1:0", *args],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and words in result.stderr and result.stderr.count("\n") == 1


async def test_serve_with_bootstrap_dns_names_as_a_real_process(nursery):
    from .test_cli import start_serve

    with trio.fail_after(60):
        proc, port = await start_serve("--dev", "-a=127.0.0.1:0", "-stun=false", "-bootstrap-dns-names=localhost",
                                       "-unpublished-bootstrap-dns-names=localhost", nursery=nursery)
        while not (body := (await get(port, "/bootstrap-dns"))[2]):  # the first round runs in the background
            await trio.sleep(0.05)
        assert "127.0.0.1" in json.loads(body)["localhost"] or "::1" in json.loads(body)["localhost"]
        _, _, metrics = await get(port, "/debug/varz")
        assert b'derp_bootstrap_dns_names{list="published"} 1.0' in metrics
        proc.terminate()
        assert await proc.wait() == 0
