"""``serve_coordinator``: the ASGI app on hypercorn's Trio worker, plus the prober.

Usage::

    running = await nursery.start(serve_coordinator, config)
    running.url   # "http://127.0.0.1:PORT"
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from .app import CoordinatorApp
from .config import ConfigError, CoordinatorConfig, load_config, read_token_file
from .persist import StateStore
from .prober import NodeProber, ProbeFn, Prober
from .state import CoordinatorState

log = logging.getLogger("derpd.coordinator")


@dataclass(slots=True)
class RunningCoordinator:
    url: str
    port: int
    state: CoordinatorState
    prober: Prober
    app: CoordinatorApp

    def reload_from(self, path: Path | None, token_file: Path | None = None) -> bool:
        """Reloads the config file and ``token_file`` (``--token-file``, which wins over the
        config's); on error logs it and keeps serving the last good map and tokens.  Tokens
        are rotated this way: registered nodes stay, and new heartbeats need a new token.

        Returns:
            True if the new config is in force.
        """
        try:
            config = load_config(path) if path is not None else self.state.config
            if token_file is not None:
                config = replace(config, token=read_token_file(token_file))
            elif config.token is None and self.state.config.token is not None:
                config = replace(config, token=self.state.config.token)  # given at start, not in the file
        except ConfigError as exc:
            self.state.metrics.reloads.labels("error").inc()
            log.error("config reload failed, still serving the last good map: %s", exc)
            return False
        self.state.reload(config)
        log.info("config reloaded from %s", path or token_file)
        return True


def hypercorn_config(listen: str) -> HypercornConfig:
    """Returns a quiet hypercorn config bound to ``listen`` (``host:port``; port 0 picks one)."""
    hc = HypercornConfig()
    hc.bind = [listen]
    hc.accesslog = None
    hc.errorlog = None
    hc.graceful_timeout = 2.0
    hc.keep_alive_timeout = 30.0
    hc.h11_max_incomplete_size = 16 * 1024
    return hc


async def serve_coordinator(
    config: CoordinatorConfig,
    *,
    listen: str | None = None,
    probe: ProbeFn | None = None,
    probing: bool = True,
    state_dir: Path | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[RunningCoordinator] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serves the coordinator until cancelled (or until ``shutdown_trigger`` returns).

    ``probe`` replaces the real node probe (tests); ``probing=False`` starts no prober
    loop (call ``running.prober.run_round()`` yourself).  With ``state_dir`` the
    registrations and the map are kept there across restarts (see :mod:`.persist`).

    Raises:
        StateDirError: ``state_dir`` cannot be created or written.
    """
    store = None
    if state_dir is not None:
        store = StateStore(state_dir)
        store.check()
    state = CoordinatorState(config, store=store, now=trio.current_time())
    app = CoordinatorApp(state)
    cafile = str(config.ca_file) if config.ca_file else None
    node_prober = None
    if probe is None:
        probe = node_prober = NodeProber(cafile=cafile, timeout=config.probe_timeout)
    prober = Prober(state, probe)
    try:
        await _serve(config, state, app, prober, listen, probing, shutdown_trigger, task_status)
    finally:
        if node_prober is not None:
            with trio.CancelScope(shield=True):
                await node_prober.aclose()


async def _serve(config: CoordinatorConfig, state: CoordinatorState, app: CoordinatorApp, prober: Prober,
                 listen: str | None, probing: bool, shutdown_trigger: Callable[[], Awaitable[None]] | None,
                 task_status: trio.TaskStatus[RunningCoordinator]) -> None:
    async with trio.open_nursery() as nursery:

        async def run_http(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
            await hypercorn_serve(app, hypercorn_config(listen or config.listen),  # type: ignore[arg-type]
                                  shutdown_trigger=shutdown_trigger, task_status=task_status)
            nursery.cancel_scope.cancel()

        binds: list[str] = await nursery.start(run_http)
        url = binds[0]
        port = int(url.rsplit(":", 1)[1])
        if probing:
            await nursery.start(prober.serve)
        log.info("coordinator serving %s/derpmap/default (%d regions, status at %s/status)",
                 url, len(state.published.dmap.regions), url)
        task_status.started(RunningCoordinator(url, port, state, prober, app))
