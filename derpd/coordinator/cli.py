"""``derpd coordinator``: publish a live, health-aware DERP map."""

from __future__ import annotations

import logging
import signal
import socket
import sys
from dataclasses import replace
from pathlib import Path

import click
import trio
from stund.oneline import StartupError, format_addr, listen_error, run_trio

from ..logsetup import per_request_logs
from ..settings import SettingsError, split_host_port
from .config import ConfigError, CoordinatorConfig, load_config, read_token_file
from .persist import StateDirError, StateStore, default_state_dir
from .server import RunningCoordinator, serve_coordinator
from .state import CoordinatorState


@click.command(
    "coordinator",
    epilog="""\b
Endpoints:
  /derpmap/default        DERPMap JSON   (headscale derp.urls, derpprobe -derp-map)
  /derpmap/default.yaml   DERPMap YAML   (headscale derp.paths)
  /v1/nodes               POST: registration from `derpd serve --coordinator URL`
  /status, /status.json   health page for people, and its data
  /metrics, /healthz

\b
Example:
  derpd coordinator --config deploy/coordinator.example.toml -a 127.0.0.1:8080
  curl http://127.0.0.1:8080/derpmap/default

Send SIGHUP to reload the config; a bad file is reported and the last good map stays.""",
)
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML config with settings and static regions (see deploy/coordinator.example.toml). "
                   "Without it the map starts empty and fills from registrations.")
@click.option("-a", "--addr", "listen", metavar="HOST:PORT",
              help="Listen address (plain HTTP). Overrides coordinator.listen; default 127.0.0.1:8080.")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File with the shared registration token. Overrides coordinator.token_file.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where registrations and the last published map are kept across restarts. "
                   "Default: $STATE_DIRECTORY (systemd's StateDirectory=), else ~/.local/state/derpd.")
@click.option("--check", is_flag=True,
              help="Only validate the config, the listen address and the state directory, print the map JSON "
                   "it would serve at start, and exit.")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def coordinator_command(config_path: Path | None, listen: str | None, token_file: Path | None,
                        state_dir: Path | None, check: bool, verbose: int) -> None:
    """Publish a DERP map (tailcfg.DERPMap) that follows the health of its nodes.

    Nodes come from the config file and from self-registration; every node is probed
    (/derp/probe, a DERP login with a relayed packet, and STUN) and nodes that fail
    leave the published map until they pass again.
    """
    logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    per_request_logs(verbose)  # a line per probe: -vv only
    try:
        config = load_config(config_path) if config_path else CoordinatorConfig()
        if token_file is not None:
            config = replace(config, token=read_token_file(token_file))
        where = "-a" if listen else f"{config_path}: coordinator.listen" if config_path else "the default -a"
        address = check_listen(listen or config.listen, where)
    except (ConfigError, SettingsError) as exc:
        raise StartupError(str(exc)) from None
    state_dir = state_dir or default_state_dir()
    store = StateStore(state_dir)
    try:
        store.check()
    except StateDirError as exc:
        raise StartupError(str(exc)) from None
    if check:  # exactly the bytes GET /derpmap/default answers right after start
        sys.stdout.buffer.write(CoordinatorState(config, store=store).published.json)
        sys.stdout.flush()
        return
    try:
        stopped_by = run_trio(_run, config, config_path, address, state_dir)
    except KeyboardInterrupt:  # Ctrl-C before the signal handler is in place
        stopped_by = "interrupted"
    except StateDirError as exc:
        raise StartupError(str(exc)) from None
    except OSError as exc:
        host, port = split_host_port(address, default_port=8080)
        raise StartupError(listen_error(exc, format_addr(host, port), "-a HOST:PORT")) from None
    click.echo(f"derpd coordinator: stopped ({stopped_by})", err=True)


def check_listen(listen: str, where: str) -> str:
    """Returns ``listen`` once it is a usable ``HOST:PORT`` for this machine.

    Raises:
        SettingsError: not HOST:PORT, a bad port, or a host that does not resolve.
    """
    try:
        host, port = split_host_port(listen, default_port=-1)
    except SettingsError as exc:
        raise SettingsError(f"{where}: {exc}") from None
    if port < 0 or not host:
        raise SettingsError(f"{where} {listen!r}: give HOST:PORT, e.g. 127.0.0.1:8080 or [::]:8080")
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise SettingsError(f"{where} {listen!r}: the host does not resolve ({exc.strerror}); give an IP") from None
    return listen


async def _run(config: CoordinatorConfig, config_path: Path | None, listen: str, state_dir: Path) -> str:
    """Serve until SIGINT or SIGTERM; SIGHUP reloads the config.  Returns the signal's name."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            running: RunningCoordinator = await nursery.start(lambda task_status: serve_coordinator(
                config, listen=listen, state_dir=state_dir, task_status=task_status))
            click.echo(f"derpd coordinator: map at {running.url}/derpmap/default, status at {running.url}/status")
            async for signum in signals:
                if signum != signal.SIGHUP:
                    nursery.cancel_scope.cancel()
                    return signal.Signals(signum).name
                if config_path is not None:
                    running.reload_from(config_path)
    return "stopped"
