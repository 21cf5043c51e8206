"""bench/wholemachine.py without Go: argument checks, the rates, the share of packets that
crossed workers read from the metrics derpd really exports (merged as the ``--workers`` parent
merges them), CPU summed over a real process tree, and the summary.  No figure is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import benchlib  # noqa: E402
import wholemachine  # noqa: E402
from derpd.metrics import GaugeSource, RelayCollector, RelayStats  # noqa: E402
from derpd.workers import aggregate_metrics  # noqa: E402


@pytest.mark.parametrize("argv", [
    ["--seconds", "0"], ["--seconds", "31"], ["--rounds", "0"], ["--rates", "fast"], ["--rates", ","],
    ["--rates", "-5"], ["--servers", "derpd"], ["--servers", "w1,w1"], ["--servers", ""], ["--pairs", "0"],
    ["--size", "10"],
])
def test_rejects_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        wholemachine.main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_rates_and_names() -> None:
    assert wholemachine.parse_rates("30000, 60_000,unpaced,0") == [30000.0, 60000.0, 0.0, 0.0]
    assert wholemachine.scenario_name("tls", 0.0) == "tls unpaced"
    assert wholemachine.scenario_name("plain", 120000.0) == "plain 120,000/s"


class _NoGauges(GaugeSource):
    def gauge_values(self) -> dict[str, tuple[str, float]]:
        return {}


def _worker_text(received: int, forwarded_out: int, forwarded_in: int, scrapes: int) -> str:
    stats = RelayStats()
    stats.packets_received, stats.packets_sent = received, received
    stats.packets_forwarded_out, stats.packets_forwarded_in = forwarded_out, forwarded_in
    stats.http_requests["metrics"] = scrapes
    stats.drop("queue_head", False, 1200, count=3)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(stats, _NoGauges()))
    return generate_latest(registry).decode()


def test_crossed_share_from_merged_worker_metrics() -> None:
    """Two workers' real expositions, merged by derpd's parent: the bench finds the counters by
    the names derpd exports and divides the forwarded packets by the received ones."""
    merged = aggregate_metrics([_worker_text(600, 300, 200, 4), _worker_text(400, 200, 300, 4)]).decode()
    counters = wholemachine.parse_metrics(merged)
    c = wholemachine.crossing(counters)
    assert c["relay_packets_received"] == 1000
    assert c["forwarded_out"] == 500 and c["forwarded_in"] == 500
    assert c["crossed_share"] == 0.5
    assert c["relay_packets_dropped"] == 6  # summed over reasons and kinds
    assert counters[wholemachine.REFRESHED] == 8
    assert wholemachine.data_plane(counters) in ("compiled", "pure")


def test_no_packets_no_share() -> None:
    assert wholemachine.crossing({})["crossed_share"] == 0.0


def test_tree_cpu_covers_children_and_grandchildren() -> None:
    """A child that starts a grandchild: both are in the tree and in the CPU reading."""
    code = ("import subprocess, sys\n"
            "g = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'], stdin=subprocess.PIPE)\n"
            "print(g.pid, flush=True)\n"
            "sys.stdin.read()\n"
            "g.stdin.close(); g.wait(timeout=30)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        grandchild = int(child.stdout.readline())
        tree = benchlib.process_tree(child.pid)
        assert set(tree) == {child.pid, grandchild}
        before = benchlib.tree_cpu_seconds(child.pid)
        assert set(before) == {child.pid, grandchild}
        assert all(v >= 0 for v in before.values())
        after = {**before, child.pid: before[child.pid] + 1.0, 123456789: 0.5}
        assert benchlib.cpu_between(before, after) == pytest.approx(1.5)  # a new process counts from zero
    finally:
        if child.stdin is not None:
            child.stdin.close()
        child.wait(timeout=30)


def test_summary_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    runs = {"plain 60,000/s": {
        "derper": [{"delivered_pps": v, "loss": 0.0, "cpu_s_per_mpkt": 20.0} for v in (100, 300, 200)],
        "w1": [{"delivered_pps": 50, "crossed_share": 0.0}, {"error": "boom"}],
        "auto": [{"delivered_pps": 80, "crossed_share": s} for s in (0.4, 0.6, 0.5)],
    }}
    rows = {r["metric"]: r for r in wholemachine.summarize(runs, wholemachine.SERVERS)}
    assert rows["delivered_pps"]["derper"] == {"median": 200, "min": 100, "max": 300, "n": 3}
    assert rows["delivered_pps"]["w1"]["n"] == 1  # the failed run is left out
    assert rows["crossed_share"]["auto"]["median"] == 0.5
    assert "derper" not in rows["crossed_share"]
    assert "p99_ms" not in rows  # no server reported it
    wholemachine.print_table(list(rows.values()), wholemachine.SERVERS)
    out = capsys.readouterr().out
    assert "derpd auto" in out and "50.0% (40.0%-60.0%)" in out


def test_kill_leftovers_kills_only_what_still_runs() -> None:
    """A process that outlived its server is killed; one that has exited is left alone."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        starts = benchlib.process_starts([child.pid])
        assert list(starts) == [child.pid]
        assert benchlib.kill_leftovers(starts, grace=0) == [child.pid]
        assert child.wait(timeout=30) == -9
        assert benchlib.kill_leftovers(starts, grace=0) == []
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
