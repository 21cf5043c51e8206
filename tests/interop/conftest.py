"""Interop fixtures: build Tailscale's Go programs once, start our servers, run scenarios.

Without ``go`` the suite is skipped with a message saying what to install, unless
``DERPD_REQUIRE_INTEROP=1`` (CI), which turns the skip into a failure.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from .interop_harness import (SCENARIO_TIMEOUT, CertAuthority, GoTools, ScenarioResult, build_failed, build_go_tools,
                              make_test_ca, missing_tool, parse_scenario, run_go)


@pytest.fixture(scope="session")
def go_tools() -> GoTools:
    """Builds derpinterop, derpprobe and derper once; later runs reuse the cached binaries."""
    return build_go_tools(missing_tool, build_failed)


RunScenario = Callable[..., Awaitable[ScenarioResult]]


@pytest.fixture
def scenario(go_tools: GoTools) -> RunScenario:
    """``await scenario("relay", "--url", url, ...)`` runs derpinterop and parses its JSON line.

    It asserts the scenario passed unless ``expect_ok=False``; ``env`` adds variables.
    """

    async def run(name: str, *args: str, env: dict[str, str] | None = None,
                  expect_ok: bool = True, timeout: float = SCENARIO_TIMEOUT) -> ScenarioResult:
        argv = [go_tools.derpinterop, name, *args]
        result = parse_scenario(argv, *await run_go(argv, env=env, timeout=timeout))
        assert result.data.get("scenario") == name, result.explain()
        if expect_ok:
            assert result.returncode == 0 and result.data.get("ok") is True, result.explain()
        return result

    return run


# ---------------------------------------------------------------------------
# Our servers, in-process on loopback port 0.


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    return make_test_ca(tmp_path_factory.mktemp("interop-ca"))


StartRelay = Callable[..., Awaitable[Any]]


@pytest.fixture
def start_relay(nursery: trio.Nursery, tmp_path: Path, test_ca: CertAuthority) -> StartRelay:
    """``await start_relay(tls=None | "ca" | "self-signed", mesh_key=None)`` starts derpd's relay.

    * ``None``: plain HTTP on 127.0.0.1.
    * ``"ca"``: TLS (``--certmode manual``) for ``localhost`` with a cert from ``test_ca``.
    * ``"self-signed"``: TLS for the IP 127.0.0.1 with no files, so the relay makes a
      self-signed cert and reports its ``sha256-raw:`` pin in ``cert_pin``.
    """

    async def start(tls: str | None = None, mesh_key: bytes | None = None) -> Any:
        from derpd.keys import NodePrivate
        from derpd.relay.listener import serve_relay
        from derpd.settings import RelaySettings

        if tls is None:
            settings = RelaySettings(addr="127.0.0.1:0", private_key=NodePrivate.generate(),
                                     certmode=None, certdir=None, hostname="localhost")
        elif tls == "ca":
            settings = RelaySettings(addr="127.0.0.1:0", private_key=NodePrivate.generate(),
                                     certmode="manual", certdir=test_ca.certdir, hostname="localhost")
        elif tls == "self-signed":
            certdir = tmp_path / "self-signed"
            certdir.mkdir(exist_ok=True)
            settings = RelaySettings(addr="127.0.0.1:0", private_key=NodePrivate.generate(),
                                     certmode="manual", certdir=certdir, hostname="127.0.0.1")
        else:
            raise AssertionError(f"unknown tls mode {tls!r}")
        if mesh_key is not None:
            settings = dataclasses.replace(settings, mesh_key=mesh_key)
        with trio.fail_after(10):
            return await nursery.start(serve_relay, settings)

    return start


@pytest.fixture
def start_stun(nursery: trio.Nursery) -> Callable[[], Awaitable[int]]:
    """``port = await start_stun()`` serves STUN on 127.0.0.1 and ::1 with the same port
    (a DERP map node has one STUNPort for both families)."""

    async def start() -> int:
        from stund.server import serve_stun

        with trio.fail_after(10):
            for _ in range(50):
                v4_scope = trio.CancelScope()

                async def serve_v4(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
                    with v4_scope:
                        await serve_stun([("127.0.0.1", 0)], task_status=task_status)

                bound = await nursery.start(serve_v4)
                port = int(bound[0][1])
                try:
                    await nursery.start(serve_stun, [("::1", port)])
                except OSError:  # the port is taken on ::1; try another
                    v4_scope.cancel()
                    continue
                return port
        raise AssertionError("could not bind STUN on 127.0.0.1 and ::1 with one port in 50 tries")

    return start


@pytest.fixture
def start_coordinator(nursery: trio.Nursery) -> Callable[[list[dict[str, Any]]], Awaitable[str]]:
    """``url = await start_coordinator(regions)`` serves a DERP map from derpd's coordinator.

    ``regions`` uses the coordinator's TOML keys: ``[{"id": 900, "code": ..., "name": ...,
    "nodes": [{"name": "900a", "hostname": ..., "derp_port": ..., ...}]}]``.  Returns the
    map URL.  The coordinator's own prober is off so the map is exactly the config.
    """

    async def start(regions: list[dict[str, Any]]) -> str:
        from derpd.coordinator.config import parse_config
        from derpd.coordinator.server import serve_coordinator

        lines = ["[coordinator]", 'listen = "127.0.0.1:0"']
        for region in regions:
            lines.append("[[regions]]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in region.items() if k != "nodes"]
            for node in region["nodes"]:
                lines.append("[[regions.nodes]]")
                lines += [f"{k} = {json.dumps(v)}" for k, v in node.items()]
        config = parse_config("\n".join(lines) + "\n", "interop-coordinator.toml")
        with trio.fail_after(10):
            running = await nursery.start(
                functools.partial(serve_coordinator, config, listen="127.0.0.1:0", probing=False))
        return f"{running.url}/derpmap/default"

    return start


@pytest.fixture
def start_meshed_relays(start_relay, test_ca: CertAuthority, nursery: trio.Nursery) -> Callable[[int], Awaitable[list[Any]]]:
    """``relays = await start_meshed_relays(n)``: n TLS relays for ``localhost`` (test CA)
    sharing ``MESH_KEY``, each meshed with the others through ``run_mesh``.  Returns once
    every link is up and every node has every other node's link as a WatchConns
    subscriber, so clients that connect afterwards are announced across the mesh."""

    async def start(n: int) -> list[Any]:
        import ssl

        from derpd.mesh import MeshTarget, run_mesh

        from .interop_harness import MESH_KEY, wait_for_registries, watcher_keys

        relays = [await start_relay(tls="ca", mesh_key=MESH_KEY) for _ in range(n)]
        client_ctx = ssl.create_default_context(cafile=str(test_ca.ca_file))
        with trio.fail_after(15):
            for relay in relays:
                others = [MeshTarget(f"localhost:{o.port}", dial="127.0.0.1") for o in relays if o is not relay]
                await nursery.start(functools.partial(run_mesh, relay.server, others, MESH_KEY,
                                                      ssl_context=client_ctx))

            def meshed() -> bool:
                links_up = all(link.connected for r in relays for link in r.server.mesh_links)
                watching = all(o.public_key.raw in watcher_keys(r) for r in relays for o in relays if o is not r)
                return links_up and watching

            await wait_for_registries([r.server.registry for r in relays], meshed)
        return relays

    return start
