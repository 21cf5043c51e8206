"""``stund serve`` and ``stund check``."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from functools import partial

import click
import trio

from .client import StunErrorResponse, nat_discovery, stun_query
from .message import StunError
from .oneline import OneLineGroup, StartupError, format_addr, listen_error, run_trio, unwrapping
from .server import StunConfigError, parse_hostport, run_workers, serve_stun

log = logging.getLogger("stund")


def _hostport(_ctx: click.Context, _param: click.Parameter, value: object) -> object:
    try:
        if value is None:
            return None
        if isinstance(value, tuple):
            return [parse_hostport(v) for v in value]
        return parse_hostport(str(value))
    except StunConfigError as exc:
        raise click.BadParameter(str(exc)) from None


def _alt_hostport(_ctx: click.Context, _param: click.Parameter, value: str | None) -> object:
    try:
        return None if value is None else parse_hostport(value, default_port=0)
    except StunConfigError as exc:
        raise click.BadParameter(str(exc)) from None


def _start_metrics(addr: tuple[str, int] | None, process: str = "0") -> None:
    """Serve /metrics on ``addr``; ``process`` labels this process's ``process_*`` series
    (``"parent"`` with ``--workers``)."""
    if addr is None:
        return
    from prometheus_client import start_http_server

    from .metrics import registry

    host, port = addr
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry(process))
    except OSError as exc:
        raise StartupError(listen_error(exc, format_addr(host, port), "--metrics-addr")) from None
    bound = server.server_port
    # On stdout, like the listening line, so scripts learn the port chosen for port 0.
    print(f"stund metrics on http://{f'[{host}]' if ':' in host else host}:{bound}/metrics", flush=True)


@click.group(name="stund", cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="derpd", prog_name="stund")
@click.option("-v", "--verbose", count=True, help="-v: startup and info lines; -vv: one debug line per ignored packet.")
def main(verbose: int) -> None:
    """stund: a STUN server for Tailscale and ordinary STUN clients."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)


@main.command()
@click.option(
    "-a", "--addr", "addrs", multiple=True, default=(":3478",), callback=_hostport, show_default=True,
    help="UDP address to listen on, repeatable: IP:PORT, [IPv6]:PORT, :PORT (dual-stack).",
)
@click.option(
    "--alternate-addr", callback=_alt_hostport, default=None,
    help="RFC 5780: alternate IP[:PORT]; the first -a must then be a specific IP of the same family.",
)
@click.option("--metrics-addr", callback=_hostport, default=None, help="Serve Prometheus /metrics on HOST:PORT.")
@click.option("--workers", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Processes sharing the ports with SO_REUSEPORT.")
@click.option("--tailscale-only", is_flag=True, help="Answer only Tailscale's requests, as derper does.")
def serve(addrs: list[tuple[str, int]], alternate_addr: tuple[str, int] | None,
          metrics_addr: tuple[str, int] | None, workers: int, tailscale_only: bool) -> None:
    """Run the STUN server."""
    # Nothing to reload: SIGHUP (systemctl reload) must not stop the server.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    alt_ip, alt_port = (None, None)
    if alternate_addr is not None:
        alt_ip, alt_port = alternate_addr[0], alternate_addr[1] or None  # no port: a free one

    def announce(bound: list[tuple[str, int]]) -> None:
        # One line on stdout so scripts and tests can learn the ports chosen for port 0.
        print("stund listening on " + " ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in bound),
              flush=True)

    try:
        if workers > 1:
            _start_metrics(metrics_addr, "parent")
            # A worker's bind error arrives as it was raised there: inside trio's exception group.
            stopped_by = unwrapping(partial(run_workers, list(addrs), workers, alternate_ip=alt_ip,
                                            alternate_port=alt_port, tailscale_only=tailscale_only,
                                            on_started=announce))
        else:
            stopped_by = run_trio(partial(_serve_until_signal, list(addrs), alt_ip, alt_port, tailscale_only,
                                          metrics_addr, announce))
    except KeyboardInterrupt:  # Ctrl-C before the signal handler is in place
        stopped_by = "interrupted"
    except OSError as exc:
        flag = "--alternate-addr" if alternate_addr is not None else "-a"
        where = " ".join(format_addr(h, p) for h, p in addrs)
        raise StartupError(listen_error(exc, where, flag)) from None
    except StunConfigError as exc:
        raise StartupError(f"cannot start: {exc}") from None
    if stopped_by is not None:
        click.echo(f"stund: stopped ({stopped_by})", err=True)


async def _serve_until_signal(addrs: list[tuple[str, int]], alt_ip: str | None, alt_port: int | None,
                              tailscale_only: bool, metrics_addr: tuple[str, int] | None,
                              announce: Callable[[list[tuple[str, int]]], None]) -> str:
    """Serve until SIGINT or SIGTERM; returns the signal's name."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(partial(
                serve_stun, addrs, alternate_ip=alt_ip, alternate_port=alt_port, tailscale_only=tailscale_only))
            _start_metrics(metrics_addr)
            announce(bound)
            async for signum in signals:
                nursery.cancel_scope.cancel()
                return signal.Signals(signum).name
    return "stopped"


@main.command()
@click.argument("target", callback=_hostport)
@click.option("--timeout", type=float, default=2.0, show_default=True, help="Seconds to wait for each answer.")
@click.option("--rfc", is_flag=True, help="Send a plain RFC 8489 request instead of Tailscale's.")
@click.option("--nat", is_flag=True, help="Run the RFC 5780 mapping and filtering tests.")
def check(target: tuple[str, int], timeout: float, rfc: bool, nat: bool) -> None:
    """Query a STUN server at HOST:PORT and print our reflexive address and the RTT."""
    host, port = target
    try:
        if nat:
            report = trio.run(partial(nat_discovery, host, port, timeout=timeout))
            click.echo(f"mapped address: {_fmt(report.mapped)}")
            click.echo(f"other address: {_fmt(report.other_address)}")
            click.echo(f"mapping behaviour: {report.mapping}")
            click.echo(f"filtering behaviour: {report.filtering}")
            return
        result = trio.run(partial(stun_query, host, port, timeout=timeout, tailscale_style=not rfc))
    except StunErrorResponse as exc:
        raise click.ClickException(f"{host} port {port} answered {exc.code} {exc.reason}") from None
    except (StunError, OSError) as exc:
        raise click.ClickException(f"{exc}; check the address and that UDP port {port} is reachable") from None
    click.echo(f"mapped address: {_fmt(result.address)}")
    click.echo(f"rtt: {result.rtt * 1000:.3f} ms")


def _fmt(addr: tuple[str, int]) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
