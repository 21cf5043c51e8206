"""A node: ``NodeSettings`` assembled into a running relay with STUN, a metrics listener,
admission checks, bootstrap DNS, ACME, mesh links and its registration with coordinators.

This is the one assembly.  Every kind of process builds its node from the same two steps:

* ``start_relay``: the relay, and what runs inside it (admission checks and rate limits,
  bootstrap DNS, the certificate-pin gauge).  The single process, each ``--workers`` worker
  and ``derpd dev`` serve their relay with it.
* ``start_node``: what a node has once, whoever serves its relay: STUN and the metrics
  listener, then the relay (``start_relay``, or the workers ``derpd.workers`` starts), the
  start-up lines, ACME, the ``--mesh-with`` links and the ``Announcer`` that registers the node.
  The single process, the workers' parent and ``derpd dev`` run it.

``prepare`` builds, before any event loop runs, the parts that can still refuse a setting
(the admission files, the ACME configuration): the command line calls it, so that such an
error is one line before anything listens, and each worker calls it for its own copy (the
checks hold trio objects, which do not cross processes; the settings do).

``run_node`` is the single process: ``start_node`` and the signal handling of ``derpd.drain``.

Dependencies: the command line (``derpd.cli``), ``derpd.workers`` and ``derpd.devregion``
import this module; it imports the layers below (``derpd.relay``, ``derpd.mesh``,
``derpd.admission``, ``derpd.localapi``, ``derpd.acme``, ``derpd.bootstrapdns``,
``derpd.coordinator.announce``, ``derpd.drain``, ``stund.server``) and never the command line.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, ContextManager

import trio
from stund.oneline import format_addr, listen_error

from . import __version__
from .accel import data_plane
from .logsetup import per_request_logs
from .relay.listener import BindError, RunningRelay, serve_metrics, serve_relay
from .settings import AdmissionSettings, NodeSettings, RelaySettings, is_ip

if TYPE_CHECKING:
    from .acme import AcmeConfig
    from .admission import Protection
    from .coordinator.announce import Announcer
    from .relay.server import RelayServer
    from .relay.tls import ServerCert

startup = logging.getLogger("derpd.startup")

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
    startup.setLevel(logging.INFO)
    per_request_logs(verbose)  # httpx's line per request: -vv only


# ---------------------------------------------------------------------------- before the event loop


@dataclass(frozen=True)
class NodeParts:
    """What a process builds from its ``NodeSettings`` before it listens (``prepare``)."""

    protection: Protection | None = None  # admission checks and rate limits; None: none at all
    acme: AcmeConfig | None = None  # --certmode letsencrypt/gcp with TLS


def load_protection(settings: AdmissionSettings) -> Protection:
    """The admission checks and rate limits (``derpd.admission``), with ``--verify-clients``'
    check from ``derpd.localapi`` (a layer above ``derpd.admission``).

    Raises:
        SettingsError: an unreadable or malformed file, or a bad URL.
    """
    from .admission import Protection

    protection = Protection.from_settings(settings)
    if settings.verify_clients:
        from .localapi import tailscaled_verifier

        protection = dataclasses.replace(protection, tailscaled=tailscaled_verifier(settings.socket or None))
    return protection


def acme_config(settings: NodeSettings) -> AcmeConfig | None:
    """The ACME client's configuration for --certmode letsencrypt/gcp (``derpd.acme``), else None.

    Raises:
        SettingsError: the ACME flags do not fit (one line that says what to change).
    """
    relay = settings.relay
    if not relay.acme:
        return None
    from .acme import AcmeConfig

    assert relay.certdir is not None and relay.effective_certmode is not None
    acme = settings.acme
    return AcmeConfig.from_options(
        certmode=relay.effective_certmode, hostname=relay.hostname, certdir=relay.certdir,
        http_port=relay.http_port, directory=acme.directory or None, email=acme.email, eab_kid=acme.eab_kid,
        eab_key=acme.eab_key, ip_certs=acme.ip_certs)


def prepare(settings: NodeSettings) -> NodeParts:
    """Build the parts of a node that read files or can refuse a setting (see the module docstring).

    Raises:
        SettingsError: one line that says what to change.
    """
    acme = acme_config(settings)
    return NodeParts(load_protection(settings.admission), acme)


# ---------------------------------------------------------------------------- the relay


def install_cert_pin_check(settings: RelaySettings, server: RelayServer) -> None:
    """``derp_tls_cert_pinned``: the served certificate is pinned in the DERP map exactly when
    the node this relay prints and registers carries a ``sha256-raw:`` CertName."""
    server.cert_pinned = lambda: (server.cert is not None and not settings.acme
                                  and needs_pin(server.cert, settings.hostname))


def install_bootstrap_dns(settings: NodeSettings, server: RelayServer, nursery: trio.Nursery) -> None:
    """``--bootstrap-dns-names`` / ``--unpublished-bootstrap-dns-names``: resolve in the
    background (now and every 10 minutes) and answer ``/bootstrap-dns`` from memory."""
    names = settings.bootstrap_dns
    if names.published or names.unpublished:
        from .bootstrapdns import BootstrapDNS

        dns = BootstrapDNS(names.published, names.unpublished)
        server.bootstrap_dns = dns.answer
        server.metrics_registry.register(dns)  # type: ignore[arg-type]
        nursery.start_soon(dns.run)


async def start_relay(nursery: trio.Nursery, settings: NodeSettings, parts: NodeParts, *,
                      sockets: list[socket.socket] | None = None,
                      internal_sockets: list[socket.socket] | None = None) -> RunningRelay:
    """Serve the relay of ``settings`` in ``nursery`` (on ``sockets`` when given: a worker's
    share of the port) with its admission checks, rate limits, bootstrap DNS and pin gauge.
    When the relay has shut down gracefully (``derpd.drain``), the nursery is cancelled: STUN
    and the rest stop with it.

    Raises:
        BindError: a listener cannot bind (``which`` names it).
        SettingsError: the certificate cannot be used (CertError).
    """

    async def relay_then_stop(task_status: trio.TaskStatus[RunningRelay]) -> None:
        await serve_relay(settings.relay, sockets=sockets, internal_sockets=internal_sockets,
                          task_status=task_status)
        nursery.cancel_scope.cancel()

    running: RunningRelay = await nursery.start(relay_then_stop)
    install_cert_pin_check(settings.relay, running.server)
    if parts.protection is not None:
        parts.protection.install(running.server, nursery)
    install_bootstrap_dns(settings, running.server, nursery)
    return running


# ---------------------------------------------------------------------------- the node


@dataclass
class RunningNode:
    """What ``start_node`` reports once everything listens."""

    relay: RunningRelay
    stun: list[tuple[str, int]]  # the STUN addresses bound (none without STUN)
    stun_port: int  # the STUN port the node publishes: the one bound, or -1
    metrics: tuple[str, int] | None  # the --metrics-addr listener bound
    announcer: Announcer | None  # the registration with --coordinator


#: Starts a relay served elsewhere (``derpd.workers``: by the workers) and returns it, with a
#: start-up line that says how it runs (or None).
RelayStarter = Callable[[trio.Nursery], Awaitable[tuple[RunningRelay, str | None]]]


async def start_stun(nursery: trio.Nursery, settings: NodeSettings) -> list[tuple[str, int]]:
    """Start STUN on ``--stun-port`` of the relay's IP (-1: none).  Returns the bound addresses.

    Raises:
        BindError: the port cannot be bound (``which`` is "stun").
    """
    port = settings.stun.port
    if port < 0:
        return []
    from stund.server import serve_stun

    host = settings.relay.listen[0] or "::"
    try:
        bound: list[tuple[str, int]] = await nursery.start(serve_stun, [(host, port)])
    except OSError as e:
        raise BindError(e, host, port, "stun") from e
    return bound


async def start_node(nursery: trio.Nursery, settings: NodeSettings, parts: NodeParts, *,
                     relay: RelayStarter | None = None, metrics: Callable[[], bytes] | None = None) -> RunningNode:
    """Start the node of ``settings`` in ``nursery``: its relay (``start_relay``, or ``relay``
    when another process serves it), STUN, the metrics listener (rendering ``metrics``, by
    default the relay's own), then print the start-up lines and start ACME, the mesh links and
    the registration.  Every listener is bound before anything is printed, so a port in use
    ends start-up with that one error line and nothing else.  A relay this process serves
    starts first; one served elsewhere last, after the cheaper listeners.

    Raises:
        BindError: a listener cannot bind (``which`` names it).
        SettingsError: the certificate cannot be used (CertError).
    """
    note = None
    if relay is None:
        running = await start_relay(nursery, settings, parts)
        metrics = metrics or running.server.metrics_text
    stun = await start_stun(nursery, settings)
    stun_port = stun[0][1] if stun else settings.stun.port  # the port bound, also for --stun-port 0
    bound_metrics = None
    if settings.metrics.addr is not None:
        assert metrics is not None, "a relay served elsewhere needs its metrics renderer"
        bound_metrics = await nursery.start(serve_metrics, settings.metrics.addr, metrics)
    if relay is not None:
        running, note = await relay(nursery)
    log_startup(settings, running, stun_port)
    if note:
        startup.info("%s", note)
    if parts.acme is not None:
        from .acme import start_acme

        await start_acme(running.server, parts.acme, nursery)
    if stun:
        startup.info("STUN on %s", ", ".join(f"{h}:{p}" for h, p in stun))
    if running.http_port is not None:
        startup.info("plain HTTP (generate_204, redirects) on port %d", running.http_port)
    if bound_metrics is not None:
        startup.info("metrics on http://%s:%d/metrics", *bound_metrics)
    if settings.mesh.peers:
        await start_mesh(nursery, settings, running.server)
    return RunningNode(running, stun, stun_port, bound_metrics, start_announcer(nursery, settings, running, stun_port))


async def start_mesh(nursery: trio.Nursery, settings: NodeSettings, server: RelayServer) -> None:
    """``--mesh-with``: a mesh link to every other node of the region."""
    from .mesh import parse_mesh_with, run_mesh

    assert settings.relay.mesh_key is not None
    ctx = None
    if settings.mesh.ca_file:
        from .client import make_ssl_context

        ctx = make_ssl_context(ca_file=settings.mesh.ca_file)
    peers = await nursery.start(partial(run_mesh, server, parse_mesh_with(",".join(settings.mesh.peers)),
                                        settings.relay.mesh_key, own_hostname=settings.relay.hostname,
                                        ssl_context=ctx))
    startup.info("meshing with %s", ", ".join(p.target.host for p in peers) or "nobody")


def start_announcer(nursery: trio.Nursery, settings: NodeSettings, running: RunningRelay,
                    stun_port: int) -> Announcer | None:
    """``--coordinator``: register this node with every coordinator and keep it registered;
    a new certificate (a new pin) goes out at once, not at the next heartbeat.  Never holds up
    the relay's start.  Returns None without ``--coordinator``."""
    if settings.announce is None:
        return None
    from .coordinator.announce import Announcer

    announce = settings.announce
    announcer = Announcer(announce.coordinators, announce.token,
                          partial(node_registration, settings, running, stun_port), interval=announce.interval)
    running.server.cert_hooks.append(announcer.notify)
    nursery.start_soon(announcer.run)
    return announcer


def node_registration(settings: NodeSettings, running: RunningRelay, stun_port: int) -> dict[str, object]:
    """This node's DERPNode entry for the coordinator (tailcfg field names)."""
    relay, entry = settings.relay, settings.map_node
    node: dict[str, object] = {
        "Name": entry.node_name or relay.hostname,
        "RegionID": entry.region_id,
        "HostName": relay.hostname,
        "PublicKey": str(running.public_key),
    }
    if running.port != 443:
        node["DERPPort"] = running.port
    if stun_port < 0:
        node["STUNPort"] = -1
    elif stun_port not in (0, 3478):
        node["STUNPort"] = stun_port
    server = running.server
    if server.cert is not None and not relay.acme and needs_pin(server.cert, relay.hostname):
        node["CertName"] = server.cert.pin  # an ACME certificate is publicly trusted: no pin
    for field, value in (("IPv4", entry.ipv4), ("IPv6", entry.ipv6)):
        if value:
            node[field] = value
    host = relay.listen[0]
    if host and is_ip(host) and host not in ("0.0.0.0", "::"):
        node.setdefault("IPv6" if ":" in host else "IPv4", host)
    for field, value in (("RegionCode", entry.region_code), ("RegionName", entry.region_name)):
        if value:
            node[field] = value
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


def log_startup(settings: NodeSettings, running: RunningRelay, stun_port: int) -> None:
    """The start-up lines: where the mesh key came from, what listens where; with a
    self-signed or IP certificate, also the DERP-map node to paste (one JSON line on stdout).
    ``stun_port`` is the bound port."""
    relay, server = settings.relay, running.server
    if settings.mesh.key_file is not None:
        startup.info("mesh key from %s%s", settings.mesh.key_file,
                     " (derper's default path; --mesh-psk-file names another)" if settings.mesh.key_file_default
                     else "")
    scheme = "TLS" if relay.tls else "plain HTTP"
    startup.info("derpd %s: relay %s on %s (%s), key %s", __version__, running.derp_url,
                 ", ".join(f"{h}:{p}" for h, p in running.addresses), scheme, running.public_key)
    startup.info("data plane: %s", data_plane())
    if not relay.tls:
        startup.warning("serving plain HTTP without TLS: fine for tests and behind a TLS proxy; "
                        "clients need TLS otherwise (port 443 gets Let's Encrypt, or see --certmode)")
    if server.cert is not None and not relay.acme and (server.cert.self_signed_generated or (
        relay.certmode == "manual" and is_ip(relay.hostname)
    )) and needs_pin(server.cert, relay.hostname):
        from .relay.tls import node_json_for_pinned_cert

        entry = settings.map_node
        node = node_json_for_pinned_cert(relay.hostname, server.cert.pin, running.port, stun_port,
                                         name=entry.node_name or "custom", region_id=entry.region_id)
        kind = "self-signed" if server.cert.self_signed_generated else "not trusted by the system roots"
        startup.info("%s certificate, clients need its pin; DERP map node: %s", kind,
                     json.dumps(node, separators=(",", ":")))
        print(json.dumps(node), flush=True)


# ---------------------------------------------------------------------------- one process


def open_signals() -> ContextManager[AsyncIterator[int]]:
    """The signals a relay process handles (SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2), caught
    from here on: open it before binding, so a signal that arrives during start-up is handled,
    not fatal."""
    from .drain import HANDLED_SIGNALS

    return trio.open_signal_receiver(*HANDLED_SIGNALS)


async def handle_signals(signals: AsyncIterator[int], running: RunningRelay, settings: NodeSettings,
                         scope: trio.CancelScope, announcer: Announcer | None = None) -> None:
    """SIGHUP reloads (certificates, allow-lists, rate limits); SIGTERM/SIGINT drain (with a
    coordinator, for ``--drain-grace``) and shut down gracefully (Restarting to every client,
    then queues drain); a second one stops at once; SIGUSR1 drains without stopping, SIGUSR2
    ends that drain (see ``derpd.drain``).  ``signals`` comes from ``open_signals``;
    ``announcer`` is this process's registration (a worker's parent registers for it)."""
    from .drain import Maintenance

    await Maintenance(running, settings.relay, scope, announcer,
                      registered=settings.announce is not None).handle(signals)


async def run_node(settings: NodeSettings, parts: NodeParts | None = None) -> None:
    """Run the node of ``settings`` in this one process until a signal stops it.  ``parts``
    are ``prepare(settings)``, made here when not given.

    Raises:
        BindError: a listener cannot bind (``which`` names it).
        SettingsError: a part refuses a setting, or the certificate cannot be used (CertError).
    """
    if parts is None:
        parts = prepare(settings)
    with open_signals() as signals:
        async with trio.open_nursery() as nursery:
            node = await start_node(nursery, settings, parts)
            await handle_signals(signals, node.relay, settings, nursery.cancel_scope, node.announcer)


__all__ = ["LISTEN_FLAGS", "NodeParts", "RelayStarter", "RunningNode", "acme_config", "bind_error_message",
           "handle_signals", "install_bootstrap_dns", "install_cert_pin_check", "load_protection", "log_startup",
           "needs_pin", "node_registration", "open_signals", "prepare", "run_node", "setup_logging",
           "start_announcer", "start_mesh", "start_node", "start_relay", "start_stun"]
