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
from ..relay.client_address import parse_cidrs
from .config import ConfigError, CoordinatorConfig, load_config, read_token_file
from .front import Front, FrontOptions
from .metrics import CoordinatorMetrics
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
              help="Listen address (HTTPS with --certmode, else plain HTTP). Overrides coordinator.listen; "
                   "default 127.0.0.1:8080.")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File with the shared registration token. Overrides coordinator.token_file.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where registrations and the last published map are kept across restarts. "
                   "Default: $STATE_DIRECTORY (systemd's StateDirectory=), else ~/.local/state/derpd.")
@click.option("--certmode", type=click.Choice(["manual", "letsencrypt", "gcp"]), default=None,
              help="Serve HTTPS: 'manual' loads <certdir>/<hostname>.crt and .key (reloaded when they change "
                   "or on SIGHUP); 'letsencrypt' or 'gcp' obtain and renew it over ACME (HTTP-01 on "
                   "--http-port), as derpd serve does. Without it: plain HTTP (loopback, or behind a TLS proxy).")
@click.option("--certdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory of the certificate and key (and, with ACME, the account key).")
@click.option("--hostname", default="", help="The coordinator's DNS name (names the certificate files; the "
                                             "name ACME certifies; where http:// is redirected to).")
@click.option("--http-port", type=int, default=None,
              help="With --certmode: a plain-HTTP port that answers ACME HTTP-01 and redirects the rest to "
                   "https (default 80 with letsencrypt/gcp, none with manual; -1: none).")
@click.option("--acme-email", default="", help="ACME account contact email (required for --certmode gcp).")
@click.option("--acme-eab-kid", default="", help="ACME External Account Binding key ID.")
@click.option("--acme-eab-key", default="", help="ACME External Account Binding HMAC key, base64.")
@click.option("--acme-directory", default=None, metavar="URL",
              help="ACME directory URL (default: Let's Encrypt production; staging or a private CA).")
@click.option("--proxy-protocol", is_flag=True,
              help="Expect a PROXY protocol v1/v2 header from --trusted-proxies on every connection (a TCP "
                   "load balancer in front); a header from anyone else closes the connection.")
@click.option("--trusted-proxies", default="", metavar="CIDR,...",
              help="Proxies whose PROXY headers (with --proxy-protocol) and X-Forwarded-For name the real "
                   "client of a registration; from anyone else these headers are ignored and counted.")
@click.option("--check", is_flag=True,
              help="Only validate the config, the listen address and the state directory, print the map JSON "
                   "it would serve at start, and exit.")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def coordinator_command(config_path: Path | None, listen: str | None, token_file: Path | None,
                        state_dir: Path | None, certmode: str | None, certdir: Path | None, hostname: str,
                        http_port: int | None, acme_email: str, acme_eab_kid: str, acme_eab_key: str,
                        acme_directory: str | None, proxy_protocol: bool, trusted_proxies: str,
                        check: bool, verbose: int) -> None:
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
        front = front_options(certmode, certdir, hostname, http_port, acme_email, acme_eab_kid, acme_eab_key,
                              acme_directory, proxy_protocol, trusted_proxies)
        if front.certmode == "manual":
            Front(front, CoordinatorMetrics()).load()  # the files must be usable now, not at the first client
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
        stopped_by = run_trio(_run, config, config_path, token_file, address, state_dir, front)
    except KeyboardInterrupt:  # Ctrl-C before the signal handler is in place
        stopped_by = "interrupted"
    except (StateDirError, SettingsError) as exc:
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


def front_options(certmode: str | None, certdir: Path | None, hostname: str, http_port: int | None, email: str,
                  eab_kid: str, eab_key: str, directory: str | None, proxy_protocol: bool,
                  trusted_proxies: str) -> FrontOptions:
    """The listener flags, checked.

    Raises:
        SettingsError: one line saying what to change.
    """
    trusted = parse_cidrs(trusted_proxies)
    acme = None
    if certmode is None:
        for flag, value in (("--certdir", certdir), ("--hostname", hostname), ("--http-port", http_port),
                            ("--acme-directory", directory), ("--acme-email", email)):
            if value:
                raise SettingsError(f"{flag} is for HTTPS: add --certmode manual or --certmode letsencrypt")
        return FrontOptions(proxy_protocol=proxy_protocol, trusted_proxies=trusted)
    if certdir is None or not hostname:
        raise SettingsError(f"--certmode {certmode} needs --certdir DIR and --hostname NAME (the name relays and "
                            "headscale reach the coordinator at)")
    if http_port is None:
        http_port = -1 if certmode == "manual" else 80
    if not -1 <= http_port <= 65535:
        raise SettingsError("--http-port must be -1 (none) or a port number")
    if certmode != "manual":
        if http_port < 0:
            raise SettingsError(f"--certmode {certmode} validates over HTTP-01 on --http-port; do not pass "
                                "--http-port -1")
        from ..acme import HTTP_01, AcmeConfig

        acme = replace(AcmeConfig.from_options(
            certmode=certmode, hostname=hostname, certdir=certdir, http_port=http_port, directory=directory,
            email=email, eab_kid=eab_kid, eab_key=eab_key, ip_certs=False), challenges=(HTTP_01,))
    return FrontOptions(certmode, certdir, hostname, http_port, acme, proxy_protocol, trusted)


async def _run(config: CoordinatorConfig, config_path: Path | None, token_file: Path | None, listen: str,
               state_dir: Path, front: FrontOptions) -> str:
    """Serve until SIGINT or SIGTERM; SIGHUP reloads the config.  Returns the signal's name."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            running: RunningCoordinator = await nursery.start(lambda task_status: serve_coordinator(
                config, listen=listen, state_dir=state_dir, front=front, task_status=task_status))
            if not front.tls:
                click.echo("derpd coordinator: plain HTTP, no TLS (for loopback, or behind a TLS proxy; "
                           "--certmode serves HTTPS)")
            elif running.http_port is not None:
                click.echo(f"derpd coordinator: HTTPS; plain HTTP on port {running.http_port} answers ACME "
                           "and redirects to https")
            click.echo(f"derpd coordinator: map at {running.url}/derpmap/default, status at {running.url}/status")
            async for signum in signals:
                if signum != signal.SIGHUP:
                    nursery.cancel_scope.cancel()
                    return signal.Signals(signum).name
                if config_path is not None or token_file is not None:
                    running.reload_from(config_path, token_file)
                else:
                    running.front.reload_tls()
    return "stopped"
