"""Smoke tests of the benchmark scripts: argument checks, the summary maths, and one very short
run of bench/relay.py with the pure-Python generator against a real derpd process on 127.0.0.1.
Figures are never asserted (timings belong in bench/), only that a run completes and reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import trio

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import benchlib  # noqa: E402
import compare  # noqa: E402
import relay  # noqa: E402


@pytest.mark.parametrize("argv", [
    ["--seconds", "0"], ["--seconds", "61"], ["--pairs", "x"], ["--pairs", "0"], ["--modes", "udp"],
    ["--size", "10"], ["--rate", "-1"],
])
def test_relay_rejects_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        relay.main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_compare_rejects_bad_arguments() -> None:
    with pytest.raises(SystemExit) as e:
        compare.main(["--seconds", "0"])
    assert e.value.code == 2


def test_median() -> None:
    assert benchlib.median([3, 1, 2]) == 2
    assert benchlib.median([4, 1, 2, 3]) == 2.5
    assert benchlib.median([]) != benchlib.median([])  # nan


def test_summary_ratio_direction() -> None:
    """ratio >= 1 means derpd is at least as good, for higher- and lower-is-better metrics."""
    sc = compare.Scenario("s", "throughput", metrics=(("delivered_pps", True), ("p99_ms", False)))
    runs = {"s": {"derpd": [{"delivered_pps": v, "p99_ms": 2.0} for v in (100, 300, 200)],
                  "derper": [{"delivered_pps": v, "p99_ms": 4.0} for v in (100, 100, 100)]}}
    rows = {r["metric"]: r for r in compare.summarize(runs, [sc])}
    assert rows["delivered_pps"]["derpd"] == 200
    assert rows["delivered_pps"]["ratio"] == 2.0
    assert (rows["delivered_pps"]["derpd_min"], rows["delivered_pps"]["derpd_max"]) == (100, 300)
    assert rows["p99_ms"]["ratio"] == 2.0


def test_summary_skips_failed_runs() -> None:
    sc = compare.Scenario("s", "stun", metrics=(("answered_per_s", True),))
    runs = {"s": {"derpd": [{"error": "boom"}], "derper": [{"answered_per_s": 5.0}]}}
    assert compare.summarize(runs, [sc]) == []


async def test_relay_short_python_run(tmp_path: Path) -> None:
    """bench/relay.py drives a real derpd process with its Python generator for 0.3 s."""
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(BENCH / "relay.py"), "--generator", "python", "--seconds", "0.3",
           "--pairs", "1", "--modes", "plain", "--json", str(out)]
    with trio.fail_after(60):
        proc = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    [res] = json.loads(out.read_text())
    assert res["generator"] == "python" and res["mode"] == "plain" and res["pairs"] == 1
    assert res["received"] > 0 and res["sent"] >= res["received"]
    assert 0.0 <= res["loss"] <= 1.0
    assert "delivered/s" in proc.stdout.decode()
