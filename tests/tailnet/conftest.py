"""Tailnet fixtures: build tailscaled, tailscale and headscale once (cached by version),
then start a tailnet in a private network namespace per test (or per module).

Without Go, unshare, nsenter or ip, or when the namespace cannot be made, the suite is
skipped with a message that says what to install, unless ``DERPD_REQUIRE_INTEROP=1`` (CI),
which turns that into a one-line failure.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.interop.interop_harness import CertAuthority, build_failed, make_test_ca, missing_tool

from .tailnet_harness import BLOB_SIZE, NamespaceError, Node, Tailnet, TailnetTools, build_tailnet_tools, make_blob


TEST_BOUND = 300.0  # seconds for any one test (its steps have their own, shorter bounds)


@pytest.fixture(autouse=True)
def bounded() -> Iterator[None]:
    """Ends a test that runs over TEST_BOUND (the tests are synchronous: SIGALRM raises in
    the main thread, inside whatever wait is blocking); teardown still stops everything."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"the test ran over {TEST_BOUND:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, TEST_BOUND)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def tailnet_tools() -> TailnetTools:
    return build_tailnet_tools(missing_tool, build_failed)


@pytest.fixture(scope="session")
def tailnet_ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    return make_test_ca(tmp_path_factory.mktemp("tailnet-ca"))


@pytest.fixture(scope="session")
def blob(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(path, sha256) of 50 MB of random bytes, served by the nodes."""
    path = tmp_path_factory.mktemp("tailnet-blob") / "blob.bin"
    return path, make_blob(path, BLOB_SIZE)


def open_tailnet(tools: TailnetTools, ca: CertAuthority, workdir: Path) -> Tailnet:
    try:
        return Tailnet(tools, ca, workdir)
    except NamespaceError as exc:
        missing_tool(str(exc))


@pytest.fixture(scope="session")
def new_tailnet(tailnet_tools: TailnetTools, tailnet_ca: CertAuthority,
                tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Tailnet]:
    """``net = new_tailnet("name")``: an empty namespace for a module-scoped fixture, which
    must ``net.close()`` it (that stops everything started in it by PID)."""
    return lambda name: open_tailnet(tailnet_tools, tailnet_ca, tmp_path_factory.mktemp(name))


@pytest.fixture
def make_tailnet(new_tailnet: Callable[[str], Tailnet]) -> Iterator[Callable[[str], Tailnet]]:
    """``net = make_tailnet("name")``: an empty namespace; everything started in it is
    stopped by PID when the test ends, pass or fail."""
    opened: list[Tailnet] = []

    def make(name: str) -> Tailnet:
        opened.append(new_tailnet(name))
        return opened[-1]

    yield make
    for net in opened:
        net.close()


@pytest.fixture(scope="module")
def two_node_tailnet(new_tailnet: Callable[[str], Tailnet]) -> Iterator[tuple[Tailnet, Node, Node]]:
    """(net, a, b) from ``Tailnet.two_nodes()``, shared by the tests of one module."""
    net = new_tailnet("tailnet")
    try:
        a, b = net.two_nodes()
        yield net, a, b
    finally:
        net.close()
