"""A running node: ``ServeOptions`` (built once from ``derpd serve``'s flags) turned into a relay
with STUN, mesh links, admission checks, coordinator registration and signal handling.

``run_serve(options)`` runs one process; ``derpd.workers`` runs the same pieces in each worker.

Dependencies: ``derpd.cli`` and ``derpd.workers`` import this module; it imports the layers
below (``derpd.relay``, ``derpd.mesh``, ``derpd.admission``, ``derpd.coordinator.announce``,
``stund.server``) and never ``derpd.cli`` or ``derpd.workers``.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, ContextManager
from urllib.parse import urlsplit

import trio
from stund.oneline import format_addr, listen_error

from . import __version__
from .accel import data_plane
from .derperflags import cert_settings, default_key_file, default_mesh_psk_file
from .keyfile import load_or_create
from .keys import KeyFormatError, NodePrivate, parse_mesh_key
from .logsetup import per_request_logs
from .mesh import parse_mesh_with, run_mesh
from .relay.listener import BindError, RunningRelay, serve_metrics, serve_relay
from .relay.server import RelayServer
from .settings import RelaySettings, SettingsError, is_ip, parse_networks, split_host_port, split_listen_addr

if TYPE_CHECKING:
    from .acme import AcmeConfig
    from .coordinator.announce import Announcer
    from .admission import Protection
    from .relay.tls import ServerCert


# The flag that moves each listener of ``derpd serve`` (``BindError.which``).
LISTEN_FLAGS = {"relay": "-a", "http": "--http-port (-1 turns it off)", "stun": "--stun-port (-1 turns it off)",
                "metrics": "--metrics-addr"}


def bind_error_message(e: BindError, flags: dict[str, str] = LISTEN_FLAGS) -> str:
    """One line for a listener of ``derpd serve`` that cannot bind, naming the flag to change."""
    return listen_error(e.cause, format_addr(e.host, e.port), flags[e.which])


def setup_logging(verbose: int) -> None:
    """Quiet by default (warnings and the start-up lines); -v adds events, -vv debug lines."""
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("derpd.startup").setLevel(logging.INFO)
    per_request_logs(verbose)  # httpx's line per request: -vv only


@dataclass(frozen=True)
class ServeOptions:
    settings: RelaySettings
    stun_port: int
    metrics_addr: str | None
    mesh_with: str = ""
    mesh_ca_file: str | None = None
    workers: int = 1
    verbose: int = 0
    region_id: int = 900  # --region-id and --node-name: the printed node, and the registration
    node_name: str | None = None
    registration: dict[str, object] | None = None  # --coordinator and friends
    protection: Protection | None = None  # --allow-keys, --verify-client-url, --rate-config
    acme: AcmeConfig | None = None  # --certmode letsencrypt/gcp (derpd.acme)
    bootstrap_dns: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())  # published, unpublished names


def install_bootstrap_dns(options: ServeOptions, server: RelayServer, nursery: trio.Nursery) -> None:
    """``--bootstrap-dns-names`` / ``--unpublished-bootstrap-dns-names``: resolve in the
    background (now and every 10 minutes) and answer ``/bootstrap-dns`` from memory."""
    published, unpublished = options.bootstrap_dns
    if published or unpublished:
        from .bootstrapdns import BootstrapDNS

        names = BootstrapDNS(published, unpublished)
        server.bootstrap_dns = names.answer
        server.metrics_registry.register(names)  # type: ignore[arg-type]
        nursery.start_soon(names.run)


def install_cert_pin_check(options: ServeOptions, server: RelayServer) -> None:
    """``derp_tls_cert_pinned``: the served certificate is pinned in the DERP map exactly when
    the node this relay prints and registers carries a ``sha256-raw:`` CertName."""
    settings = options.settings
    server.cert_pinned = lambda: (server.cert is not None and not settings.acme
                                  and needs_pin(server.cert, settings.hostname))


def options_from_flags(opts: dict[str, object]) -> ServeOptions:
    """Build ``ServeOptions`` from the parsed ``derpd serve`` flags (click's keyword names),
    reading the key file, the mesh key and the coordinator token.

    Raises:
        SettingsError: a value is invalid or a file cannot be read (the message says what to do).
        KeyFileError, KeyFormatError: the key file is unusable.
    """
    dev = bool(opts["dev"])
    addr = str(opts["addr"])
    config = opts["config"]
    hostname = str(opts["hostname"])
    startup = logging.getLogger("derpd.startup")
    split_listen_addr(addr)  # a bad -a fails here, before a key file is written (no port: refused, as derper)
    if dev:
        if addr == ":443":
            addr = ":3340"
        if hostname == "derp.tailscale.com":  # derper's default names Tailscale's own relays
            hostname = "localhost"
        key = NodePrivate.generate()
    else:
        if config is None:
            config = default_key_file()
            if config is None:
                raise SettingsError("pass -c PATH for the relay's key file (it is created if missing), or use --dev")
            startup.info("no -c given; using %s (as derper does when run as root)", config)
        assert isinstance(config, Path)
        key, created = load_or_create(config)
        if created:
            startup.info("created key file %s", config)
    certdir = opts["certdir"]
    assert certdir is None or isinstance(certdir, Path)
    certmode, certdir = cert_settings(str(opts["certmode"]), certdir, split_host_port(addr)[1])
    mesh_key = None
    mesh_file = opts["mesh_psk_file"] if opts["mesh_psk_file"] is not None or dev else default_mesh_psk_file()
    if dev and os.environ.get("TAILSCALE_DERPER_MESH_KEY"):  # derper's dev-mode mesh key
        mesh_file = None
        try:
            mesh_key = parse_mesh_key(os.environ["TAILSCALE_DERPER_MESH_KEY"])
        except KeyFormatError as e:
            raise SettingsError(f"TAILSCALE_DERPER_MESH_KEY must be 64 hex digits ({e})") from e
    if mesh_file is not None:
        path = mesh_file
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
        certmode=certmode,
        certdir=certdir,
        hostname=hostname,
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
        drain_grace=float(opts.get("drain_grace", 30.0)),  # type: ignore[arg-type]
        debug_allow=parse_networks("--debug-allow", str(opts.get("debug_allow") or "")),
        proxy_protocol=bool(opts.get("proxy_protocol", False)),
        trusted_proxies=tuple(c.strip() for c in str(opts.get("trusted_proxies") or "").split(",") if c.strip()),
    )
    if opts["mesh_with"]:
        parse_mesh_with(str(opts["mesh_with"]))  # a bad entry fails here, before anything listens
        if mesh_key is None:
            raise SettingsError("--mesh-with needs the region's mesh key: pass --mesh-psk-file")
    metrics_addr = opts["metrics_addr"]
    if metrics_addr is not None:
        split_host_port(str(metrics_addr), default_port=9090)
    stun_port = int(opts["stun_port"]) if opts["stun"] else -1  # type: ignore[call-overload]
    registration = registration_from_flags(opts)
    bootstrap_dns, acme = bootstrap_dns_from_flags(opts), acme_from_flags(opts, settings)
    if mesh_file is not None:  # after every check: a config error stays one line
        startup.info("mesh key from %s%s", mesh_file, "" if opts["mesh_psk_file"] is not None else
                     " (derper's default path; --mesh-psk-file names another)")
    return ServeOptions(settings, stun_port, metrics_addr,  # type: ignore[arg-type]
                        str(opts["mesh_with"]), opts["mesh_ca_file"],  # type: ignore[arg-type]
                        int(opts["workers"]), int(opts["verbose"]),  # type: ignore[call-overload]
                        int(opts["region_id"]), opts["node_name"],  # type: ignore[call-overload,arg-type]
                        registration, bootstrap_dns=bootstrap_dns, acme=acme)


def bootstrap_dns_from_flags(opts: dict[str, object]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    from .bootstrapdns import parse_names

    return (parse_names("--bootstrap-dns-names", str(opts.get("bootstrap_dns_names") or "")),
            parse_names("--unpublished-bootstrap-dns-names", str(opts.get("unpublished_bootstrap_dns_names") or "")))


def acme_from_flags(opts: dict[str, object], settings: RelaySettings) -> AcmeConfig | None:
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
        http_port=settings.http_port, directory=opts.get("acme_directory") or None,  # type: ignore[arg-type]
        email=str(opts.get("acme_email") or ""), eab_kid=str(opts.get("acme_eab_kid") or ""),
        eab_key=str(opts.get("acme_eab_key") or ""), ip_certs=bool(opts.get("acme_ip_certs")))


def protection_from_flags(opts: dict[str, object]) -> Protection:
    """The admission and rate settings of ``derpd serve``'s flags (``--allow-keys``,
    ``--verify-client-url``, ``--rate-config``, and ``--verify-clients [--socket]``, whose
    LocalAPI check comes from ``derpd.localapi``, a layer above ``derpd.admission``).

    Raises:
        SettingsError: an unreadable or malformed file, or a bad URL.
    """
    from .admission import Protection

    protection = Protection.from_options(opts)
    if opts.get("verify_clients"):
        from .localapi import tailscaled_verifier

        verifier = tailscaled_verifier(str(opts.get("socket") or "") or None)
        protection = dataclasses.replace(protection, tailscaled=verifier)
    return protection


def registration_from_flags(opts: dict[str, object]) -> dict[str, object] | None:
    """The ``--coordinator`` settings, or None without ``--coordinator``."""
    for flag, key, version in (("--advertise-ipv4", "advertise_ipv4", 4), ("--advertise-ipv6", "advertise_ipv6", 6)):
        value = opts[key]
        if value is not None and not (is_ip(str(value)) and ipaddress.ip_address(str(value)).version == version):
            raise SettingsError(f"{flag} {value!r} is not an IPv{version} address")
    url = opts["coordinator"]
    if not url:
        return None
    if opts.get("hostname") == "derp.tailscale.com" and not opts.get("dev"):  # derper's default, not a choice
        raise SettingsError("--coordinator needs --hostname: the name (or IP) clients reach this relay at")
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
    value = opts.get("heartbeat_interval")
    interval = 15.0 if value is None else float(value)  # type: ignore[arg-type]
    if not 1.0 <= interval <= 3600:
        raise SettingsError(f"--heartbeat-interval {interval:g}s: give a duration from 1s to 1h, e.g. 15s")
    from .coordinator.announce import split_coordinator_urls

    try:
        urls = split_coordinator_urls(str(url))
    except ValueError as e:
        raise SettingsError(str(e)) from None
    if not urls:
        raise SettingsError("--coordinator needs at least one URL, e.g. http://coordinator:8080")
    for one in urls:
        try:
            host = urlsplit(one).hostname
            urlsplit(one).port
        except ValueError:
            raise SettingsError(f"--coordinator {one!r}: the port must be a number from 1 to 65535") from None
        if not host:
            raise SettingsError(f"--coordinator {one!r} has no host; give http(s)://HOST[:PORT]")
    return {"url": urls, "token": token, "region_id": opts["region_id"], "region_code": opts["region_code"],
            "region_name": opts["region_name"], "node_name": opts["node_name"],
            "ipv4": opts["advertise_ipv4"], "ipv6": opts["advertise_ipv6"], "interval": interval}


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
    if server.cert is not None and not settings.acme and needs_pin(server.cert, settings.hostname):
        node["CertName"] = server.cert.pin  # an ACME certificate is publicly trusted: no pin
    for field, key in (("IPv4", "ipv4"), ("IPv6", "ipv6")):
        if reg[key]:
            node[field] = reg[key]
    host = settings.listen[0]
    if host and is_ip(host) and host not in ("0.0.0.0", "::"):
        node.setdefault("IPv6" if ":" in host else "IPv4", host)
    for field, key in (("RegionCode", "region_code"), ("RegionName", "region_name")):
        if reg[key]:
            node[field] = reg[key]
    return node


def needs_pin(cert: ServerCert, hostname: str) -> bool:
    """A certificate we generated, or one that does not chain to a trusted root for the
    hostname, is published with its ``sha256-raw:`` pin; a CA-signed one (for a DNS name or
    an IP) is checked by clients as usual and gets no pin."""
    if cert.self_signed_generated:
        return True
    return not _chain_trusted(str(cert.cert_path), str(cert.key_path), cert.pin, hostname)


@functools.lru_cache(maxsize=8)
def _chain_trusted(cert_path: str, key_path: str, pin: str, hostname: str) -> bool:
    """Cached per certificate (its pin), so heartbeats do not read the CA bundle each time."""
    from .coordinator.announce import certificate_is_trusted

    return certificate_is_trusted(Path(cert_path), Path(key_path), hostname)


async def run_serve(options: ServeOptions) -> None:
    """Run one relay process until a signal stops it (see ``handle_signals``).

    Every listener (relay, plain HTTP, STUN, metrics) is bound before anything is printed, so
    a port in use ends start-up with that one error line and nothing else.

    Raises:
        BindError: a listener cannot bind (``which`` names it).
        SettingsError: the certificate cannot be used (CertError).
    """
    with open_signals() as signals:
        await _serve_node(options, signals)


async def _serve_node(options: ServeOptions, signals: AsyncIterator[int]) -> None:
    settings, stun_port, metrics_addr = options.settings, options.stun_port, options.metrics_addr
    startup = logging.getLogger("derpd.startup")
    async with trio.open_nursery() as nursery:

        async def relay_then_stop(task_status: trio.TaskStatus[RunningRelay]) -> None:
            await serve_relay(settings, task_status=task_status)
            nursery.cancel_scope.cancel()  # after a graceful shutdown, stop STUN and the rest too

        running = await nursery.start(relay_then_stop)
        server = running.server
        install_cert_pin_check(options, server)
        stun_bound = await start_stun(nursery, settings, stun_port)
        if stun_bound:
            stun_port = stun_bound[0][1]  # the port bound, also for --stun-port 0
        bound_metrics = None
        if metrics_addr is not None:
            bound_metrics = await nursery.start(serve_metrics, metrics_addr, server.metrics_text)
        if options.protection is not None:
            options.protection.install(server, nursery)
        install_bootstrap_dns(options, server, nursery)
        announce_node(options, running, stun_port)
        if options.acme is not None:
            from .acme import start_acme

            await start_acme(server, options.acme, nursery)
        if stun_bound:
            startup.info("STUN on %s", ", ".join(f"{h}:{p}" for h, p in stun_bound))
        if running.http_port is not None:
            startup.info("plain HTTP (generate_204, redirects) on port %d", running.http_port)
        if bound_metrics is not None:
            startup.info("metrics on http://%s:%d/metrics", *bound_metrics)
        if options.mesh_with:
            from .client import make_ssl_context

            assert settings.mesh_key is not None
            ctx = make_ssl_context(ca_file=options.mesh_ca_file) if options.mesh_ca_file else None
            peers = await nursery.start(partial(run_mesh, server, parse_mesh_with(options.mesh_with),
                                                settings.mesh_key, own_hostname=settings.hostname,
                                                ssl_context=ctx))
            startup.info("meshing with %s", ", ".join(p.target.host for p in peers) or "nobody")
        announcer = None
        if options.registration is not None:
            from .coordinator.announce import Announcer

            reg = options.registration
            announcer = Announcer(reg["url"], str(reg["token"]),  # type: ignore[arg-type]
                                  partial(node_registration, reg, running, settings, stun_port),
                                  interval=float(reg.get("interval", 15.0)))  # type: ignore[arg-type]
            server.cert_hooks.append(announcer.notify)  # a new pin goes out at once, not at the next heartbeat
            nursery.start_soon(announcer.run)  # never holds up the relay's start
        await handle_signals(signals, running, settings, nursery.cancel_scope, announcer,
                             registered=options.registration is not None)


async def start_stun(nursery: trio.Nursery, settings: RelaySettings, port: int) -> list[tuple[str, int]]:
    """Start STUN on ``port`` (``--stun-port``; -1: none) of the relay's IP.  Returns the bound
    addresses (empty without STUN).

    Raises:
        BindError: the port cannot be bound (``which`` is "stun").
    """
    if port < 0:
        return []
    from stund.server import serve_stun

    host = settings.listen[0] or "::"
    try:
        return await nursery.start(serve_stun, [(host, port)])  # type: ignore[no-any-return]
    except OSError as e:
        raise BindError(e, host, port, "stun") from e


def announce_node(options: ServeOptions, running: RunningRelay, stun_port: int) -> None:
    """The start-up lines: what listens where; with a self-signed or IP certificate, also the
    DERP-map node to paste (one JSON line on stdout).  ``stun_port`` is the bound port."""
    settings, server = options.settings, running.server
    startup = logging.getLogger("derpd.startup")
    scheme = "TLS" if settings.tls else "plain HTTP"
    startup.info("derpd %s: relay %s on %s (%s), key %s", __version__, running.derp_url,
                 ", ".join(f"{h}:{p}" for h, p in running.addresses), scheme, running.public_key)
    startup.info("data plane: %s", data_plane())
    if not settings.tls:
        startup.warning("serving plain HTTP without TLS: fine for tests and behind a TLS proxy; "
                        "clients need TLS otherwise (port 443 gets Let's Encrypt, or see --certmode)")
    if server.cert is not None and not settings.acme and (server.cert.self_signed_generated or (
        settings.certmode == "manual" and is_ip(settings.hostname)
    )) and needs_pin(server.cert, settings.hostname):
        from .relay.tls import node_json_for_pinned_cert

        node = node_json_for_pinned_cert(settings.hostname, server.cert.pin, running.port, stun_port,
                                         name=options.node_name or "custom", region_id=options.region_id)
        kind = "self-signed" if server.cert.self_signed_generated else "not trusted by the system roots"
        startup.info("%s certificate, clients need its pin; DERP map node: %s", kind,
                     json.dumps(node, separators=(",", ":")))
        print(json.dumps(node), flush=True)


def open_signals() -> ContextManager[AsyncIterator[int]]:
    """The signals a relay process handles (SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2), caught
    from here on: open it before binding, so a signal that arrives during start-up is handled,
    not fatal."""
    from .drain import HANDLED_SIGNALS

    return trio.open_signal_receiver(*HANDLED_SIGNALS)


async def handle_signals(signals: AsyncIterator[int], running: RunningRelay, settings: RelaySettings,
                         scope: trio.CancelScope, announcer: Announcer | None = None, *,
                         registered: bool = False) -> None:
    """SIGHUP reloads (certificates, allow-lists, rate limits); SIGTERM/SIGINT drain (with a
    coordinator, for ``--drain-grace``) and shut down gracefully (Restarting to every client,
    then queues drain); a second one stops at once; SIGUSR1 drains without stopping, SIGUSR2
    ends that drain (see ``derpd.drain``).  ``signals`` comes from ``open_signals``."""
    from .drain import Maintenance

    await Maintenance(running, settings, scope, announcer, registered=registered).handle(signals)


__all__ = ["LISTEN_FLAGS", "ServeOptions", "announce_node", "bind_error_message", "handle_signals",
           "install_cert_pin_check", "needs_pin",
           "node_registration", "open_signals", "options_from_flags", "start_stun",
           "registration_from_flags", "run_serve", "setup_logging"]
