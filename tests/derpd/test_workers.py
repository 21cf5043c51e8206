"""``derpd serve --workers N`` as an operator runs it (real processes): a worker that dies is
logged and restarted while the other keeps relaying; one certificate and one registration
however the workers race; a worker that keeps dying stops the parent with a non-zero status;
metrics merged so that sums and times mean what they say."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import trio

from derpd import client as derp_client
from derpd.keys import NodePrivate

from .conftest import held_clients, relay_in_a_ring
from .test_cli import start_coordinator

DERPD = [sys.executable, "-m", "derpd"]


class Parent:
    """A ``derpd serve --workers`` process and what it printed."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.err = b""
        self.out = b""
        self._changed = trio.Event()

        self._open = 2  # stdout and stderr

    async def pump(self, stream: trio.abc.ReceiveStream, attr: str) -> None:
        while chunk := await stream.receive_some(65536):
            setattr(self, attr, getattr(self, attr) + chunk)
            self._changed.set()
            self._changed = trio.Event()
        self._open -= 1
        self._changed.set()

    async def wait_for(self, pattern: bytes, attr: str = "err") -> re.Match[bytes]:
        while True:
            m = re.search(pattern, getattr(self, attr))
            if m:
                return m
            assert self._open, self.err.decode()  # the process closed both pipes without printing it
            await self._changed.wait()


async def start_workers(nursery: trio.Nursery, *args: str) -> tuple[Parent, int, list[int]]:
    """Returns the parent, the relay port and the workers' pids, once every worker serves."""
    proc = await nursery.start(lambda task_status: trio.run_process(
        [*DERPD, "serve", "--workers", "2", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False,
        task_status=task_status))
    parent = Parent(proc)
    nursery.start_soon(parent.pump, proc.stderr, "err")
    nursery.start_soon(parent.pump, proc.stdout, "out")
    m = await parent.wait_for(rb"2 workers on port (\d+) \(pids (\d+) (\d+)\)")
    return parent, int(m.group(1)), [int(m.group(2)), int(m.group(3))]


def listening_on(port: int, pid: int) -> int:
    """How many listening TCP sockets on ``port`` process ``pid`` holds (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    held = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            held += 1
    return held


async def test_a_killed_worker_is_logged_and_restarted_while_the_other_relays(nursery):
    with trio.fail_after(90):
        parent, port, pids = await start_workers(nursery, "--dev", "-a", "127.0.0.1:0", "--stun-port", "-1")
        # Each worker holds only its own socket on the relay port; the parent holds none.
        assert [listening_on(port, pid) for pid in [parent.proc.pid, *pids]] == [0, 1, 1]
        url = f"http://127.0.0.1:{port}/derp"
        keys = [NodePrivate.generate() for _ in range(12)]
        async with held_clients(url, keys) as clients:
            await relay_in_a_ring(keys, clients, b"before")
            os.kill(pids[1], signal.SIGKILL)  # a child of the parent we started
            await parent.wait_for(rb"worker 1 \(pid %d\) was killed by SIGKILL" % pids[1])
            # Clients of worker 0 notice nothing: find them (those whose connection survives) and
            # relay between them while worker 1 is down.
            survivors = []

            async def alive(k: NodePrivate) -> None:
                try:
                    await clients[k.public].ping(timeout=5)
                    survivors.append(k)
                except (trio.BrokenResourceError, trio.TooSlowError, trio.ClosedResourceError):
                    pass

            async with trio.open_nursery() as pings:
                for k in keys:
                    pings.start_soon(alive, k)
            assert 0 < len(survivors) < len(keys), "the kernel put every client on one worker"
            if len(survivors) > 1:
                await relay_in_a_ring(survivors, clients, b"during")
            m = await parent.wait_for(rb"worker 1 is back \(pid (\d+)\)")
            assert int(m.group(1)) not in pids and parent.proc.returncode is None
            assert [listening_on(port, pid) for pid in [parent.proc.pid, pids[0], int(m.group(1))]] == [0, 1, 1]
        # New clients land on both workers again, and reach each other.
        keys = [NodePrivate.generate() for _ in range(12)]
        async with held_clients(url, keys) as clients:
            await relay_in_a_ring(keys, clients, b"after")
        parent.proc.send_signal(signal.SIGTERM)
        assert await parent.proc.wait() == 0


async def test_one_certificate_and_one_registration_however_the_workers_race(nursery, tmp_path):
    """A fresh --certdir, an IP --hostname and --coordinator, three times: one self-signed
    certificate on disk, served by every worker; the parent prints its node and registers it once."""
    for trial in range(3):
        certdir = tmp_path / f"certs{trial}"
        with trio.fail_after(60):
            coordinator, registered, token_file = await start_coordinator(nursery, tmp_path)
            async with trio.open_nursery() as run:
                parent, port, _ = await start_workers(
                    run, "-c", str(tmp_path / "k"), "-a", "127.0.0.1:0", "--certmode", "manual",
                    "--certdir", str(certdir), "--hostname", "127.0.0.1", "--http-port", "-1", "--stun-port", "0",
                    "--coordinator", coordinator.url, "--coordinator-token-file", str(token_file),
                    "--node-name", f"w{trial}", "--region-id", "901")
                printed = json.loads((await parent.wait_for(rb"(\{.*\})\n", "out")).group(1))
                assert sorted(p.name for p in certdir.iterdir()) == ["127.0.0.1.crt", "127.0.0.1.key"]
                assert printed["STUNPort"] not in (0, 3478)
                for _ in range(8):  # spread over both workers: all serve the printed pin
                    async with derp_client.connect(f"https://127.0.0.1:{port}/derp", NodePrivate.generate(),
                                                   cert_pin=printed["CertName"]) as c:
                        await c.ping()
                await registered.wait()
                nodes = [n for e in coordinator.state.entries.values() for n in [e.node]]
                assert [(n.name, n.cert_name, n.stun_port) for n in nodes if n.name == f"w{trial}"] == [
                    (f"w{trial}", printed["CertName"], printed["STUNPort"])]
                parent.proc.send_signal(signal.SIGTERM)
                assert await parent.proc.wait() == 0


async def test_a_worker_that_keeps_dying_stops_the_parent_with_status_1(nursery, tmp_path):
    with trio.fail_after(90):
        parent, _, pids = await start_workers(
            nursery, "-c", str(tmp_path / "k"), "-a", "127.0.0.1:0", "--certmode", "manual", "--certdir",
            str(tmp_path), "--hostname", "127.0.0.1", "--http-port", "-1", "--stun-port", "-1")
        (tmp_path / "127.0.0.1.crt").write_text("not a certificate\n")  # no worker can start again
        os.kill(pids[1], signal.SIGKILL)
        assert await parent.proc.wait() == 1
        await parent.wait_for(rb"derpd: worker 1 died 5 times within 60 s \(last: could not start: [^\n]*\); stopping\n")
        assert b"Traceback" not in parent.err
        for pid in pids:  # the other worker was stopped too
            assert not Path(f"/proc/{pid}").exists() or b"zombie" in Path(f"/proc/{pid}/status").read_bytes().lower()


def test_merged_metrics_sum_counters_and_connections_and_take_the_earliest_expiry():
    from derpd.workers import aggregate_metrics

    def worker(expiry: float, connections: int, mesh: int) -> str:
        return (f"# HELP derp_tls_cert_not_after_seconds Expiry.\n# TYPE derp_tls_cert_not_after_seconds gauge\n"
                f"derp_tls_cert_not_after_seconds {expiry}\n"
                f"# HELP derp_current_connections Connections.\n# TYPE derp_current_connections gauge\n"
                f"derp_current_connections {connections}\n"
                f"# HELP derp_mesh_peers_connected Peers.\n# TYPE derp_mesh_peers_connected gauge\n"
                f"derp_mesh_peers_connected {mesh}\n"
                f"# HELP derp_accepts_total Accepts.\n# TYPE derp_accepts_total counter\nderp_accepts_total 5.0\n")

    text = aggregate_metrics([worker(2e9, 3, 1), worker(1.9e9, 4, 0)]).decode()
    assert "derp_tls_cert_not_after_seconds 1.9e+09" in text  # the first to expire, not the sum
    assert "derp_current_connections 7.0" in text
    assert "derp_mesh_peers_connected 0.0" in text  # the worker that lost its peer
    assert "derp_accepts_total 10.0" in text


def test_merged_metrics_keep_per_process_series_apart_and_count_clients_once():
    from derpd.workers import aggregate_metrics

    def worker(name: str, local: int, remote: int, fds: int) -> str:
        return (f"# HELP derp_clients_local L.\n# TYPE derp_clients_local gauge\nderp_clients_local {local}\n"
                f"# HELP derp_clients_remote R.\n# TYPE derp_clients_remote gauge\nderp_clients_remote {remote}\n"
                f"# HELP derp_clients C.\n# TYPE derp_clients gauge\nderp_clients {local + remote}\n"
                f"# HELP derp_bootstrap_dns_names N.\n# TYPE derp_bootstrap_dns_names gauge\n"
                f'derp_bootstrap_dns_names{{list="published"}} 2\n'
                f"# HELP process_open_fds F.\n# TYPE process_open_fds gauge\n"
                f'process_open_fds{{worker="{name}"}} {fds}\n')

    text = aggregate_metrics([worker("0", 3, 5, 20), worker("1", 4, 5, 30)]).decode()
    assert "derp_clients_local 7.0" in text and "derp_clients_remote 5.0" in text
    assert "derp_clients 12.0" in text  # local keys of both workers, the region's remote keys once
    assert 'derp_bootstrap_dns_names{list="published"} 2.0' in text
    assert 'process_open_fds{worker="0"} 20.0' in text and 'process_open_fds{worker="1"} 30.0' in text


def test_workers_auto_is_one_per_available_cpu():
    from derpd.cli import WorkerCount

    assert WorkerCount().convert("auto", None, None) == min(64, len(os.sched_getaffinity(0)))
    assert WorkerCount().convert("3", None, None) == 3


async def _scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The parent's /metrics, parsed: family -> (sorted labels) -> value (counters under their
    ``_total`` sample name)."""
    from prometheus_client.parser import text_string_to_metric_families

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = bytearray()
        while chunk := await stream.receive_some(65536):
            data += chunk
    body = bytes(data).partition(b"\r\n\r\n")[2].decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


async def test_worker_links_are_not_mesh_peers_and_process_series_are_per_worker(nursery):
    """Three clients on a --workers 2 relay: the merged metrics count three connections and
    three clients, no mesh peer, watcher or remote client (the links between the workers are
    plumbing), and every process_* series, descriptors included, is one per process with a
    ``worker`` label, as a single process reports it (worker "0")."""
    with trio.fail_after(90):
        parent, port, _pids = await start_workers(nursery, "--dev", "-a", "127.0.0.1:0", "--stun-port", "-1",
                                                  "--metrics-addr", "127.0.0.1:0")
        metrics_port = int((await parent.wait_for(rb"metrics on http://127\.0\.0\.1:(\d+)/metrics")).group(1))
        keys = [NodePrivate.generate() for _ in range(3)]
        async with held_clients(f"http://127.0.0.1:{port}/derp", keys) as clients:
            await relay_in_a_ring(keys, clients, b"counted")
            while True:  # the parent refreshes its merged copy every 2 s: wait for one after the ring
                m = await _scrape(metrics_port)
                if m.get("derp_packets_received_total", {}).get((), 0) >= len(keys):
                    break
                await trio.sleep(0.2)
        assert m["derp_current_connections"][()] == 3
        assert m.get("derp_clients", {}).get(()) == 3
        for name in ("derp_clients_local", "derp_clients_remote", "derp_watchers", "derp_mesh_peers_connected",
                     "derp_mesh_peers_configured"):
            assert list(m[name]) == [()], f"{name} is one series, as without --workers: {m[name]}"
        assert m["derp_clients_local"][()] == 3
        assert m["derp_clients_remote"][()] == 0
        assert m["derp_watchers"][()] == 0
        assert m["derp_mesh_peers_configured"][()] == 0 and m["derp_mesh_peers_connected"][()] == 0
        assert "derp_mesh_peer_up" not in m and "derp_mesh_reconnects_total" not in m
        workers = {(("worker", "0"),), (("worker", "1"),), (("worker", "parent"),)}
        for name in ("process_open_fds", "process_max_fds", "process_cpu_seconds_total",
                     "process_resident_memory_bytes", "process_start_time_seconds"):
            assert set(m[name]) == workers, f"{name}: {sorted(m[name])}"
        assert not [n for n in m if n.endswith("_created")]
        parent.proc.send_signal(signal.SIGTERM)
        assert await parent.proc.wait() == 0
