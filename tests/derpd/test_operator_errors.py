"""Operator errors on every long-running command (``derpd serve``, ``derpd dev``,
``derpd coordinator``, ``stund serve``), each run as a real process: one line on stderr, no
traceback, exit status 2 for start-up errors; Ctrl-C and SIGTERM end with one line and exit 0."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from derpd.keyfile import load_or_create

DERPD = [sys.executable, "-m", "derpd"]
STUND = [sys.executable, "-m", "stund"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def busy() -> Iterator[tuple[int, int]]:
    """A listening TCP port and a bound UDP port on 127.0.0.1, held by this test."""
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    with tcp, udp:
        yield tcp.getsockname()[1], udp.getsockname()[1]


async def run(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        return await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False, cwd=REPO)


def assert_one_line(result: subprocess.CompletedProcess[bytes], *needles: str, code: int = 2) -> None:
    err = result.stderr.decode()
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert result.returncode == code, err
    assert result.stdout == b"", result.stdout
    for needle in needles:
        assert needle in err, (needle, err)


# ---------------------------------------------------------------------------- ports in use

PORT_IN_USE = {
    "serve -a": (DERPD + ["serve", "--dev", "-a", "127.0.0.1:{tcp}", "--stun-port", "-1"], " -a"),
    "serve --stun-port": (DERPD + ["serve", "--dev", "-a", "127.0.0.1:0", "--stun-port", "{udp}"], "--stun-port"),
    "serve --metrics-addr": (DERPD + ["serve", "--dev", "-a", "127.0.0.1:0", "--stun-port", "-1",
                                      "--metrics-addr", "127.0.0.1:{tcp}"], "--metrics-addr"),
    "serve --http-port": (DERPD + ["serve", "-c", "{tmp}/k", "-a", "127.0.0.1:0", "--certmode", "manual",
                                   "--certdir", "{tmp}", "--hostname", "127.0.0.1", "--stun-port", "-1",
                                   "--http-port", "{tcp}"], "--http-port"),
    "dev --derp-port": (DERPD + ["dev", "--dir", "{tmp}", "--derp-port", "{tcp}", "--stun-port", "0",
                                 "--map-port", "0"], "--derp-port"),
    "dev --stun-port": (DERPD + ["dev", "--dir", "{tmp}", "--derp-port", "0", "--stun-port", "{udp}",
                                 "--map-port", "0"], "--stun-port"),
    "dev --map-port": (DERPD + ["dev", "--dir", "{tmp}", "--derp-port", "0", "--stun-port", "0",
                                "--map-port", "{tcp}"], "--map-port"),
    "coordinator -a": (DERPD + ["coordinator", "-a", "127.0.0.1:{tcp}", "--state-dir", "{tmp}/state"], " -a"),
    "stund serve -a": (STUND + ["serve", "-a", "127.0.0.1:{udp}"], " -a"),
    "stund serve --workers 2 -a": (STUND + ["serve", "-a", "127.0.0.1:{udp}", "--workers", "2"], " -a"),
    "stund serve --metrics-addr": (STUND + ["serve", "-a", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:{tcp}"],
                                   "--metrics-addr"),
}


@pytest.mark.parametrize("case", sorted(PORT_IN_USE))
async def test_port_in_use_is_one_line_naming_the_port_and_the_flag(case, busy, tmp_path):
    argv, flag = PORT_IN_USE[case]
    tcp, udp = busy
    load_or_create(tmp_path / "k")  # an existing key file: no "created key file" line
    result = await run([a.format(tcp=tcp, udp=udp, tmp=tmp_path) for a in argv])
    port = udp if "{udp}" in " ".join(argv) else tcp
    assert_one_line(result, f"127.0.0.1:{port}", "in use", flag)


LOW_PORT = {
    "serve": DERPD + ["serve", "--dev", "-a", "127.0.0.1:1", "--stun-port", "-1"],
    "coordinator": DERPD + ["coordinator", "-a", "127.0.0.1:1", "--state-dir", "{tmp}"],
    "stund serve": STUND + ["serve", "-a", "127.0.0.1:1"],
}


@pytest.mark.parametrize("case", sorted(LOW_PORT))
async def test_permission_denied_on_a_low_port_is_one_line(case):
    shared = Path(tempfile.mkdtemp(prefix="derpd-test-"))  # writable by the unprivileged user too
    shared.chmod(0o777)
    argv = [a.format(tmp=shared) for a in LOW_PORT[case]]
    if os.geteuid() == 0:  # root may bind anything: run it as nobody
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv (util-linux) to drop to an unprivileged user")
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    elif int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text()) <= 1:
        pytest.skip("this machine lets every user bind port 1 (net.ipv4.ip_unprivileged_port_start)")
    try:
        assert_one_line(await run(argv), "127.0.0.1:1", "permission denied", "CAP_NET_BIND_SERVICE", " -a")
    finally:
        shutil.rmtree(shared)


# ---------------------------------------------------------------------------- certificates


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate and key for 127.0.0.1 made by derpd itself (returns both paths)."""
    from derpd.relay.tls import load_manual_cert

    cert = load_manual_cert(tmp_path, "127.0.0.1")
    return cert.cert_path, cert.key_path


def _serve_tls(tmp_path: Path, hostname: str) -> list[str]:
    load_or_create(tmp_path / "k")  # an existing key file: no "created key file" line
    return DERPD + ["serve", "-c", str(tmp_path / "k"), "-a", "127.0.0.1:0", "--certmode", "manual",
                    "--certdir", str(tmp_path), "--hostname", hostname, "--http-port", "-1", "--stun-port", "-1"]


async def test_missing_certificate_is_one_line(tmp_path):
    assert_one_line(await run(_serve_tls(tmp_path, "derp.example.com")), "derp.example.com.crt", "IP --hostname")


async def test_missing_key_is_one_line(tmp_path):
    crt, _ = _self_signed(tmp_path)
    (tmp_path / "derp.example.com.crt").write_bytes(crt.read_bytes())
    assert_one_line(await run(_serve_tls(tmp_path, "derp.example.com")), "missing the key", "derp.example.com.key")


async def test_unreadable_key_is_one_line(tmp_path):
    crt, _ = _self_signed(tmp_path)
    (tmp_path / "derp.example.com.crt").write_bytes(crt.read_bytes())
    (tmp_path / "derp.example.com.key").mkdir()
    assert_one_line(await run(_serve_tls(tmp_path, "derp.example.com")), "cannot read the key")


async def test_certdir_that_cannot_be_written_is_one_line(tmp_path):
    load_or_create(tmp_path / "k")
    (tmp_path / "file").write_text("a file, not a directory\n")
    argv = DERPD + ["serve", "-c", str(tmp_path / "k"), "-a", "127.0.0.1:0", "--certmode", "manual", "--certdir",
                    str(tmp_path / "file" / "certs"), "--hostname", "127.0.0.1", "--http-port", "-1",
                    "--stun-port", "-1"]
    assert_one_line(await run(argv), "cannot write a self-signed certificate", "--certdir")


async def test_key_of_another_certificate_is_one_line(tmp_path):
    crt, _ = _self_signed(tmp_path)
    (tmp_path / "derp.example.com.crt").write_bytes(crt.read_bytes())
    other = tmp_path / "other"
    other.mkdir()
    _, key = _self_signed(other)
    (tmp_path / "derp.example.com.key").write_bytes(key.read_bytes())
    assert_one_line(await run(_serve_tls(tmp_path, "derp.example.com")), "does not belong to the certificate")


# ---------------------------------------------------------------------------- bad flag values

BAD_FLAGS = {
    "mesh-with bad port": (["--mesh-with", "derp2.example.com:99999"], "0 to 65535"),
    "mesh-with URL": (["--mesh-with", "https://derp2.example.com/derp"], "is a URL; give host[:port]"),
    "mesh-with garbage": (["--mesh-with", "derp2.example.com,@@@"], "neither a hostname nor an IP"),
    "address": (["-a", "127.0.0.1:x"], "0 to 65535"),
    "metrics address": (["--metrics-addr", "127.0.0.1:http2"], "0 to 65535"),
    "duration": (["--tcp-write-timeout", "10x"], "--tcp-write-timeout"),
    "advertised address": (["--advertise-ipv4", "::1"], "not an IPv4 address"),
    "coordinator URL": (["--coordinator", "derpmap.example.com", "--coordinator-token-file", "{mesh}"],
                        "is not a URL"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
async def test_bad_serve_flag_is_one_line(case, tmp_path):
    mesh = tmp_path / "mesh.key"
    mesh.write_text("ab" * 32)
    args, needle = BAD_FLAGS[case]
    argv = DERPD + ["serve", "--dev", "-a", "127.0.0.1:0", "--stun-port", "-1", "--mesh-psk-file", str(mesh),
                    *[a.format(mesh=mesh) for a in args]]
    assert_one_line(await run(argv), needle)


async def test_bad_address_writes_no_key_file(tmp_path):
    key = tmp_path / "derper.key"
    assert_one_line(await run(DERPD + ["serve", "-c", str(key), "-certmode=manual", "-a=:notaport"]), "0 to 65535")
    assert not key.exists()


@pytest.mark.parametrize("argv, needle", [
    (DERPD + ["coordinator", "-a", "127.0.0.1:x", "--state-dir", "{tmp}"], "0 to 65535"),
    (DERPD + ["coordinator", "-a", "8080", "--check", "--state-dir", "{tmp}"], "HOST:PORT"),
    (DERPD + ["dev", "--derp-port", "x"], "--derp-port"),
    (STUND + ["serve", "-a", "127.0.0.1:99999"], "-a"),
    (STUND + ["serve", "--workers", "0"], "--workers"),
], ids=["coordinator -a", "coordinator -a --check", "dev --derp-port", "stund -a", "stund --workers"])
async def test_bad_flag_on_other_commands_is_one_line(argv, needle, tmp_path):
    assert_one_line(await run([a.format(tmp=tmp_path) for a in argv]), needle)


# ---------------------------------------------------------------------------- Ctrl-C and SIGTERM

# The command, the last bytes it prints once it serves, and the words of its one stop line.
LONG_RUNNING = {
    "serve": (DERPD + ["serve", "--dev", "-a", "127.0.0.1:0", "--stun-port", "-1"],
              b"serving plain HTTP without TLS", "received SIG"),
    "serve --workers 2": (DERPD + ["serve", "--dev", "-a", "127.0.0.1:0", "--stun-port", "-1", "--workers", "2"],
                          b"workers on port", "received SIG"),
    "dev": (DERPD + ["dev", "--dir", "{tmp}", "--derp-port", "0", "--stun-port", "0", "--map-port", "0"],
            b"update_frequency: 1m\n\n", "derpd dev: stopped (SIG"),
    "coordinator": (DERPD + ["coordinator", "-a", "127.0.0.1:0", "--state-dir", "{tmp}"], b"/status\n",
                    "derpd coordinator: stopped (SIG"),
    "stund serve": (STUND + ["serve", "-a", "127.0.0.1:0"], b"stund listening on", "stund: stopped (SIG"),
    "stund serve --workers 2": (STUND + ["serve", "-a", "127.0.0.1:0", "--workers", "2"], b"stund listening on",
                                "stund: stopped (SIG"),
}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("case", sorted(LONG_RUNNING))
async def test_signal_stops_with_one_line_and_exit_0(case, signum, tmp_path):
    argv, ready, stop_line = LONG_RUNNING[case]
    argv = [a.format(tmp=tmp_path) for a in argv]
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            proc = await nursery.start(lambda task_status: trio.run_process(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False, cwd=REPO,
                task_status=task_status))
            seen = {proc.stdout: b"", proc.stderr: b""}

            async def read_until_ready(stream: trio.abc.ReceiveStream, done: trio.Event) -> None:
                while ready not in seen[stream] and not done.is_set():
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    seen[stream] += chunk
                    if ready in seen[stream]:
                        done.set()

            ready_event = trio.Event()
            async with trio.open_nursery() as readers:
                for stream in seen:
                    readers.start_soon(read_until_ready, stream, ready_event)
                await ready_event.wait()
                readers.cancel_scope.cancel()
            before = {s: len(b) for s, b in seen.items()}
            proc.send_signal(signum)

            async def read_rest(stream: trio.abc.ReceiveStream) -> None:
                while chunk := await stream.receive_some(65536):
                    seen[stream] += chunk

            async with trio.open_nursery() as readers:
                for stream in seen:
                    readers.start_soon(read_rest, stream)
            code = await proc.wait()
    after = b"".join(seen[s][before[s]:] for s in seen).decode()
    everything = b"".join(seen.values()).decode()
    assert "Traceback" not in everything, everything
    assert code == 0, everything
    assert [line for line in after.splitlines() if line.strip()] == [
        line for line in after.splitlines() if stop_line in line], everything
    assert after.count(stop_line) == 1, everything
