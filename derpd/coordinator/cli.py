"""``derpd coordinator``: publish a live, health-aware DERP map."""

from __future__ import annotations

import logging
import signal
from dataclasses import replace
from pathlib import Path

import click
import trio

from .config import ConfigError, CoordinatorConfig, load_config, read_token_file
from .persist import StateDirError, StateStore, default_state_dir
from .server import RunningCoordinator, serve_coordinator


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
@click.option("--check", is_flag=True, help="Only validate the config, print the map JSON and exit.")
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
    try:
        config = load_config(config_path) if config_path else CoordinatorConfig()
        if token_file is not None:
            config = replace(config, token=read_token_file(token_file))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if check:
        click.echo(config.static_map.to_json_bytes().decode(), nl=False)
        return
    state_dir = state_dir or default_state_dir()
    try:
        StateStore(state_dir).check()
    except StateDirError as exc:
        click.echo(f"derpd coordinator: {exc}", err=True)
        raise SystemExit(2) from None
    try:
        trio.run(_run, config, config_path, listen, state_dir)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {listen or config.listen}: {exc.strerror or exc}; pick another -a HOST:PORT") from None


async def _run(config: CoordinatorConfig, config_path: Path | None, listen: str | None,
               state_dir: Path) -> None:
    async with trio.open_nursery() as nursery:
        running: RunningCoordinator = await nursery.start(lambda task_status: serve_coordinator(
            config, listen=listen, state_dir=state_dir, task_status=task_status))
        click.echo(f"derpd coordinator: map at {running.url}/derpmap/default, status at {running.url}/status")
        if config_path is not None:
            nursery.start_soon(_reload_on_sighup, running, config_path)


async def _reload_on_sighup(running: RunningCoordinator, path: Path) -> None:
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            running.reload_from(path)
