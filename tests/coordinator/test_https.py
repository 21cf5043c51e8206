"""`derpd coordinator` serves HTTPS itself with the relay's certificate code: manual files,
reloaded on SIGHUP or when they change (new connections get the new certificate, open ones
keep theirs), and a plain port beside it that redirects to https."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio
import trustme
from click.testing import CliRunner

from derpd.coordinator import front as front_module
from derpd.coordinator.cli import coordinator_command
from derpd.coordinator.front import FrontOptions
from derpd.coordinator.server import RunningCoordinator, serve_coordinator

from .conftest import FakeProbe, make_config

HOST = "coord.test"


def write_cert(ca: trustme.CA, certdir: Path) -> bytes:
    """Writes a new leaf for HOST (new key) into certdir; returns its DER."""
    leaf = ca.issue_cert(HOST)
    leaf.private_key_pem.write_to_path(certdir / f"{HOST}.key")
    (certdir / f"{HOST}.crt").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


async def open_https(port: int, ctx: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), ctx, server_hostname=HOST)
    await stream.do_handshake()
    return stream


async def get(stream: trio.abc.Stream, path: str, *, close: bool = False) -> bytes:
    """One request on ``stream``; returns the whole answer (head and body)."""
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n"
                          f"{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n".encode())
    got = b""
    while b"\r\n\r\n" not in got or len(got) < got.index(b"\r\n\r\n") + 4 + _length(got):
        data = await stream.receive_some(65536)
        if not data:
            break
        got += data
    return got


def _length(got: bytes) -> int:
    for line in got.split(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


async def start(nursery: trio.Nursery, certdir: Path, **options: object) -> RunningCoordinator:
    front = FrontOptions(certmode="manual", certdir=certdir, hostname=HOST, **options)  # type: ignore[arg-type]
    with trio.fail_after(10):
        return await nursery.start(lambda task_status: serve_coordinator(  # type: ignore[no-any-return]
            make_config(), listen="127.0.0.1:0", probe=FakeProbe(), probing=False, front=front,
            task_status=task_status))


async def test_manual_certificate_and_reload(nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(front_module, "CERT_WATCH_INTERVAL", 0.05)
    first = write_cert(ca, tmp_path)
    coord = await start(nursery, tmp_path)
    assert coord.url == f"https://{HOST}:{coord.port}"
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with trio.fail_after(20):
        old = await open_https(coord.port, ctx)
        assert old.getpeercert(binary_form=True) == first
        assert (await get(old, "/healthz")).startswith(b"HTTP/1.1 200 ")
        assert b'"Regions"' in await get(old, "/derpmap/default")
        # new files: the watcher swaps them in for new connections
        second = write_cert(ca, tmp_path)
        while coord.state.metrics.tls_reloads.labels("ok")._value.get() < 1:
            await trio.sleep(0.05)
        new = await open_https(coord.port, ctx)
        assert new.getpeercert(binary_form=True) == second
        assert (await get(old, "/healthz")).startswith(b"HTTP/1.1 200 ")  # the open one goes on
        # SIGHUP's path, with a broken file: the current certificate stays
        (tmp_path / f"{HOST}.key").write_text("not a key\n")
        assert coord.front.reload_tls() is False
        assert coord.state.metrics.tls_reloads.labels("error")._value.get() >= 1
        again = await open_https(coord.port, ctx)
        assert again.getpeercert(binary_form=True) == second
        # plain HTTP to the TLS port is not served
        plain = await trio.open_tcp_stream("127.0.0.1", coord.port)
        await plain.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.move_on_after(5):
            answer = await plain.receive_some(1024)
            assert b"200 OK" not in answer
        for s in (old, new, again, plain):
            await s.aclose()


async def test_plain_port_redirects_to_https(nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA) -> None:
    write_cert(ca, tmp_path)
    coord = await start(nursery, tmp_path, http_port=0)
    assert coord.http_port
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", coord.http_port)
        answer = await get(stream, "/derpmap/default?x=1", close=True)
    head = answer.split(b"\r\n\r\n")[0].decode()
    assert head.startswith("HTTP/1.1 308 ")
    assert f"location: https://{HOST}:{coord.port}/derpmap/default?x=1" in head.lower()
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", coord.http_port)
        answer = await get(stream, "/.well-known/acme-challenge/nothing", close=True)
    assert answer.startswith(b"HTTP/1.1 404 ")


def test_check_needs_usable_certificate_files(tmp_path: Path, ca: trustme.CA) -> None:
    args = ["--certmode", "manual", "--certdir", str(tmp_path), "--hostname", HOST, "--check",
            "--state-dir", str(tmp_path / "state")]
    result = CliRunner().invoke(coordinator_command, args)
    assert result.exit_code == 2 and "no certificate for 'coord.test'" in result.output
    assert len(result.output.strip().splitlines()) == 1
    write_cert(ca, tmp_path)
    assert CliRunner().invoke(coordinator_command, args).exit_code == 0
    result = CliRunner().invoke(coordinator_command, ["--hostname", HOST, "--check", "--state-dir", str(tmp_path)])
    assert result.exit_code == 2 and "add --certmode" in result.output


async def test_the_command_serves_https_and_reloads_on_sighup(nursery: trio.Nursery, tmp_path: Path,
                                                              ca: trustme.CA) -> None:
    """`derpd coordinator --certmode manual` as a process: HTTPS on the port it prints, a new
    certificate after SIGHUP; and without --certmode one line says it is plain HTTP."""
    import signal
    import subprocess
    import sys

    first = write_cert(ca, tmp_path)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    argv = [sys.executable, "-m", "derpd", "coordinator", "-a", "127.0.0.1:0", "--state-dir", str(tmp_path / "s")]
    for extra, scheme in ((["--certmode", "manual", "--certdir", str(tmp_path), "--hostname", HOST], "https"),
                          ([], "http")):
        proc = await trio.lowlevel.open_process(argv + extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            with trio.fail_after(30):
                out = b""
                assert proc.stdout is not None
                while b"/status\n" not in out:
                    data = await proc.stdout.receive_some(4096)
                    assert data, out
                    out += data
                lines = out.decode().splitlines()
                assert (len(lines), lines[0].startswith("derpd coordinator: plain HTTP")) == (
                    (1, False) if scheme == "https" else (2, True)), lines
                url = lines[-1].split("map at ")[1].split("/derpmap")[0]
                assert url.startswith(f"{scheme}://")
                port = int(url.rsplit(":", 1)[1])
                if scheme == "https":
                    stream = await open_https(port, ctx)
                    assert stream.getpeercert(binary_form=True) == first
                    assert (await get(stream, "/healthz", close=True)).startswith(b"HTTP/1.1 200 ")
                    second = write_cert(ca, tmp_path)
                    proc.send_signal(signal.SIGHUP)
                    await stream.aclose()
                    while True:
                        stream = await open_https(port, ctx)
                        served = stream.getpeercert(binary_form=True)
                        await stream.aclose()
                        if served == second:
                            break
                        await trio.sleep(0.05)  # the reload happens once the signal is read
        finally:
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                await proc.wait()
        assert proc.returncode == 0
