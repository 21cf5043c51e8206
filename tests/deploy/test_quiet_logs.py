"""Logs quiet by default: a relay registered with a coordinator that probes it every second, both
as real processes. At -v each logs its notable events but not the HTTP client's line per request
(heartbeats, registrations, probes); those appear at -vv."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .conftest import derpd_bin, free_port, poll

TOKEN = "test-token-0123456789abcdef"
PER_REQUEST = "HTTP Request:"  # httpx's line per request


def _node_probed_up(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/status.json", timeout=5) as resp:
        status = json.loads(resp.read())
    nodes = [n for r in status["regions"] for n in r["nodes"]]
    return any(n["name"] == "901x" and n["status"] == "up" for n in nodes)


@pytest.mark.parametrize("verbose", ["-v", "-vv"])
def test_per_request_lines_only_at_vv(tmp_path: Path, processes: Any, verbose: str) -> None:
    port = free_port()
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    config = tmp_path / "coordinator.toml"
    config.write_text(f'[coordinator]\nlisten = "127.0.0.1:{port}"\nprobe_interval = 1\nprobe_timeout = 1\n'
                      "min_heartbeat_interval = 1\nomit_default_regions = true\nallow_loopback_nodes = true\n")
    coordinator = processes([derpd_bin(), "coordinator", verbose, "--config", str(config), "--token-file", str(token),
                             "--state-dir", str(tmp_path / "state")], name="coordinator")
    coordinator.expect(r"map at http://")
    relay = processes([derpd_bin(), "serve", verbose, "-a", "127.0.0.1:0", "--stun-port", "-1", "--http-port", "-1",
                       "--certmode", "manual", "--hostname", "127.0.0.1", "--certdir", str(tmp_path / "certs"),
                       "-c", str(tmp_path / "derper.key"), "--coordinator", f"http://127.0.0.1:{port}",
                       "--coordinator-token-file", str(token), "--region-id", "901", "--region-code", "edge",
                       "--node-name", "901x"], name="relay")
    relay.expect(r"registered 901x with coordinator")  # an event: logged at -v
    poll(lambda: _node_probed_up(f"http://127.0.0.1:{port}"), 60, "the coordinator to probe the relay")
    relay.stop()
    coordinator.stop()
    for proc in (relay, coordinator):
        lines = proc.output().count(PER_REQUEST)
        if verbose == "-v":
            assert lines == 0, proc.output()
        else:
            assert lines > 0, proc.output()
