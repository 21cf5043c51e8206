"""deploy/systemd: `systemd-analyze verify` and an offline security score for each unit, then
each unit's ExecStart command line (with its Environment= defaults, on loopback ports) run for
real, and its ExecReload signal sent to the running service."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .conftest import BIN, DEPLOY, derpd_bin, free_port, poll, require_tool

UNITS = ["derpd.service", "stund.service", "derpd-coordinator.service"]
INSTALL_PREFIX = "/opt/derpd/bin/"  # where deploy/README.md installs derpd
MAX_EXPOSURE = 3.0  # systemd-analyze security: 0 = fully locked down, 10 = unprotected


def _installed_copy(unit: str, dest: Path) -> Path:
    """The unit with its install prefix pointed at this venv (verify checks executables exist)."""
    text = (DEPLOY / "systemd" / unit).read_text().replace(INSTALL_PREFIX, f"{BIN}/")
    out = dest / unit
    out.write_text(text)
    return out


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    tool = require_tool("systemd-analyze", "the Debian package `systemd`")
    r = subprocess.run([tool, "verify", str(_installed_copy(unit, tmp_path))],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_hardening_score(unit: str, tmp_path: Path) -> None:
    tool = require_tool("systemd-analyze", "the Debian package `systemd`")
    r = subprocess.run([tool, "security", "--offline=yes", f"--threshold={int(MAX_EXPOSURE * 10)}",
                        str(_installed_copy(unit, tmp_path))], capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE and r.returncode == 0, r.stdout[-3000:]


def _unit_settings(unit: str) -> dict[str, list[str]]:
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "systemd" / unit).read_text())
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _command(unit: str, key: str, state: Path, overrides: dict[str, str]) -> list[str]:
    """The unit's ``key`` command as systemd would run it: Environment= defaults overridden
    by ``overrides``, ${VAR} replaced in place and a bare $VAR split into words, %S = ``state``."""
    s = _unit_settings(unit)
    env: dict[str, str] = {}
    for line in s.get("Environment", []):
        for word in shlex.split(line):
            k, v = word.split("=", 1)
            env[k] = v
    env.update(overrides)
    argv: list[str] = []
    for word in shlex.split(s[key][0]):
        word = word.replace("%S", str(state)).replace(INSTALL_PREFIX, f"{BIN}/")
        if re.fullmatch(r"\$[A-Z_]+", word):
            argv += env[word[1:]].split()
            continue
        argv.append(re.sub(r"\$\{([A-Z_]+)\}", lambda m: env[m.group(1)], word))
    return argv


def _reload_signal(unit: str) -> signal.Signals:
    reload = _unit_settings(unit)["ExecReload"][0].split()
    assert reload[0] == "/bin/kill" and reload[2] == "$MAINPID", reload
    return signal.Signals["SIG" + reload[1].lstrip("-")]


def _still_serving_after_reload(proc: Any, unit: str, check: list[str]) -> None:
    proc.popen.send_signal(_reload_signal(unit))
    r = subprocess.run(check, capture_output=True, text=True, timeout=60)
    assert proc.popen.poll() is None and r.returncode == 0, (
        f"{unit}: `systemctl reload` ({_reload_signal(unit).name}) stopped the service "
        f"(exit {proc.popen.returncode}):\n{proc.output()[-2000:]}\n{r.stdout}{r.stderr}")


@pytest.fixture
def derpd_service(tmp_path: Path, processes: Any) -> tuple[Any, list[str]]:
    state = tmp_path / "state"
    (state / "derpd" / "certs").mkdir(parents=True, mode=0o700)  # StateDirectory=derpd derpd/certs
    port, stun = free_port(), free_port(kind=2)
    argv = _command("derpd.service", "ExecStart", state, {
        "DERPD_ADDR": f"127.0.0.1:{port}", "DERPD_HTTP_PORT": "-1", "DERPD_STUN_PORT": str(stun),
        "DERPD_HOSTNAME": "127.0.0.1", "DERPD_METRICS_ADDR": "127.0.0.1:0", "DERPD_CERTMODE": "manual"})
    proc = processes(argv, name="derpd.service")
    node = json.loads(proc.expect(r"(?m)^(\{.*\"CertName\".*\})$").group(1))
    assert (state / "derpd" / "derper.key").exists()
    check = [derpd_bin(), "check", f"https://127.0.0.1:{node['DERPPort']}/derp", "--cert-pin", node["CertName"],
             "-n", "20"]
    r = subprocess.run(check, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([derpd_bin("stund"), "check", f"127.0.0.1:{stun}"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    return proc, check


def test_derpd_service_defaults_to_lets_encrypt(tmp_path: Path) -> None:
    argv = _command("derpd.service", "ExecStart", tmp_path, {})
    assert argv[argv.index("--certmode") + 1] == "letsencrypt"
    assert argv[argv.index("--certdir") + 1] == f"{tmp_path}/derpd/certs"  # StateDirectory=derpd/certs
    # Unconfigured (DERPD_HOSTNAME=localhost), it refuses to start with one line saying what to set.
    argv[argv.index("-a") + 1] = "127.8.4.6:443"  # ACME runs on port 443 only, as derper's
    argv[argv.index("--http-port") + 1] = "-1"
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--hostname derp.example.com" in r.stderr and "Traceback" not in r.stderr


def test_derpd_service_command_line_runs(derpd_service: tuple[Any, list[str]]) -> None:
    proc, _ = derpd_service
    assert proc.popen.poll() is None


def test_derpd_service_survives_reload(derpd_service: tuple[Any, list[str]]) -> None:
    proc, check = derpd_service
    _still_serving_after_reload(proc, "derpd.service", check)


@pytest.fixture
def stund_service(tmp_path: Path, processes: Any) -> tuple[Any, list[str]]:
    port = free_port(kind=2)
    argv = _command("stund.service", "ExecStart", tmp_path, {
        "STUND_ADDR": f"127.0.0.1:{port}", "STUND_METRICS_ADDR": "127.0.0.1:0"})
    proc = processes(argv, name="stund.service")
    check = [derpd_bin("stund"), "check", f"127.0.0.1:{port}"]
    poll(lambda: subprocess.run(check, capture_output=True, timeout=30).returncode == 0, 30,
         f"stund.service to answer STUN\n{proc.output()}")
    return proc, check


def test_stund_service_command_line_runs(stund_service: tuple[Any, list[str]]) -> None:
    assert stund_service[0].popen.poll() is None


def test_stund_service_survives_reload(stund_service: tuple[Any, list[str]]) -> None:
    proc, check = stund_service
    _still_serving_after_reload(proc, "stund.service", check)


def test_coordinator_service_command_lines_run_and_reload(tmp_path: Path, processes: Any) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text((DEPLOY / "coordinator.example.toml").read_text())
    port = free_port()

    def cmd(key: str) -> list[str]:
        argv = _command("derpd-coordinator.service", key, tmp_path, {"COORDINATOR_ADDR": f"127.0.0.1:{port}"})
        return [str(config) if a == "/etc/derpd/coordinator.toml" else a for a in argv]

    r = subprocess.run(cmd("ExecStartPre"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and '"Regions"' in r.stdout, r.stdout + r.stderr
    proc = processes(cmd("ExecStart"), name="derpd-coordinator.service")
    proc.expect(rf"map at http://127\.0\.0\.1:{port}/derpmap/default")
    def map_has(name: str) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/derpmap/default", timeout=5) as resp:
            return resp.status == 200 and json.loads(resp.read())["Regions"]["900"]["RegionName"] == name

    assert poll(lambda: map_has("Home DERP"), 30, "the coordinator's map")
    # The reload takes the edited file: the map shows the region's new name.
    config.write_text(config.read_text().replace('name = "Home DERP"', 'name = "Home DERP, reloaded"'))
    proc.popen.send_signal(_reload_signal("derpd-coordinator.service"))
    assert poll(lambda: map_has("Home DERP, reloaded"), 30, "the coordinator's map after the reload")
    assert proc.popen.poll() is None, proc.output()
    assert "HTTP Request" not in proc.output(), proc.output()  # its probes are not logged at the default level


VERBOSE_FLAGS = re.compile(r"-v+|--?verbose(=.*)?")


@pytest.mark.parametrize("unit", UNITS)
def test_units_run_at_the_default_verbosity(unit: str, tmp_path: Path) -> None:
    """Warnings and start-up lines only: -v would log every notable event, -vv every request."""
    for key in ("ExecStart", "ExecStartPre"):
        if key in _unit_settings(unit):
            argv = _command(unit, key, tmp_path, {})
            assert not [a for a in argv if VERBOSE_FLAGS.fullmatch(a)], argv


# Each unit's ExecStart with one bad setting: a usage or config error, exit status 2, one line.
BAD_SETTING = {
    "derpd.service": {"DERPD_ADDR": "8443"},  # no port: refused, as derper refuses it
    "stund.service": {"STUND_ADDR": "127.0.0.1:x"},
    "derpd-coordinator.service": {"COORDINATOR_ADDR": "nowhere"},
}


@pytest.mark.parametrize("unit", UNITS)
def test_a_config_error_exits_2_and_is_not_restarted(unit: str, tmp_path: Path) -> None:
    assert _unit_settings(unit).get("RestartPreventExitStatus") == ["2"], unit
    (tmp_path / "derpd" / "certs").mkdir(parents=True)
    argv = _command(unit, "ExecStart", tmp_path, BAD_SETTING[unit])
    argv = [str(DEPLOY / "coordinator.example.toml") if a == "/etc/derpd/coordinator.toml" else a for a in argv]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                       env={**os.environ, "STATE_DIRECTORY": str(tmp_path)})
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
