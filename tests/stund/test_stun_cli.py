"""The stund command line, run as real processes: serve (with --workers and --metrics-addr) and check."""

import os
import re
import subprocess
import sys
import urllib.request

import trio

from stund.client import stun_query
from stund.server import serve_stun

TIMEOUT = 30


async def read_lines_until(stream, patterns):
    """Reads a process's stdout until every regex in ``patterns`` matched; returns the matches."""
    buf = b""
    found = {}
    while len(found) < len(patterns):
        chunk = await stream.receive_some(4096)
        assert chunk, f"stund exited early; output so far: {buf!r}"
        buf += chunk
        for key, pat in patterns.items():
            m = re.search(pat, buf.decode())
            if m:
                found[key] = m
    return found


def scrape(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def total(text, name):
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


async def test_serve_with_workers_and_metrics():
    argv = [sys.executable, "-m", "stund", "serve", "-a", "127.0.0.1:0", "--workers", "2",
            "--metrics-addr", "127.0.0.1:0"]
    with trio.fail_after(TIMEOUT):
        proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
        try:
            m = await read_lines_until(proc.stdout, {
                "listen": r"stund listening on 127\.0\.0\.1:(\d+)",
                "metrics": r"stund metrics on (http://\S+)",
            })
            port, url = int(m["listen"].group(1)), m["metrics"].group(1)
            children = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
            cmdlines = [open(f"/proc/{c}/cmdline", "rb").read() for c in children]
            workers = [c for c in cmdlines if b"spawn_main" in c]  # not multiprocessing's resource tracker
            assert len(workers) == 2, cmdlines
            before = total(await trio.to_thread.run_sync(scrape, url), "stun_requests_total")
            n = 40
            result = await trio.run_process(
                [sys.executable, "-m", "stund", "check", f"127.0.0.1:{port}"], capture_stdout=True)
            assert re.search(r"mapped address: 127\.0\.0\.1:\d+\nrtt: [\d.]+ ms", result.stdout.decode())
            for _ in range(n - 1):  # each query uses a fresh source port: spread over the workers
                assert (await stun_query("127.0.0.1", port)).address[0] == "127.0.0.1"
            text = await trio.to_thread.run_sync(scrape, url)
            # The parent adds up both workers' shared counters.
            assert total(text, "stun_requests_total") == before + n
            assert 'stun_responses_total{result="success"}' in text
            # Descriptors and CPU are per process: the workers', each labelled, and the parent's.
            for name in ("process_open_fds", "process_max_fds", "process_cpu_seconds_total"):
                assert workers_of(text, name) == {"0", "1", "parent"}, name
        finally:
            proc.terminate()
            await proc.wait()


def workers_of(text, name):
    """The ``worker`` labels of the samples of ``name``; "" for a sample without one."""
    return {(re.search(r'worker="([^"]*)"', labels or "") or [None, ""])[1]
            for labels in re.findall(rf"^{name}(\{{[^}}]*\}})? \S+$", text, re.M)}


async def test_single_process_labels_its_process_series_worker_0():
    """As derpd does: process_* carry worker="0" without --workers, so one alert fits both."""
    argv = [sys.executable, "-m", "stund", "serve", "-a", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"]
    with trio.fail_after(TIMEOUT):
        proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
        try:
            m = await read_lines_until(proc.stdout, {"metrics": r"stund metrics on (http://\S+)"})
            text = await trio.to_thread.run_sync(scrape, m["metrics"].group(1))
            for name in ("process_open_fds", "process_max_fds", "process_cpu_seconds_total", "python_info"):
                assert workers_of(text, name) == {"0"}, name
            assert 'stun_requests_total{family="ipv4",kind="tailscale"} 0.0' in text  # no worker label
        finally:
            proc.terminate()
            await proc.wait()


async def test_check_nat_against_rfc5780_server():
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(lambda task_status: serve_stun(
                [("127.0.0.1", 0)], alternate_ip="127.0.0.2", task_status=task_status))
            result = await trio.run_process(
                [sys.executable, "-m", "stund", "check", "--nat", f"127.0.0.1:{bound[0][1]}"],
                capture_stdout=True)
            out = result.stdout.decode()
            assert f"other address: 127.0.0.2:{bound[1][1]}" in out
            assert "mapping behaviour: no-nat" in out
            assert "filtering behaviour: endpoint-independent" in out
            nursery.cancel_scope.cancel()


async def test_check_reports_timeout_with_a_hint():
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        with trio.fail_after(TIMEOUT):
            result = await trio.run_process(
                [sys.executable, "-m", "stund", "check", "--timeout", "0.3", f"127.0.0.1:{silent.getsockname()[1]}"],
                capture_stderr=True, check=False)
    assert result.returncode == 1
    assert b"no STUN answer" in result.stderr and b"reachable" in result.stderr


async def test_serve_rejects_bad_configuration():
    with trio.fail_after(TIMEOUT):
        result = await trio.run_process(
            [sys.executable, "-m", "stund", "serve", "-a", "0.0.0.0:0", "--alternate-addr", "127.0.0.2"],
            capture_stderr=True, check=False)
    assert result.returncode == 2  # a start-up error
    assert b"RFC 5780 needs specific addresses" in result.stderr


def test_help_and_version():
    from click.testing import CliRunner

    from stund.cli import main

    for args in (["-h"], ["--help"], ["serve", "-h"], ["check", "-h"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0 and "Usage:" in result.output, (args, result.output)
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and re.fullmatch(r"stund, version \d+\.\d+\.\d+\S*\n", result.output), result.output
