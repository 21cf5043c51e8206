"""``serve_coordinator``: the ASGI app on hypercorn's Trio worker, plus the prober.

Usage::

    running = await nursery.start(serve_coordinator, config)
    running.url   # "http://127.0.0.1:PORT"
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.utils import repr_socket_addr

from ..settings import split_host_port
from .app import CoordinatorApp
from .config import ConfigError, CoordinatorConfig, load_config, read_token_file
from .front import Front, FrontOptions, RedirectApp
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
    front: Front
    http_port: int | None = None  # the plain port beside TLS (ACME HTTP-01, redirects)

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
        self.front.reload_tls()
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
    hc.ssl_handshake_timeout = 10.0
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
    front: FrontOptions | None = None,
    task_status: trio.TaskStatus[RunningCoordinator] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serves the coordinator until cancelled (or until ``shutdown_trigger`` returns).

    ``probe`` replaces the real node probe (tests); ``probing=False`` starts no prober
    loop (call ``running.prober.run_round()`` yourself).  With ``state_dir`` the
    registrations and the map are kept there across restarts (see :mod:`.persist`).
    ``front`` sets TLS, the plain HTTP port beside it and the proxies (:mod:`.front`);
    without it the coordinator speaks plain HTTP.

    Raises:
        StateDirError: ``state_dir`` cannot be created or written.
        CertError: ``manual`` certificate files missing or unusable.
        OSError: the address cannot be bound.
    """
    store = None
    if state_dir is not None:
        store = StateStore(state_dir)
        store.check()
    state = CoordinatorState(config, store=store, now=trio.current_time())
    front_ = Front(front or FrontOptions(), state.metrics)
    app = CoordinatorApp(state, trusted_proxies=front_.options.trusted_proxies)
    cafile = str(config.ca_file) if config.ca_file else None
    node_prober = None
    if probe is None:
        probe = node_prober = NodeProber(cafile=cafile, timeout=config.probe_timeout)
    prober = Prober(state, probe)
    try:
        await _serve(config, state, app, prober, listen, probing, shutdown_trigger, front_, task_status)
    finally:
        if node_prober is not None:
            with trio.CancelScope(shield=True):
                await node_prober.aclose()


async def _bind(hc: HypercornConfig) -> list[socket.socket]:
    """Binds ``hc.bind``.  A coordinator that was cancelled in this process (a restart in
    place) may still be closing its listener on the same port: wait for it a little.

    Raises:
        OSError: the address cannot be bound.
    """
    with trio.move_on_after(1.0):
        while True:
            try:
                return hc.create_sockets().insecure_sockets
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
            await trio.sleep(0.01)
    return hc.create_sockets().insecure_sockets


async def _serve(config: CoordinatorConfig, state: CoordinatorState, app: CoordinatorApp, prober: Prober,
                 listen: str | None, probing: bool, shutdown_trigger: Callable[[], Awaitable[None]] | None,
                 front: Front, task_status: trio.TaskStatus[RunningCoordinator]) -> None:
    opts = front.options
    hc = hypercorn_config(listen or config.listen)
    front.load()
    sockets = await _bind(hc)  # bound and listening before anything is reported
    plain: list[socket.socket] = []
    try:
        for sock in sockets:
            sock.listen(hc.backlog)
        if opts.tls and opts.http_port >= 0:
            host = split_host_port(listen or config.listen, default_port=8080)[0]
            bind = f"[{host}]:{opts.http_port}" if ":" in host else f"{host}:{opts.http_port}"
            plain = hypercorn_config(bind).create_sockets().insecure_sockets
            for sock in plain:
                sock.listen(hc.backlog)
    except BaseException:
        for sock in sockets + plain:
            sock.close()
        raise
    first = sockets[0].getsockname()
    port = first[1]
    scheme = "https" if opts.tls else "http"
    host_text = opts.hostname if opts.tls else repr_socket_addr(sockets[0].family, first).rsplit(":", 1)[0]
    if opts.tls and ":" in host_text:
        host_text = f"[{host_text}]"
    url = f"{scheme}://{host_text}:{port}"
    try:
        await _run_listeners(state, app, prober, probing, shutdown_trigger, front, hc, sockets, plain, url, port,
                             task_status)
    finally:
        for sock in sockets + plain:
            sock.close()


async def _run_listeners(state: CoordinatorState, app: CoordinatorApp, prober: Prober, probing: bool,
                         shutdown_trigger: Callable[[], Awaitable[None]] | None, front: Front,
                         hc: HypercornConfig, sockets: list[socket.socket], plain: list[socket.socket], url: str,
                         port: int, task_status: trio.TaskStatus[RunningCoordinator]) -> None:
    opts = front.options
    async with trio.open_nursery() as nursery:
        await nursery.start(front.run)
        nursery.start_soon(partial(front.serve, app, hc, sockets, tls=opts.tls))
        if plain:
            redirect = RedirectApp(front, lambda: port)
            nursery.start_soon(partial(front.serve, redirect, hc, plain, tls=False))
        if shutdown_trigger is not None:
            async def stop_when_triggered() -> None:
                await shutdown_trigger()
                nursery.cancel_scope.cancel()
            nursery.start_soon(stop_when_triggered)
        if probing:
            await nursery.start(prober.serve)
        log.info("coordinator serving %s/derpmap/default (%d regions, status at %s/status)",
                 url, len(state.published.dmap.regions), url)
        http_port = plain[0].getsockname()[1] if plain else None
        task_status.started(RunningCoordinator(url, port, state, prober, app, front, http_port))
