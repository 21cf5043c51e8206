"""``derpd check --throughput``: packets through one relay and across a meshed pair, with the
relays' own counters for the run; a path that does not exist and counters that cannot be read
are each named in one line."""

from __future__ import annotations

import socket
import sys

import trio
from click.testing import CliRunner

from derpd.check import run_throughput
from derpd.cli import main
from derpd.keys import NodePrivate

from .conftest import start_relay
from .test_mesh import free_ports, start_node
from .test_operator_errors import run

DERPD = [sys.executable, "-m", "derpd"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_throughput_through_one_relay(relay):
    with trio.fail_after(20):
        run = await run_throughput(relay.derp_url, 0.5, size=1000)
    # The window (24) is below the relay's queue (32): nothing is lost unless the run stalled for seconds
    # (then the window opens again on the sender's guess).
    assert run.sent > 0 and run.corrupted == 0 and (run.lost == 0 or run.stalls), (run.lost, run.stalls)
    assert run.rtts and 0 < run.percentile(50) <= run.percentile(99)
    assert run.mbit_per_s > 0 and run.packets_per_s > 0 and run.ping_rtt is not None
    where, counters = run.counters[relay.derp_url]
    assert where.endswith("/metrics")
    # the relay counted every packet of the run (plus the echoes and the warm-up), and dropped none
    assert counters["received"] >= run.sent and counters["sent"] >= run.received
    assert counters["dropped"] == 0 and counters["forwarded out"] == 0


async def test_throughput_across_a_meshed_pair(nursery):
    ports = await free_ports(2)
    nodes = [await start_node(nursery, NodePrivate.generate(), ports[i], [ports[1 - i]]) for i in range(2)]
    with trio.fail_after(30):
        run = await run_throughput(nodes[0].url, 0.5, via=nodes[1].url, size=1000)
    assert run.sent > 0 and run.received > 0 and (run.lost == 0 or run.stalls) and run.rtts, (run.lost, run.stalls)
    sender_side = run.counters[nodes[0].url][1]
    receiver_side = run.counters[nodes[1].url][1]
    assert sender_side["forwarded out"] >= run.received
    assert receiver_side["forwarded in"] >= run.received
    assert nodes[1].running.server.stats.packets_forwarded_in >= run.received


async def test_the_command_prints_the_run_and_says_when_counters_are_unreadable(relay):
    metrics = f"http://127.0.0.1:{closed_port()}/metrics"
    result = await run([*DERPD, "check", relay.derp_url, "--throughput", "300ms", "--metrics-url", metrics])
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr
    assert "Mbit/s" in out and "packets/s" in out and "lost 0/" in out and "p99" in out, out
    assert f"relay counters of {relay.derp_url}: not readable ({metrics}: connection refused" in out, out


async def test_two_nodes_that_do_not_forward_fail_in_one_line(nursery):
    a, b = await start_relay(nursery), await start_relay(nursery)  # not meshed
    argv = ["check", a.derp_url, "--throughput", "1s", "--via", b.derp_url, "--timeout", "1"]
    result = await trio.to_thread.run_sync(lambda: CliRunner().invoke(main, argv))
    err = result.stderr
    assert result.exit_code == 1 and err.count("\n") == 1 and result.stdout == "", err
    assert f"no packet reached the receiver on {b.derp_url} within 1s" in err and "mesh" in err, err


def test_throughput_usage_errors():
    for argv, needle in ((["--throughput", "0s"], "above zero"), (["--via", "http://127.0.0.1:1/derp"], "--via"),
                         (["--throughput", "soon"], "soon")):
        result = CliRunner().invoke(main, ["check", "http://127.0.0.1:1/derp", *argv])
        assert result.exit_code == 2 and needle in result.output, result.output
