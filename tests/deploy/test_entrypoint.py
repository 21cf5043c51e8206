"""deploy/container/entrypoint.sh, the real script under dash (the POSIX shell Debian images run
as /bin/sh), with a stand-in `derpd` first on PATH that prints the command line it was given.
That command line is then read by derpd's own flag parser, so the test sees the settings the
relay would run with: the container's arguments override the DERPD_* defaults."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from derpd.cli import serve

from .conftest import DEPLOY, require_tool

SCRIPT = DEPLOY / "container" / "entrypoint.sh"


def _image_env() -> dict[str, str]:
    """The image's DERPD_* defaults, from the Containerfile's ENV instructions."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "container" / "Containerfile").read_text())
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for word in shlex.split(line[4:]):
                key, _, value = word.partition("=")
                if key.startswith("DERPD_"):
                    env[key] = value
    return env


IMAGE_ENV = _image_env()


@pytest.fixture
def run_entrypoint(tmp_path: Path):
    dash = require_tool("dash", "the Debian package `dash`")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "derpd"
    fake.write_text("#!/bin/sh\nprintf 'derpd-argv'\nprintf '\\0%s' \"$@\"\n")
    fake.chmod(0o755)

    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        environ = {"PATH": f"{bindir}:/usr/bin:/bin", **IMAGE_ENV, **env}
        return subprocess.run([dash, str(SCRIPT), *args], capture_output=True, text=True, timeout=30,
                              env=environ, cwd=tmp_path)

    return run


def argv_of(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stderr
    head, *argv = result.stdout.split("\0")
    assert head == "derpd-argv", result.stdout
    return argv


def settings(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    """What `derpd serve` would run with, read by its own parser (Go's syntax: the last one wins)."""
    argv = argv_of(result)
    assert argv[0] == "serve", argv
    with serve.make_context("serve", argv[1:]) as ctx:
        return dict(ctx.params)


def test_the_image_defaults_without_arguments(run_entrypoint) -> None:
    assert {"DERPD_ADDR", "DERPD_CERTMODE", "DERPD_KEY_FILE", "DERPD_VERBOSE"} <= set(IMAGE_ENV), IMAGE_ENV
    p = settings(run_entrypoint(DERPD_HOSTNAME="derp.example.com"))
    assert (p["addr"], p["certmode"], p["hostname"]) == (IMAGE_ENV["DERPD_ADDR"], IMAGE_ENV["DERPD_CERTMODE"],
                                                         "derp.example.com")
    assert p["verbose"] == min(2, int(IMAGE_ENV["DERPD_VERBOSE"] or 0))
    assert str(p["config"]) == IMAGE_ENV["DERPD_KEY_FILE"] and p["metrics_addr"] == IMAGE_ENV["DERPD_METRICS_ADDR"]


@pytest.mark.parametrize("args", [
    ["--certmode", "manual", "-a", "127.0.0.1:8443", "--hostname", "203.0.113.7"],
    ["-certmode=manual", "-a=127.0.0.1:8443", "-hostname=203.0.113.7"],
    ["--certmode=manual", "--a", "127.0.0.1:8443", "-hostname", "203.0.113.7"],
], ids=["separate values", "go single-dash with =", "mixed"])
def test_arguments_override_the_environment(run_entrypoint, args: list[str]) -> None:
    p = settings(run_entrypoint(*args, DERPD_HOSTNAME="derp.example.com"))
    assert (p["certmode"], p["addr"], p["hostname"]) == ("manual", "127.0.0.1:8443", "203.0.113.7")
    assert p["http_port"] == 80 and p["metrics_addr"] == ":9090"  # what the arguments leave alone stays


def test_a_hostname_in_the_arguments_needs_no_derpd_hostname(run_entrypoint) -> None:
    p = settings(run_entrypoint("--certmode", "manual", "--hostname", "203.0.113.7"))
    assert (p["certmode"], p["hostname"]) == ("manual", "203.0.113.7")


def test_verbosity_from_the_arguments_replaces_derpd_verbose(run_entrypoint) -> None:
    assert settings(run_entrypoint("-vv", DERPD_HOSTNAME="h"))["verbose"] == 2
    assert settings(run_entrypoint("--verbose", DERPD_HOSTNAME="h", DERPD_VERBOSE="2"))["verbose"] == 1
    assert settings(run_entrypoint(DERPD_HOSTNAME="h", DERPD_VERBOSE="0"))["verbose"] == 0
    assert settings(run_entrypoint(DERPD_HOSTNAME="h", DERPD_VERBOSE="2"))["verbose"] == 2


def test_values_with_spaces_and_boolean_overrides_survive(run_entrypoint) -> None:
    p = settings(run_entrypoint("--home", "https://example.com/a b", "--acme-ip-certs=false",
                                DERPD_HOSTNAME="203.0.113.7", DERPD_ACME_IP_CERTS="1"))
    assert p["home"] == "https://example.com/a b" and p["acme_ip_certs"] is False


def test_a_command_runs_as_given(run_entrypoint) -> None:
    assert argv_of(run_entrypoint("derpd", "genkey")) == ["genkey"]
    assert argv_of(run_entrypoint("derpd", "coordinator", "--config", "/x y.toml")) == \
        ["coordinator", "--config", "/x y.toml"]
    r = run_entrypoint("echo", "no", "derpd")
    assert r.returncode == 0 and r.stdout == "no derpd\n"


@pytest.mark.parametrize(("env", "args", "says"), [
    ({}, [], "Let's Encrypt"),
    ({"DERPD_CERTMODE": "manual"}, [], "self-signed certificate is created"),
    ({}, ["--certmode", "manual"], "self-signed certificate is created"),
    ({}, ["-certmode=manual", "-vv"], "self-signed certificate is created"),
])
def test_no_hostname_is_one_line_and_exit_2(run_entrypoint, env, args, says) -> None:
    r = run_entrypoint(*args, DERPD_HOSTNAME="", **env)
    assert r.returncode == 2 and r.stdout == "", r.stdout
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("derpd-entrypoint: set DERPD_HOSTNAME") and \
        says in r.stderr, r.stderr


def test_the_script_is_posix_sh() -> None:
    """No bashisms: dash parses it (-n) and, where installed, checkbashisms agrees."""
    dash = require_tool("dash", "the Debian package `dash`")
    r = subprocess.run([dash, "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    if tool := shutil.which("checkbashisms"):
        r = subprocess.run([tool, str(SCRIPT)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
    assert SCRIPT.read_text().startswith("#!/bin/sh\n")
