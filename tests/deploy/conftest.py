"""Helpers for the deploy suite: external tools, free ports, child processes, polling.

A missing tool skips its test with the Debian or PyPI package to install, unless
``CI=true`` or ``DERPD_REQUIRE_INTEROP=1``, which turn the skip into a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn, TypeVar

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent  # the venv's derpd and stund

T = TypeVar("T")


def required() -> bool:
    return os.environ.get("CI") == "true" or os.environ.get("DERPD_REQUIRE_INTEROP") == "1"


def missing(message: str) -> NoReturn:
    if required():
        pytest.fail(message + " (CI=true or DERPD_REQUIRE_INTEROP=1 makes this a failure)", pytrace=False)
    pytest.skip(message)


def require_tool(name: str, package: str) -> str:
    """Returns the path of ``name``, or skips/fails naming the package that provides it."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} not found: install {package} (.ci/setup.d/40-deploy-tools.sh does)")
    return path


def derpd_bin(name: str = "derpd") -> str:
    path = BIN / name
    assert path.exists(), f"{path} missing: run `make venv`"
    return str(path)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port that was free a moment ago, for tools that cannot report a port-0 bind."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1) -> T:
    """Calls ``check`` until it returns something other than None/False, for at most
    ``timeout`` seconds; fails naming ``what`` (and the last error) otherwise."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = check()
            if value is not None and value is not False:
                return value
        except Exception as e:  # noqa: BLE001 - reported below
            last = e
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}" + (f": {last!r}" if last else ""),
                        pytrace=False)
        time.sleep(interval)


class Process:
    """A child process with its output in files (read them while it runs)."""

    def __init__(self, argv: list[str], workdir: Path, name: str, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.name = name
        self.terminated = False
        self.out_path = workdir / f"{name}.out"
        self.err_path = workdir / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                          env={**os.environ, **(env or {})}, start_new_session=True)

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") + self.err_path.read_text(errors="replace")

    def expect(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """Waits for ``pattern`` in the output; fails if the process exits first."""

        def check() -> re.Match[str] | None:
            m = re.search(pattern, self.output())
            if m is None and self.popen.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.popen.returncode} before printing {pattern!r}:\n"
                            f"{self.output()}", pytrace=False)
            return m

        return poll(check, timeout, f"{self.name} to print {pattern!r}")

    def terminate(self) -> None:
        """SIGTERM, if it still runs (``stop`` then waits for it)."""
        if self.popen.poll() is None and not self.terminated:
            self.popen.send_signal(signal.SIGTERM)
            self.terminated = True

    def stop(self, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        return self.popen.returncode


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Callable[..., Process]]:
    """``start(argv, name=...)`` runs a child; all are stopped at teardown."""
    started: list[Process] = []

    def start(argv: list[str], name: str, env: dict[str, str] | None = None) -> Process:
        p = Process(argv, tmp_path, name, env)
        started.append(p)
        return p

    yield start
    for p in started:  # all at once: each one's shutdown overlaps the others'
        p.terminate()
    for p in reversed(started):
        p.stop()
