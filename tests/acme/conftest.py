"""ACME fixtures: Pebble (built once from the Go module proxy), a DNS responder, and derpd
relays with ACME on loopback port 0.

Without Go the Pebble tests are skipped with a message saying what to install, unless
``DERPD_REQUIRE_INTEROP=1`` (CI), which makes that a failure.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trio

from derpd.acme import AcmeConfig, AcmeManager, start_acme
from derpd.keys import NodePrivate
from derpd.relay.listener import RunningRelay, serve_relay
from derpd.settings import RelaySettings

from tests.interop.interop_harness import build_go_tools, build_failed, missing_tool

from .pebble_harness import Pebble, PebbleBuild, build_pebble, serve_dns


@pytest.fixture(scope="session")
def pebble_build() -> PebbleBuild:
    return build_pebble(missing_tool, build_failed)


@pytest.fixture(scope="session")
def go_tools() -> Any:
    return build_go_tools(missing_tool, build_failed)


@dataclass
class AcmeRelay:
    running: RunningRelay
    manager: AcmeManager
    pebble: Pebble

    @property
    def server(self) -> Any:
        return self.running.server

    async def wait(self, condition: Callable[[], bool]) -> None:
        """Wait for ``condition`` re-checking after each ACME success or failure."""
        while not condition():
            await self.manager.wait_changed()

    async def wait_issued(self, count: int = 1) -> None:
        """Wait until ``count`` certificates were issued; fail at once with the CA's answer
        if an attempt fails instead."""
        failures = self.manager.failures
        while self.manager.issued < count:
            await self.manager.wait_changed()
            assert self.manager.failures == failures, (
                f"ACME failed: {self.manager.last_error}\npebble log:\n"
                f"{self.pebble.log.decode(errors='replace')[-3000:]}")

    async def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        ctx.load_verify_locations(cadata=(await self.pebble.root_pem()).decode())
        return ctx


StartAcmeRelay = Callable[..., Awaitable[AcmeRelay]]


@pytest.fixture
def start_acme_relay(nursery: trio.Nursery, tmp_path: Path, pebble_build: PebbleBuild) -> StartAcmeRelay:
    """``await start_acme_relay(hostname=..., challenges=..., profile=..., ...)``: a DNS
    responder, a derpd relay with ACME (in-process, 127.0.0.1 port 0, HTTP port too) and a
    Pebble whose challenge ports point at the relay.  ``start_pebble=False`` leaves Pebble
    stopped (the CA is down); ``pebble.start(nursery)`` starts it later on the same port."""

    async def start(hostname: str = "derp.test", *, start_pebble: bool = True, http_port: int = 0,
                    certdir: Path | None = None, eab_required: bool = False, **acme: Any) -> AcmeRelay:
        with trio.fail_after(30):
            dns_port = await nursery.start(serve_dns)
            certdir = certdir or tmp_path / "certs"
            settings = RelaySettings(addr="127.0.0.1:0", private_key=NodePrivate.generate(), certmode="letsencrypt",
                                     certdir=certdir, hostname=hostname, http_port=http_port)
            running = await nursery.start(serve_relay, settings)
            pebble = Pebble(pebble_build, tmp_path, dns_port, http_port=running.http_port or 1,
                            tls_port=running.port, eab=eab_required)
            if start_pebble:
                await pebble.start(nursery)
            defaults = AcmeConfig.from_options(
                certmode="letsencrypt", hostname=hostname, certdir=certdir, http_port=http_port,
                directory=pebble.directory, email="", eab_kid="", eab_key="", ip_certs=":" in hostname
                or hostname.replace(".", "").isdigit())
            overrides = {"ca_file": str(pebble_build.minica), "backoff_min": 0.2, "backoff_max": 1.0,
                         "order_timeout": 20.0, **acme}
            config = replace(defaults, **overrides)
            manager = await start_acme(running.server, config, nursery)
            nursery.start_soon(_stop_at_exit, pebble)
            return AcmeRelay(running, manager, pebble)

    return start


async def _stop_at_exit(pebble: Pebble) -> None:
    try:
        await trio.sleep_forever()
    finally:
        pebble.stop()
