"""The ``derpd`` command: ``serve`` (derper's flags), ``genkey``, ``check``, and the
coordinator commands registered at the bottom.

This module only parses flags and reports.  ``derpd.cli_settings`` turns ``serve``'s flags into
``NodeSettings``; the running node is assembled in ``derpd.node`` (one process, and ``derpd dev``)
and ``derpd.workers`` (``--workers N``).  Nothing imports this module but ``derpd.__main__`` and
the console script; the command line (this module, ``derpd.cli_settings``, ``derpd.derperflags``,
``derpd.coordinator.cli``) is the only part of derpd that imports click.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import click
import trio
from stund.oneline import OneLineGroup, StartupError, format_addr, listen_error, run_trio

from . import __version__
from .cli_settings import node_settings
from .coordinator.cli import coordinator_command
from .derperflags import DerperCommand, GoDuration, GoFloat, GoInt
from .keyfile import KeyFileError, key_file_json
from .keys import KeyFormatError, NodePrivate, parse_mesh_key
from .logsetup import per_request_logs
from .node import bind_error_message, prepare, run_node, setup_logging
from .relay.listener import BindError
from .settings import SettingsError


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"derpd: {message}", err=True)
    sys.exit(code)


@click.group(name="derpd", cls=OneLineGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="derpd", message="%(prog)s %(version)s")  # as `serve -version`
def main() -> None:
    """derpd: a Tailscale-compatible DERP relay with STUN and a DERP-map coordinator.

    Start with `derpd dev` for a complete local region, or `derpd serve --help` to run a relay.
    """


# ---------------------------------------------------------------------------- serve

SERVE_EPILOG = """Flags are read as derper reads them (Go's flag syntax): -name or --name, -name=value or
-name value, booleans as -name or -name=false; durations as 500ms, 2s, 10m or 1h30m. The same
command line as derper works; docs/derper-compat.md lists every derper flag."""


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(f"derpd {__version__}")
        ctx.exit()


class WorkerCount(click.ParamType):
    """``--workers``: a number from 1 to 64, or ``auto`` (one per available CPU)."""

    name = "N|auto"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        if str(value).strip().lower() == "auto":
            from .workers import available_cpus

            return min(64, available_cpus())
        try:
            count = int(str(value))
        except ValueError:
            count = 0
        if not 1 <= count <= 64:
            self.fail(f"{value!r} is neither a number from 1 to 64 nor 'auto'", param, ctx)
        return count


@main.command(cls=DerperCommand, epilog=SERVE_EPILOG)
@click.option("-a", "--addr", default=":443", show_default=True,
              help="Listen address: ':port', 'ip:port' or '[ipv6]:port'. TLS iff port 443 or --certmode manual.")
@click.option("--http-port", type=GoInt(), default=80, show_default=True,
              help="Plain-HTTP port beside TLS (ACME HTTP-01, generate_204, redirects to https); -1 disables.")
@click.option("--stun-port", type=GoInt(), default=3478, show_default=True,
              help="UDP STUN port on the same IP as -a; -1 disables.")
@click.option("--stun/--no-stun", "stun", default=True, help="Run the STUN server (--stun=false: off).")
@click.option("-c", "config", type=click.Path(dir_okay=False, path_type=Path),
              help="Key file (derper's JSON {\"PrivateKey\": \"privkey:...\"}); created with mode 0600 if missing. "
                   "Default when run as root: /var/lib/derper/derper.key.")
@click.option("--certmode", type=click.Choice(["letsencrypt", "manual", "gcp"]), default="letsencrypt",
              show_default=True,
              help="With TLS (port 443): 'letsencrypt' or 'gcp' obtain and renew the certificate over ACME "
                   "(docs/acme.md); 'manual' loads <certdir>/<hostname>.crt and .key (self-signed for an IP).")
@click.option("--certdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory of the TLS certificate and key (and, with ACME, the account key). Default: "
                   "$XDG_CACHE_HOME (else ~/.cache)/tailscale/derper-certs, as derper.")
@click.option("--acme-email", default="", help="ACME account contact email (required for --certmode gcp).")
@click.option("--acme-eab-kid", default="", help="ACME External Account Binding key ID (--certmode gcp).")
@click.option("--acme-eab-key", default="", help="ACME External Account Binding HMAC key, base64 (--certmode gcp).")
@click.option("--acme-directory", default=None, metavar="URL",
              help="ACME directory URL (default: Let's Encrypt production; for staging or a private CA). "
                   "Its TLS is verified with the system roots or SSL_CERT_FILE.")
@click.option("--acme-ip-certs", is_flag=True,
              help="With an IP --hostname: a short-lived publicly trusted IP certificate (profile "
                   "'shortlived', HTTP-01 on --http-port).")
@click.option("--hostname", default="derp.tailscale.com", show_default=True,
              help="TLS hostname (names the cert files); may be an IP for a self-signed certificate.")
@click.option("--dev", is_flag=True, help="Development: plain HTTP on :3340, a fresh key each start.")
@click.option("--home", default="", help="Home page: '' built-in, 'blank', or an http(s):// URL to redirect to.")
@click.option("--derp/--no-derp", "derp_enabled", default=True, help="Serve the relay (off: /derp answers 404).")
@click.option("--bootstrap-dns-names", default="", metavar="NAME,...",
              help="Hostnames to resolve (now and every 10 minutes) and publish at /bootstrap-dns.")
@click.option("--unpublished-bootstrap-dns-names", default="", metavar="NAME,...",
              help="Hostnames /bootstrap-dns answers only when asked for by name (?q=NAME).")
@click.option("--debug-allow", default="", metavar="CIDR,...",
              help="Serve /debug/ (index, varz) to these networks too, not only loopback (derper also "
                   "admits Tailscale's 100.64.0.0/10,fd7a:115c:a1e0::/48).")
@click.option("--metrics-addr", default=None, metavar="HOST:PORT",
              help="Serve Prometheus /metrics on a dedicated listener (on the relay port it answers loopback only).")
@click.option("--mesh-psk-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File with the 64-hex-digit mesh key; clients presenting it are mesh peers. "
                   "Default, as derper: /home/derp/keys/derp-mesh.key or ~/keys/derp-mesh.key if present.")
@click.option("--mesh-with", default="", metavar="HOST[:PORT][/DIALHOST],...",
              help="Mesh peers of this region (may include this relay's own hostname, which is skipped).")
@click.option("--mesh-ca-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Trust this CA bundle (PEM) for mesh peers' TLS certificates, instead of the system roots.")
@click.option("--tcp-write-timeout", type=GoDuration(), default="2s", show_default=True,
              help="How long a write to a client may take before it is dropped; 0 = none.")
@click.option("--tcp-keepalive-time", type=GoDuration(), default="10m", show_default=True,
              help="TCP keepalive period.")
@click.option("--tcp-user-timeout", type=GoDuration(), default="15s", show_default=True,
              help="TCP_USER_TIMEOUT (Linux); 0 = kernel default.")
@click.option("--accept-connection-limit", type=GoFloat(), default=float("inf"),
              help="New connections accepted per second (token bucket); the surplus is closed at once.")
@click.option("--accept-connection-burst", type=GoInt(minimum=1), default=1 << 30,
              help="Burst for --accept-connection-limit.")
@click.option("--max-connections-per-ip", type=click.IntRange(0), default=0,
              help="Open connections allowed from one source IP; 0 = unlimited.")
@click.option("--proxy-protocol", is_flag=True,
              help="Expect a PROXY protocol v1/v2 header from --trusted-proxies on the relay port "
                   "(an SNI router or load balancer in front); a header from anyone else closes the connection.")
@click.option("--trusted-proxies", default="", metavar="CIDR,...",
              help="Proxies whose PROXY headers (with --proxy-protocol) and X-Forwarded-For (plain HTTP) "
                   "name the real client.")
@click.option("--shutdown-grace", type=GoDuration(), default="5s", show_default=True,
              help="On SIGTERM: how long to let queued packets drain after telling clients to reconnect.")
@click.option("--drain-grace", type=GoDuration(), default="30s", show_default=True,
              help="On SIGTERM with --coordinator, and on SIGUSR1 (derpd drain): announce draining, so the "
                   "coordinator moves clients to other nodes, and keep relaying until none has been connected "
                   "for 5 s, or this long; 0 = stop at once, as derper does.")
@click.option("--queue-depth", type=click.IntRange(1, 100000), default=32, show_default=True,
              help="Packets queued per client (and again for disco) before the oldest is dropped.")
@click.option("--coordinator", default=None, metavar="URL[,URL...]",
              help="Register this node with the derpd coordinator(s) at URL (several, comma-separated, "
                   "for replicas) and keep heartbeating; a certificate reload is announced at once.")
@click.option("--coordinator-token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="File holding the coordinator's shared registration token.")
@click.option("--heartbeat-interval", type=GoDuration(), default="15s", show_default=True,
              help="How often to re-register with --coordinator until it answers; then each coordinator's "
                   "answer sets the pace (a third of its node_ttl).")
@click.option("--region-id", type=click.IntRange(1), default=900, show_default=True, help="Region to register in.")
@click.option("--region-code", default=None, help="Short region code (when the coordinator does not know the region).")
@click.option("--region-name", default=None, help="Human region name (likewise).")
@click.option("--node-name", default=None, help="Unique node name in the map; default: the hostname.")
@click.option("--advertise-ipv4", default=None, metavar="IP", help="IPv4 to publish for this node (IPv4 field).")
@click.option("--advertise-ipv6", default=None, metavar="IP", help="IPv6 to publish for this node (IPv6 field).")
@click.option("--workers", type=WorkerCount(), default="1", show_default=True,
              help="Relay processes sharing the port (SO_REUSEPORT), meshed with each other over loopback; "
                   "'auto': one per available CPU.")
@click.option("-v", "--verbose", count=True, help="-v: one line per notable event; -vv: debug lines per connection.")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Print the version and exit.")
@click.option("--verify-client-url", default=None, metavar="URL",
              help="Admit a client only if a POST of its key to URL answers {\"Allow\": true} "
                   "(derper's protocol; headscale serves it at /verify).")
@click.option("--verify-client-url-fail-open/--no-verify-client-url-fail-open", default=True, show_default=True,
              help="Admit clients when the verify URL cannot be reached or times out (5 s).")
@click.option("--verify-clients", is_flag=True,
              help="Admit only nodes of this tailnet, asking the local tailscaled (derper's flag; fails closed).")
@click.option("--socket", default=None, metavar="PATH",
              help="tailscaled's LocalAPI socket for --verify-clients [default: /var/run/tailscale/tailscaled.sock].")
@click.option("--allow-keys", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Admit only the nodekey:<hex> lines of this file (reloaded on SIGHUP and on change).")
@click.option("--rate-config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="derper's JSON {\"PerClientRateLimitBytesPerSec\": N, \"PerClientRateBurstBytes\": N}: "
                   "slows each non-mesh client's sending (never drops); reloaded on SIGHUP.")
def serve(**flags: Any) -> None:
    """Run a DERP relay (drop-in for Tailscale's derper)."""
    setup_logging(flags["verbose"])
    try:
        settings = node_settings(flags)  # flags become typed settings here, and only here
        parts = prepare(settings)  # admission files and ACME: refused now, before anything listens
    except (SettingsError, KeyFileError, KeyFormatError, ValueError) as e:
        _fail(str(e))
    try:
        if settings.workers > 1:
            from .workers import WorkersFailed, run_workers

            try:
                sys.exit(run_workers(settings))  # each worker prepares its own parts (they hold trio objects)
            except WorkersFailed as e:
                _fail(str(e), e.code)
        run_trio(run_node, settings, parts)
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers are in place
        click.echo("derpd: stopped (interrupted)", err=True)
    except BindError as e:
        _fail(bind_error_message(e))
    except SettingsError as e:  # includes CertError
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot start: {e}")


# ---------------------------------------------------------------------------- dev


@main.command("dev")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              help="Where the test CA and certificates live (reused while valid). "
                   "Default: derpd-dev in the system temp directory.")
@click.option("--derp-port", default=8443, show_default=True, help="Relay TLS port on 127.0.0.1 (0 = any).")
@click.option("--stun-port", default=3478, show_default=True, help="STUN UDP port on 127.0.0.1 (0 = any).")
@click.option("--map-port", default=8080, show_default=True, help="Coordinator HTTP port on 127.0.0.1 (0 = any).")
@click.option("--probe-interval", default=10.0, show_default=True, help="Seconds between health probes.")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def dev_command(directory: Path | None, derp_port: int, stun_port: int, map_port: int, probe_interval: float,
                verbose: int) -> None:
    """Run a whole DERP region on loopback: relay (TLS), STUN and the map coordinator.

    Prints the DERP map URL, the test CA, a derpprobe command line (and where to get derpprobe),
    a `derpd check` command line and the headscale derp.urls snippet. Ctrl-C stops it.
    """
    from .devregion import run_dev_region

    logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    per_request_logs(verbose)
    directory = directory or Path(tempfile.gettempdir()) / "derpd-dev"
    try:
        run_trio(partial(run_dev_region, directory, relay_port=derp_port, stun_port=stun_port, map_port=map_port,
                         probe_interval=probe_interval, show=click.echo))
    except KeyboardInterrupt:  # Ctrl-C before the signal handler is in place
        click.echo("derpd dev: stopped (interrupted)")
    except BindError as e:
        flag = {"relay": "--derp-port", "stun": "--stun-port", "map": "--map-port"}[e.which]
        raise StartupError(listen_error(e.cause, format_addr(e.host, e.port), flag + " (0 = any free port)")) from None
    except (SettingsError, OSError) as e:  # SettingsError includes CertError
        raise StartupError(f"cannot start: {e}") from None


# ---------------------------------------------------------------------------- genkey


@main.command()
@click.option("-c", "config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the key file here (mode 0600; never overwrites). Default: print it.")
def genkey(config: Path | None) -> None:
    """Generate a relay key in derper's key-file format; prints the public key to stderr."""
    key = NodePrivate.generate()
    if config is None:
        click.echo(key_file_json(key), nl=False)
    else:
        from .keyfile import write_new

        try:
            write_new(config, key)
        except KeyFileError as e:
            _fail(str(e))
    click.echo(f"public key: {key.public}", err=True)


# ---------------------------------------------------------------------------- check


@main.command()
@click.argument("url")
@click.option("-n", "--count", type=click.IntRange(1, 1_000_000), default=100, show_default=True,
              help="Packets to relay each way.")
@click.option("--size", type=click.IntRange(12, 65536), default=None, help="Packet size in bytes [default: 256; "
              "with --throughput 1200].")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds for login and for the run.")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Trust this CA bundle (PEM) instead of the system roots.")
@click.option("--cert-pin", default=None, metavar="sha256-raw:HEX", help="Accept only this certificate (DERP map CertName).")
@click.option("--insecure", is_flag=True, help="Skip TLS verification (tests only).")
@click.option("--server-name", default=None, help="TLS SNI / verified name, if not the URL host.")
@click.option("--throughput", type=GoDuration(), default=None, metavar="DURATION",
              help="Instead: send as fast as the path allows for DURATION (e.g. 5s) and print Mbit/s, "
                   "packets/s, loss, RTT under load and the relay's counters for the run.")
@click.option("--via", default=None, metavar="URL",
              help="With --throughput: the receiver logs in here, a second node of the same meshed region.")
@click.option("--metrics-url", default=None, metavar="URL",
              help="With --throughput: read URL's counters here (default: its /metrics, then /debug/varz).")
def check(url: str, count: int, size: int | None, timeout: float, ca_file: str | None, cert_pin: str | None,
          insecure: bool, server_name: str | None, throughput: float | None, via: str | None,
          metrics_url: str | None) -> None:
    """Log two clients in to URL, relay packets both ways, print loss and RTT; exit 1 on failure.

    URL is the relay's DERP URL, e.g. https://derp.example.com/derp or http://127.0.0.1:3340/derp.
    """
    import h11

    from .check import explain_failure, run_check
    from .client import DerpClientError, make_ssl_context
    from .protocol.errors import RemoteProtocolError

    options: dict[str, object] = {"server_name": server_name, "cert_pin": cert_pin, "insecure": insecure}
    if ca_file:
        options["ssl_context"] = make_ssl_context(ca_file=ca_file)
    if "://" not in url:
        url = f"https://{url}/derp"
    if via is not None and "://" not in via:
        via = f"https://{via}/derp"
    if throughput is not None:
        from .check import run_throughput, throughput_lines

        if throughput <= 0:
            _fail("--throughput needs a duration above zero, e.g. 5s")
        metrics = {url: metrics_url} if metrics_url else None
        try:
            run = run_trio(partial(run_throughput, url, throughput, via=via, size=size or 1200, timeout=timeout,
                                   metrics_urls=metrics, **options))
        except (DerpClientError, OSError, trio.TooSlowError, trio.BrokenResourceError, RemoteProtocolError,
                h11.RemoteProtocolError) as e:
            _fail(f"cannot measure the throughput: {explain_failure(e, url, server_name=server_name)}", 1)
        click.echo("\n".join(throughput_lines(url, via, run)))
        sys.exit(0 if run.received else 1)
    if via is not None or metrics_url is not None:
        _fail("--via and --metrics-url go with --throughput DURATION")
    try:
        result = run_trio(lambda: run_check(url, count=count, size=size or 256, timeout=timeout, **options))
    except (DerpClientError, OSError, trio.TooSlowError, trio.BrokenResourceError, RemoteProtocolError,
            h11.RemoteProtocolError) as e:
        _fail(f"cannot log in to {url}: {explain_failure(e, url, server_name=server_name)}", 1)
    p50, p99 = result.percentile(50), result.percentile(99)
    ms = lambda v: "n/a" if v is None else f"{v * 1000:.2f}ms"  # noqa: E731
    click.echo(f"{url}: delivered {result.delivered}/{result.sent}, lost {result.lost}, "
               f"corrupted {result.corrupted}, rtt p50 {ms(p50)} p99 {ms(p99)}, ping {ms(result.ping_rtt)}")
    if result.lost or result.corrupted or result.sent != count:
        sys.exit(1)


# ---------------------------------------------------------------------------- doctor


@main.command()
@click.argument("url")
@click.option("--timeout", type=GoDuration(), default="5s", show_default=True, help="Time for each network step.")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Trust this CA bundle (PEM) besides the system roots (the relay's and coordinators' TLS).")
@click.option("--cert-pin", default=None, metavar="sha256-raw:HEX", help="The node's CertName pin, if it has one.")
@click.option("--server-name", default=None, help="TLS SNI / verified name, if not the URL host.")
@click.option("--http-port", type=GoInt(), default=80, show_default=True,
              help="The relay's plain-HTTP port (/generate_204); -1 skips the check.")
@click.option("--stun-port", type=GoInt(), default=3478, show_default=True, help="The STUN port; -1 skips the check.")
@click.option("--key", "key_arg", default=None, metavar="KEY|FILE",
              help="Is this client admitted? privkey:<hex> or a key file logs in briefly as it; nodekey:<hex> "
                   "(with --mesh-psk-file) looks for it among the connected clients.")
@click.option("--mesh-psk-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The region's mesh key file: lists the mesh peers connected to the node.")
@click.option("--coordinator", "coordinators", multiple=True, metavar="URL[,URL...]",
              help="Is the node in this coordinator's published map? (repeatable)")
@click.option("--metrics-url", default=None, metavar="URL",
              help="The relay's metrics (to name why a key is refused); default: /metrics on the relay port.")
def doctor(url: str, timeout: float, ca_file: str | None, cert_pin: str | None, server_name: str | None,
           http_port: int, stun_port: int, key_arg: str | None, mesh_psk_file: Path | None,
           coordinators: tuple[str, ...], metrics_url: str | None) -> None:
    """Check what an operator checks by hand on the relay at URL, one line each (ok, warn, fail,
    skip, and what to do); exit 1 if any check failed.

    URL is the relay's DERP URL (https://derp.example.com/derp) or just its host name.
    """
    from .coordinator.announce import split_coordinator_urls
    from .doctor import FAIL, DoctorOptions, KeyArgError, check_url, parse_key_arg, run_doctor

    try:
        check_url(url)
        key = parse_key_arg(key_arg) if key_arg else None
        mesh_key = parse_mesh_key(mesh_psk_file.read_text()) if mesh_psk_file else None
        urls = [u for c in coordinators for u in split_coordinator_urls(c)]
    except (KeyArgError, KeyFormatError, ValueError, OSError) as e:
        _fail(f"{e}")
    if timeout <= 0:
        _fail("--timeout needs a duration above zero, e.g. 5s")
    opts = DoctorOptions(url, timeout=timeout, ca_file=ca_file, cert_pin=cert_pin, server_name=server_name,
                         http_port=http_port, stun_port=stun_port, key=key, mesh_key=mesh_key, coordinators=urls,
                         metrics_url=metrics_url)
    findings = run_trio(partial(run_doctor, opts, lambda f: click.echo(f.line())))
    sys.exit(1 if any(f.status == FAIL for f in findings) else 0)


main.add_command(coordinator_command, "coordinator")


# ---------------------------------------------------------------------------- close-peer


@main.command("close-peer")
@click.argument("url")
@click.argument("nodekey")
@click.option("--mesh-psk-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The region's mesh key file; only mesh peers may close clients.")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False), default=None, help="Trust this CA bundle.")
@click.option("--cert-pin", default=None, metavar="sha256-raw:HEX", help="Accept only this certificate.")
def close_peer_command(url: str, nodekey: str, mesh_psk_file: Path, ca_file: str | None, cert_pin: str | None) -> None:
    """Ask the relay at URL to close every connection of NODEKEY (nodekey:<hex>), e.g. to move a
    client back to its ideal node.  Uses the mesh key, as a mesh peer would."""
    from .check import explain_failure
    from .client import DerpClientError, make_ssl_context
    from .keys import NodePublic
    from .mesh import close_peer
    from .protocol.errors import RemoteProtocolError

    try:
        target = NodePublic.parse(nodekey)
        mesh_key = parse_mesh_key(mesh_psk_file.read_text())
    except (KeyFormatError, OSError) as e:
        _fail(f"{e}; NODEKEY is nodekey:<64 hex> and the mesh key file holds 64 hex digits")
    options: dict[str, object] = {"cert_pin": cert_pin}
    if ca_file:
        options["ssl_context"] = make_ssl_context(ca_file=ca_file)
    try:
        run_trio(partial(close_peer, url, target, mesh_key, **options))
    except (DerpClientError, OSError, trio.TooSlowError, trio.BrokenResourceError, RemoteProtocolError) as e:
        _fail(f"cannot ask {url} to close {target.short()}: {explain_failure(e, url, mesh=True)}", 1)
    click.echo(f"asked {url} to close {target}")


# ---------------------------------------------------------------------------- drain


@main.command("drain")
@click.argument("relay", metavar="PID|PIDFILE")
@click.option("--undo", is_flag=True, help="End the drain: the coordinator publishes the relay again once its "
                                           "probes pass.")
def drain_command(relay: str, undo: bool) -> None:
    """Drain the running `derpd serve` with this PID (or whose PID is in PIDFILE) for maintenance,
    without stopping it: it tells its coordinators it is draining (they take it out of the map,
    clients move to other nodes) and logs when its clients are gone; then stop it (SIGTERM) or
    end the drain (--undo).  The same as sending it SIGUSR1 (--undo: SIGUSR2)."""
    from .drain import DrainError, signal_relay

    try:
        pid = signal_relay(relay, undo=undo)
    except DrainError as e:
        _fail(str(e), e.code)
    click.echo(f"asked derpd (pid {pid}) to {'end its drain' if undo else 'drain'}; "
               f"it logs what happens (-v)")
