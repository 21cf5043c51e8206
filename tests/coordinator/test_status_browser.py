"""Headless Chromium loads /status and sees a node that goes down shown as down.

Chromium comes from Debian (`.ci/setup.d/30-chromium.sh`).  Outside CI a missing browser
skips loudly; with CI=true or DERPD_REQUIRE_INTEROP=1 it fails instead.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import trio

from derpd.coordinator.server import RunningCoordinator

from .conftest import FakeProbe

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRED = os.environ.get("CI") == "true" or os.environ.get("DERPD_REQUIRE_INTEROP") == "1"


def _need_chromium() -> str:
    if CHROMIUM is None:
        msg = "chromium not installed: run `sudo bash .ci/setup.d/30-chromium.sh` (Debian package chromium)"
        if REQUIRED:
            pytest.fail(msg)
        pytest.skip(msg)
    return CHROMIUM


async def _dump_dom(chromium: str, url: str, profile: Path) -> str:
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
            "--dump-dom", url]
    result = await trio.run_process(args, capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    return result.stdout.decode()


def _node_status(dom: str, name: str) -> tuple[str, str]:
    """Returns (data-status, badge text) of a node row in the DOM chromium rendered."""
    m = re.search(rf'<tr class="node" data-node="{re.escape(name)}" data-status="(\w+)">.*?'
                  r'<span class="badge \w+">(\w+)</span>', dom, re.S)
    assert m, f"node {name} not on the page"
    return m.group(1), m.group(2)


@pytest.mark.slow
async def test_status_page_in_chromium_shows_node_down(coordinator: RunningCoordinator, fake_probe: FakeProbe,
                                                       tmp_path: Path) -> None:
    chromium = _need_chromium()
    with trio.fail_after(60):
        await coordinator.prober.run_round()
        dom = await _dump_dom(chromium, coordinator.url + "/status", tmp_path / "profile1")
        assert _node_status(dom, "900a") == ("up", "UP")
        assert _node_status(dom, "900b") == ("up", "UP")
        assert "2 up · 0 down" in dom

        fake_probe.down["900b"] = "connection refused"
        await coordinator.prober.run_round()
        await coordinator.prober.run_round()  # two probes that agree
        dom = await _dump_dom(chromium, coordinator.url + "/status", tmp_path / "profile2")
    assert _node_status(dom, "900b") == ("down", "DOWN")
    assert _node_status(dom, "900a") == ("up", "UP")
    assert "1 up · 1 down" in dom
    assert "derp: refused" in dom  # the failure class; the socket error is for token holders


@pytest.mark.slow
async def test_screenshot_command(coordinator: RunningCoordinator, fake_probe: FakeProbe, tmp_path: Path) -> None:
    """The screenshot command from docs/coordinator.md produces a PNG."""
    chromium = _need_chromium()
    fake_probe.down["900b"] = "no answer within 8 s"
    out = tmp_path / "status.png"
    with trio.fail_after(60):
        await coordinator.prober.run_round()
        await coordinator.prober.run_round()
        args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={out}", "--window-size=1200,700",
                coordinator.url + "/status"]
        result = await trio.run_process(args, capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("DERPD_SCREENSHOT"):
        shutil.copy(out, os.environ["DERPD_SCREENSHOT"])
