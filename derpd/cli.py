"""The ``derpd`` command: ``serve`` (derper's flags), ``genkey``, ``check``, and the
coordinator commands registered at the bottom."""

from __future__ import annotations

import json
import logging
import dataclasses
import signal
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import click
import trio

from . import __version__
from .keyfile import KeyFileError, key_file_json, load_or_create
from .keys import KeyFormatError, NodePrivate, parse_mesh_key
from .relay.server import RunningRelay
from .settings import RelaySettings, SettingsError, split_host_port
from .admission import Protection, serve_options as admission_options

log = logging.getLogger("derpd")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("derpd.startup").setLevel(logging.INFO)


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"derpd: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="derpd")
def main() -> None:
    """derpd: a Tailscale-compatible DERP relay with STUN and a DERP-map coordinator.

    Start with `derpd dev` for a complete local region, or `derpd serve --help` to run a relay.
    """


# ---------------------------------------------------------------------------- serve


@main.command()
@click.option("-a", "--addr", default=":443", show_default=True,
              help="Listen address: ':port', 'ip:port' or '[ipv6]:port'. TLS iff port 443 or --certmode.")
@click.option("--http-port", type=int, default=80, show_default=True,
              help="Plain-HTTP port beside TLS (generate_204, redirects to https); -1 disables.")
@click.option("--stun-port", type=int, default=3478, show_default=True,
              help="UDP STUN port on the same IP as -a; -1 disables.")
@click.option("-c", "config", type=click.Path(dir_okay=False, path_type=Path),
              help="Key file (derper's JSON {\"PrivateKey\": \"privkey:...\"}); created with mode 0600 if missing.")
@click.option("--certmode", type=click.Choice(["letsencrypt", "gcp", "manual"]), default=None,
              help="'letsencrypt' (default on port 443) or 'gcp': obtain and renew the certificate over ACME "
                   "(docs/acme.md); 'manual': load <certdir>/<hostname>.crt and .key (self-signed for an IP).")
@click.option("--certdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory of the TLS certificate and key (and, with ACME, the account key).")
@click.option("--acme-email", default="", help="ACME account contact email (required for --certmode gcp).")
@click.option("--acme-eab-kid", default="", help="ACME External Account Binding key ID (--certmode gcp).")
@click.option("--acme-eab-key", default="", help="ACME External Account Binding HMAC key, base64 (--certmode gcp).")
@click.option("--acme-directory", default=None, metavar="URL",
              help="ACME directory URL (default: Let's Encrypt production; for staging or a private CA). "
                   "Its TLS is verified with the system roots or SSL_CERT_FILE.")
@click.option("--acme-ip-certs", is_flag=True,
              help="With an IP --hostname: a short-lived publicly trusted IP certificate (profile "
                   "'shortlived', HTTP-01 on --http-port).")
@click.option("--hostname", default="localhost", show_default=True,
              help="TLS hostname (names the cert files); may be an IP for a self-signed certificate.")
@click.option("--dev", is_flag=True, help="Development: plain HTTP on :3340, a fresh key each start.")
@click.option("--home", default="", help="Home page: '' built-in, 'blank', or an http(s):// URL to redirect to.")
@click.option("--derp/--no-derp", "derp_enabled", default=True, help="Serve the relay (off: /derp answers 404).")
@click.option("--metrics-addr", default=None, metavar="HOST:PORT",
              help="Serve Prometheus /metrics on a dedicated listener (on the relay port it answers loopback only).")
@click.option("--mesh-psk-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File with the 64-hex-digit mesh key; clients presenting it are mesh peers.")
@click.option("--mesh-with", default="", metavar="HOST[:PORT][/DIALHOST],...",
              help="Mesh peers of this region (may include this relay's own hostname, which is skipped).")
@click.option("--mesh-ca-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Trust this CA bundle (PEM) for mesh peers' TLS certificates, instead of the system roots.")
@click.option("--tcp-write-timeout", type=float, default=2.0, show_default=True,
              help="Seconds a write to a client may take before it is dropped; 0 = none.")
@click.option("--tcp-keepalive-time", type=float, default=600.0, show_default=True, help="TCP keepalive period, seconds.")
@click.option("--tcp-user-timeout", type=float, default=15.0, show_default=True,
              help="TCP_USER_TIMEOUT, seconds (Linux); 0 = kernel default.")
@click.option("--accept-connection-limit", type=float, default=float("inf"),
              help="New connections accepted per second (token bucket); the surplus is closed at once.")
@click.option("--accept-connection-burst", type=click.IntRange(1), default=1 << 30,
              help="Burst for --accept-connection-limit.")
@click.option("--max-connections-per-ip", type=click.IntRange(0), default=0,
              help="Open connections allowed from one source IP; 0 = unlimited.")
@click.option("--shutdown-grace", type=click.FloatRange(0), default=5.0, show_default=True,
              help="On SIGTERM: seconds to let queued packets drain after telling clients to reconnect.")
@click.option("--queue-depth", type=click.IntRange(1, 100000), default=32, show_default=True,
              help="Packets queued per client (and again for disco) before the oldest is dropped.")
@click.option("--coordinator", default=None, metavar="URL",
              help="Register this node with a derpd coordinator at URL and keep heartbeating.")
@click.option("--coordinator-token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="File holding the coordinator's shared registration token.")
@click.option("--region-id", type=click.IntRange(1), default=900, show_default=True, help="Region to register in.")
@click.option("--region-code", default=None, help="Short region code (when the coordinator does not know the region).")
@click.option("--region-name", default=None, help="Human region name (likewise).")
@click.option("--node-name", default=None, help="Unique node name in the map; default: the hostname.")
@click.option("--advertise-ipv4", default=None, metavar="IP", help="IPv4 to publish for this node (IPv4 field).")
@click.option("--advertise-ipv6", default=None, metavar="IP", help="IPv6 to publish for this node (IPv6 field).")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Relay processes sharing the port (SO_REUSEPORT), meshed with each other over loopback.")
@click.option("-v", "--verbose", count=True, help="-v: one line per notable event; -vv: debug lines per connection.")
@admission_options
def serve(**opts: object) -> None:
    """Run a DERP relay (drop-in for Tailscale's derper)."""
    _setup_logging(int(opts["verbose"]))  # type: ignore[call-overload]
    try:
        # admission and rate options (derpd.admission); _run_serve (or each worker) installs them
        options = dataclasses.replace(_serve_settings(opts), protection=Protection.from_options(opts))
    except (SettingsError, KeyFileError, KeyFormatError, ValueError) as e:
        _fail(str(e))
    try:
        if options.workers > 1:
            from .workers import run_workers

            sys.exit(run_workers(options, options.workers))
        trio.run(_run_serve, options)
    except KeyboardInterrupt:
        pass
    except SettingsError as e:  # includes CertError
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot listen: {e.strerror or e}; is another process using the port? Pick another with -a", 1)
    except BaseExceptionGroup as group:  # a start-up error raised inside the serve nursery
        while len(group.exceptions) == 1 and isinstance(group.exceptions[0], BaseExceptionGroup):
            group = group.exceptions[0]
        first = group.exceptions[0] if len(group.exceptions) == 1 else None
        if isinstance(first, SettingsError):
            _fail(str(first))
        raise


@dataclass(frozen=True)
class ServeOptions:
    settings: RelaySettings
    stun_port: int
    metrics_addr: str | None
    mesh_with: str = ""
    mesh_ca_file: str | None = None
    workers: int = 1
    verbose: int = 0
    registration: dict[str, object] | None = None  # --coordinator and friends
    acme: object | None = None  # derpd.acme.AcmeConfig for --certmode letsencrypt/gcp
    protection: Protection | None = None  # --allow-keys, --verify-client-url, --rate-config


def _serve_settings(opts: dict[str, object]) -> ServeOptions:
    dev = bool(opts["dev"])
    addr = str(opts["addr"])
    config = opts["config"]
    if dev:
        if addr == ":443":
            addr = ":3340"
        key = NodePrivate.generate()
    elif config is None:
        raise SettingsError("pass -c PATH for the relay's key file (it is created if missing), or use --dev")
    else:
        assert isinstance(config, Path)
        key, created = load_or_create(config)
        if created:
            logging.getLogger("derpd.startup").info("created key file %s", config)
    mesh_key = None
    if opts["mesh_psk_file"] is not None:
        path = opts["mesh_psk_file"]
        assert isinstance(path, Path)
        try:
            mesh_key = parse_mesh_key(path.read_text())
        except OSError as e:
            raise SettingsError(f"cannot read the mesh key file {path}: {e.strerror}") from e
        except KeyFormatError as e:
            raise SettingsError(f"{path}: the mesh key must be 64 hex digits ({e})") from e
    settings = RelaySettings(
        private_key=key,
        addr=addr,
        certmode=opts["certmode"],  # type: ignore[arg-type]
        certdir=opts["certdir"],  # type: ignore[arg-type]
        hostname=str(opts["hostname"]),
        http_port=int(opts["http_port"]),  # type: ignore[call-overload]
        home=str(opts["home"]),
        derp_enabled=bool(opts["derp_enabled"]),
        mesh_key=mesh_key,
        write_timeout=float(opts["tcp_write_timeout"]),  # type: ignore[arg-type]
        tcp_keepalive=float(opts["tcp_keepalive_time"]),  # type: ignore[arg-type]
        tcp_user_timeout=float(opts["tcp_user_timeout"]),  # type: ignore[arg-type]
        queue_depth=int(opts["queue_depth"]),  # type: ignore[call-overload]
        accept_connection_limit=float(opts["accept_connection_limit"]),  # type: ignore[arg-type]
        accept_connection_burst=int(opts["accept_connection_burst"]),  # type: ignore[call-overload]
        max_connections_per_ip=int(opts["max_connections_per_ip"]),  # type: ignore[call-overload]
        shutdown_grace=float(opts["shutdown_grace"]),  # type: ignore[arg-type]
    )
    if opts["mesh_with"] and mesh_key is None:
        raise SettingsError("--mesh-with needs the region's mesh key: pass --mesh-psk-file")
    metrics_addr = opts["metrics_addr"]
    if metrics_addr is not None:
        split_host_port(str(metrics_addr), default_port=9090)
    return ServeOptions(settings, int(opts["stun_port"]), metrics_addr,  # type: ignore[call-overload,arg-type]
                        str(opts["mesh_with"]), opts["mesh_ca_file"],  # type: ignore[arg-type]
                        int(opts["workers"]), int(opts["verbose"]),  # type: ignore[call-overload]
                        _registration(opts), _acme_config(opts, settings))


def _acme_config(opts: dict[str, object], settings: RelaySettings) -> object | None:
    """The ACME client's configuration for --certmode letsencrypt/gcp (derpd.acme), else None."""
    if not settings.acme:
        for flag in ("acme_ip_certs", "acme_eab_kid", "acme_eab_key", "acme_directory"):
            if opts.get(flag):
                raise SettingsError(f"--{flag.replace('_', '-')} is for --certmode letsencrypt or gcp")
        return None
    if int(opts["workers"]) > 1:  # type: ignore[call-overload]
        raise SettingsError("ACME with --workers > 1 is not supported yet: run one worker, or get the "
                            "certificate with an external ACME client and use --certmode manual")
    from .acme import AcmeConfig

    assert settings.certdir is not None and settings.effective_certmode is not None
    return AcmeConfig.from_options(
        certmode=settings.effective_certmode, hostname=settings.hostname, certdir=settings.certdir,
        http_port=settings.http_port, directory=opts["acme_directory"] or None,  # type: ignore[arg-type]
        email=str(opts["acme_email"] or ""), eab_kid=str(opts["acme_eab_kid"] or ""),
        eab_key=str(opts["acme_eab_key"] or ""), ip_certs=bool(opts["acme_ip_certs"]))


def _registration(opts: dict[str, object]) -> dict[str, object] | None:
    url = opts["coordinator"]
    if not url:
        return None
    token_file = opts["coordinator_token_file"]
    if token_file is None:
        raise SettingsError("--coordinator needs --coordinator-token-file (the coordinator's shared token)")
    assert isinstance(token_file, Path)
    try:
        token = token_file.read_text().strip()
    except OSError as e:
        raise SettingsError(f"cannot read {token_file}: {e.strerror}") from e
    if not token:
        raise SettingsError(f"{token_file} is empty; it must hold the coordinator's registration token")
    return {"url": url, "token": token, "region_id": opts["region_id"], "region_code": opts["region_code"],
            "region_name": opts["region_name"], "node_name": opts["node_name"],
            "ipv4": opts["advertise_ipv4"], "ipv6": opts["advertise_ipv6"]}


def node_registration(reg: dict[str, object], running: RunningRelay, settings: RelaySettings,
                      stun_port: int) -> dict[str, object]:
    """This node's DERPNode entry for the coordinator (tailcfg field names)."""
    node: dict[str, object] = {
        "Name": reg["node_name"] or settings.hostname,
        "RegionID": reg["region_id"],
        "HostName": settings.hostname,
        "PublicKey": str(running.public_key),
    }
    if running.port != 443:
        node["DERPPort"] = running.port
    if stun_port < 0:
        node["STUNPort"] = -1
    elif stun_port not in (0, 3478):
        node["STUNPort"] = stun_port
    server = running.server
    if server.cert is not None and (server.cert.self_signed_generated or (
            settings.certmode == "manual" and _is_ip(settings.hostname))):
        node["CertName"] = server.cert.pin  # a publicly trusted (ACME) certificate gets no pin
    for field, key in (("IPv4", "ipv4"), ("IPv6", "ipv6")):
        if reg[key]:
            node[field] = reg[key]
    host = settings.listen[0]
    if host and _is_ip(host) and host not in ("0.0.0.0", "::"):
        node.setdefault("IPv6" if ":" in host else "IPv4", host)
    for field, key in (("RegionCode", "region_code"), ("RegionName", "region_name")):
        if reg[key]:
            node[field] = reg[key]
    return node


async def _run_serve(options: ServeOptions) -> None:
    from .relay.server import serve_metrics, serve_relay

    settings, stun_port, metrics_addr = options.settings, options.stun_port, options.metrics_addr

    startup = logging.getLogger("derpd.startup")
    async with trio.open_nursery() as nursery:

        async def relay_then_stop(task_status: trio.TaskStatus[RunningRelay]) -> None:
            await serve_relay(settings, task_status=task_status)
            nursery.cancel_scope.cancel()  # after a graceful shutdown, stop STUN and the rest too

        running = await nursery.start(relay_then_stop)
        server = running.server
        if options.protection is not None:
            options.protection.install(server, nursery)
        scheme = "TLS" if settings.tls else "plain HTTP"
        startup.info("derpd %s: relay %s on %s (%s), key %s", __version__, running.derp_url,
                     ", ".join(f"{h}:{p}" for h, p in running.addresses), scheme, running.public_key)
        if options.acme is not None:
            from .acme import start_acme

            await start_acme(server, options.acme, nursery)  # type: ignore[arg-type]
        if not settings.tls:
            startup.warning("serving plain HTTP without TLS: fine for tests and behind a TLS proxy; "
                            "clients need TLS otherwise (port 443 gets Let's Encrypt, or see --certmode)")
        if server.cert is not None and server.cert.self_signed_generated or (
            server.cert is not None and settings.certmode == "manual" and _is_ip(settings.hostname)
        ):
            from .relay.tls import node_json_for_pinned_cert

            node = node_json_for_pinned_cert(settings.hostname, server.cert.pin, running.port, stun_port)
            startup.info("self-signed certificate; DERP map node: %s",
                         json.dumps(node, separators=(",", ":")))
            click.echo(json.dumps(node))
        if stun_port >= 0:
            from stund.server import serve_stun

            host = settings.listen[0] or "::"
            bound = await nursery.start(serve_stun, [(host, stun_port)])
            startup.info("STUN on %s", ", ".join(f"{h}:{p}" for h, p in bound))
        if running.http_port is not None:
            startup.info("plain HTTP (generate_204, redirects) on port %d", running.http_port)
        if options.mesh_with:
            from .client import make_ssl_context
            from .mesh import parse_mesh_with, run_mesh

            assert settings.mesh_key is not None
            ctx = make_ssl_context(ca_file=options.mesh_ca_file) if options.mesh_ca_file else None
            peers = await nursery.start(partial(run_mesh, server, parse_mesh_with(options.mesh_with),
                                                settings.mesh_key, own_hostname=settings.hostname,
                                                ssl_context=ctx))
            startup.info("meshing with %s", ", ".join(p.target.host for p in peers) or "nobody")
        if options.registration is not None:
            from .coordinator.announce import announce_forever

            reg = options.registration
            node = node_registration(reg, running, settings, stun_port)
            await nursery.start(partial(announce_forever, str(reg["url"]), str(reg["token"]), node))
        if metrics_addr is not None:
            bound_metrics = await nursery.start(serve_metrics, metrics_addr, server.metrics_text)
            startup.info("metrics on http://%s:%d/metrics", *bound_metrics)
        await _handle_signals(running, settings, nursery.cancel_scope)


async def _handle_signals(running: RunningRelay, settings: RelaySettings, scope: trio.CancelScope) -> None:
    """SIGHUP reloads (certificates, allow-lists, rate limits); SIGTERM/SIGINT shut down
    gracefully (Restarting to every client, then drain); a second one stops at once."""
    startup = logging.getLogger("derpd.startup")
    stopping_since: float | None = None
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                startup.info("received SIGHUP, reloading")
                running.server.reload()
            elif stopping_since is None or trio.current_time() - stopping_since < 1.0:
                # A repeat within a second is the same stop reaching us twice (a process group
                # signal plus the --workers parent forwarding it), not an operator's second one.
                if stopping_since is not None:
                    continue
                stopping_since = trio.current_time()
                startup.info("received %s: telling clients to reconnect, draining for up to %.1fs "
                             "(send it again to stop at once)", name, settings.shutdown_grace)
                running.shutdown(settings.shutdown_grace)
            else:
                startup.info("received %s again, stopping now", name)
                scope.cancel()
                return


def _is_ip(text: str) -> bool:
    from .settings import is_ip

    return is_ip(text)


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
@click.option("--size", type=click.IntRange(12, 65536), default=256, show_default=True, help="Packet size in bytes.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds for login and for the run.")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Trust this CA bundle (PEM) instead of the system roots.")
@click.option("--cert-pin", default=None, metavar="sha256-raw:HEX", help="Accept only this certificate (DERP map CertName).")
@click.option("--insecure", is_flag=True, help="Skip TLS verification (tests only).")
@click.option("--server-name", default=None, help="TLS SNI / verified name, if not the URL host.")
def check(url: str, count: int, size: int, timeout: float, ca_file: str | None, cert_pin: str | None,
          insecure: bool, server_name: str | None) -> None:
    """Log two clients in to URL, relay packets both ways, print loss and RTT; exit 1 on failure.

    URL is the relay's DERP URL, e.g. https://derp.example.com/derp or http://127.0.0.1:3340/derp.
    """
    from .check import run_check
    from .client import DerpClientError, make_ssl_context

    options: dict[str, object] = {"server_name": server_name, "cert_pin": cert_pin, "insecure": insecure}
    if ca_file:
        options["ssl_context"] = make_ssl_context(ca_file=ca_file)
    if "://" not in url:
        url = f"https://{url}/derp"
    try:
        result = trio.run(lambda: run_check(url, count=count, size=size, timeout=timeout, **options))
    except (DerpClientError, OSError, trio.TooSlowError, trio.BrokenResourceError) as e:
        _fail(f"cannot log in to {url}: {e or type(e).__name__}", 1)
    p50, p99 = result.percentile(50), result.percentile(99)
    ms = lambda v: "n/a" if v is None else f"{v * 1000:.2f}ms"  # noqa: E731
    click.echo(f"{url}: delivered {result.delivered}/{result.sent}, lost {result.lost}, "
               f"corrupted {result.corrupted}, rtt p50 {ms(p50)} p99 {ms(p99)}, ping {ms(result.ping_rtt)}")
    if result.lost or result.corrupted or result.sent != count:
        sys.exit(1)


from .coordinator.cli import coordinator_command  # noqa: E402
from .devregion import dev_command  # noqa: E402

main.add_command(coordinator_command, "coordinator")
main.add_command(dev_command, "dev")


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
    from .client import DerpClientError, make_ssl_context
    from .keys import NodePublic
    from .mesh import close_peer

    try:
        target = NodePublic.parse(nodekey)
        mesh_key = parse_mesh_key(mesh_psk_file.read_text())
    except (KeyFormatError, OSError) as e:
        _fail(f"{e}; NODEKEY is nodekey:<64 hex> and the mesh key file holds 64 hex digits")
    options: dict[str, object] = {"cert_pin": cert_pin}
    if ca_file:
        options["ssl_context"] = make_ssl_context(ca_file=ca_file)
    try:
        trio.run(partial(close_peer, url, target, mesh_key, **options))
    except (DerpClientError, OSError, trio.TooSlowError, trio.BrokenResourceError) as e:
        _fail(f"cannot reach {url}: {e}", 1)
    click.echo(f"asked {url} to close {target}")
