"""``derpd serve``'s flags, as click parsed them, turned into ``NodeSettings``: the one place
where flags become typed settings.

Here the key file is read (or created), the mesh key and the coordinator token are read, derper's
computed defaults are applied (``derpd.derperflags``), and every value is checked before
anything starts: a bad value ends in a ``SettingsError`` (or ``KeyFileError``/``KeyFormatError``)
whose message is the one line the operator sees.

Dependencies: part of the command line (``derpd.cli`` calls ``node_settings``); it imports the
settings and the parsers of the modules that own a value (``derpd.mesh``, ``derpd.bootstrapdns``,
``derpd.coordinator.announce``), never the node's assembly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .derperflags import cert_settings, default_key_file, default_mesh_psk_file
from .keyfile import load_or_create
from .keys import KeyFormatError, NodePrivate, parse_mesh_key
from .settings import (AcmeSettings, AdmissionSettings, AnnounceSettings, BootstrapDNSSettings, MapNodeSettings,
                       MeshSettings, MetricsSettings, NodeSettings, RelaySettings, SettingsError, StunSettings,
                       parse_networks, split_host_port, split_listen_addr)

#: click's parameters of ``derpd serve`` (keyword names, values already converted by its types)
Flags = Mapping[str, Any]

startup = logging.getLogger("derpd.startup")


def node_settings(flags: Flags) -> NodeSettings:
    """The settings of ``derpd serve``'s flags.

    Raises:
        SettingsError: a value is invalid or a file cannot be read (the message says what to do).
        KeyFileError, KeyFormatError: the key file is unusable.
    """
    relay, mesh = relay_settings(flags)
    return NodeSettings(
        relay=relay,
        stun=StunSettings(flags["stun_port"] if flags["stun"] else -1),
        metrics=MetricsSettings(flags["metrics_addr"]),
        mesh=mesh,
        map_node=map_node_settings(flags),
        announce=announce_settings(flags),
        admission=admission_settings(flags),
        acme=AcmeSettings(email=flags["acme_email"] or "", eab_kid=flags["acme_eab_kid"] or "",
                          eab_key=flags["acme_eab_key"] or "", directory=flags["acme_directory"] or None,
                          ip_certs=bool(flags["acme_ip_certs"])),
        bootstrap_dns=bootstrap_dns_settings(flags),
        workers=flags["workers"],
        verbose=flags["verbose"],
    )


def relay_settings(flags: Flags) -> tuple[RelaySettings, MeshSettings]:
    """The relay's settings and the mesh's (they share the mesh key): ``--dev``'s defaults, the
    key file, derper's certificate rule and the mesh key file."""
    dev: bool = flags["dev"]
    addr: str = flags["addr"]
    hostname: str = flags["hostname"]
    config: Path | None = flags["config"]
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
        key, created = load_or_create(config)
        if created:
            startup.info("created key file %s", config)
    certmode, certdir = cert_settings(flags["certmode"], flags["certdir"], split_host_port(addr)[1])
    given: Path | None = flags["mesh_psk_file"]
    mesh_file = given if given is not None or dev else default_mesh_psk_file()
    mesh_key = None
    if dev and os.environ.get("TAILSCALE_DERPER_MESH_KEY"):  # derper's dev-mode mesh key
        mesh_file = None
        try:
            mesh_key = parse_mesh_key(os.environ["TAILSCALE_DERPER_MESH_KEY"])
        except KeyFormatError as e:
            raise SettingsError(f"TAILSCALE_DERPER_MESH_KEY must be 64 hex digits ({e})") from e
    if mesh_file is not None:
        try:
            mesh_key = parse_mesh_key(mesh_file.read_text())
        except OSError as e:
            raise SettingsError(f"cannot read the mesh key file {mesh_file}: {e.strerror}") from e
        except KeyFormatError as e:
            raise SettingsError(f"{mesh_file}: the mesh key must be 64 hex digits ({e})") from e
    relay = RelaySettings(
        private_key=key,
        addr=addr,
        certmode=certmode,
        certdir=certdir,
        hostname=hostname,
        http_port=flags["http_port"],
        home=flags["home"],
        derp_enabled=flags["derp_enabled"],
        mesh_key=mesh_key,
        write_timeout=flags["tcp_write_timeout"],
        tcp_keepalive=flags["tcp_keepalive_time"],
        tcp_user_timeout=flags["tcp_user_timeout"],
        queue_depth=flags["queue_depth"],
        accept_connection_limit=flags["accept_connection_limit"],
        accept_connection_burst=flags["accept_connection_burst"],
        max_connections_per_ip=flags["max_connections_per_ip"],
        shutdown_grace=flags["shutdown_grace"],
        drain_grace=flags["drain_grace"],
        debug_allow=parse_networks("--debug-allow", flags["debug_allow"] or ""),
        proxy_protocol=flags["proxy_protocol"],
        trusted_proxies=tuple(c.strip() for c in (flags["trusted_proxies"] or "").split(",") if c.strip()),
    )
    peers: tuple[str, ...] = ()
    if flags["mesh_with"]:
        from .mesh import parse_mesh_with

        parse_mesh_with(flags["mesh_with"])  # a bad entry fails here, before anything listens
        peers = tuple(e.strip() for e in flags["mesh_with"].split(",") if e.strip())
    mesh = MeshSettings(peers=peers, ca_file=flags["mesh_ca_file"], key_file=mesh_file,
                        key_file_default=mesh_file is not None and given is None)
    return relay, mesh


def map_node_settings(flags: Flags) -> MapNodeSettings:
    """``--region-id``, ``--region-code``, ``--region-name``, ``--node-name``, ``--advertise-ipv4/6``."""
    return MapNodeSettings(region_id=flags["region_id"], region_code=flags["region_code"],
                           region_name=flags["region_name"], node_name=flags["node_name"],
                           ipv4=flags["advertise_ipv4"], ipv6=flags["advertise_ipv6"])


def announce_settings(flags: Flags) -> AnnounceSettings | None:
    """``--coordinator`` with its token file and ``--heartbeat-interval``; None without
    ``--coordinator``."""
    url = flags["coordinator"]
    if not url:
        return None
    if flags["hostname"] == "derp.tailscale.com" and not flags["dev"]:  # derper's default, not a choice
        raise SettingsError("--coordinator needs --hostname: the name (or IP) clients reach this relay at")
    token_file: Path | None = flags["coordinator_token_file"]
    if token_file is None:
        raise SettingsError("--coordinator needs --coordinator-token-file (the coordinator's shared token)")
    try:
        token = token_file.read_text().strip()
    except OSError as e:
        raise SettingsError(f"cannot read {token_file}: {e.strerror}") from e
    if not token:
        raise SettingsError(f"{token_file} is empty; it must hold the coordinator's registration token")
    from .coordinator.announce import split_coordinator_urls

    try:
        urls = split_coordinator_urls(url)
    except ValueError as e:
        raise SettingsError(str(e)) from None
    interval = flags["heartbeat_interval"]
    return AnnounceSettings(tuple(urls), token, 15.0 if interval is None else float(interval))


def admission_settings(flags: Flags) -> AdmissionSettings:
    """``--allow-keys``, ``--verify-client-url[-fail-open]``, ``--verify-clients``, ``--socket``,
    ``--rate-config`` (``derpd.node.load_protection`` reads the files)."""
    return AdmissionSettings(
        allow_keys=flags["allow_keys"],
        verify_client_url=flags["verify_client_url"] or None,
        verify_client_url_fail_open=flags["verify_client_url_fail_open"],
        verify_clients=flags["verify_clients"],
        socket=flags["socket"] or None,
        rate_config=flags["rate_config"],
    )


def bootstrap_dns_settings(flags: Flags) -> BootstrapDNSSettings:
    from .bootstrapdns import parse_names

    return BootstrapDNSSettings(
        parse_names("--bootstrap-dns-names", flags["bootstrap_dns_names"] or ""),
        parse_names("--unpublished-bootstrap-dns-names", flags["unpublished_bootstrap_dns_names"] or ""))


__all__ = ["Flags", "admission_settings", "announce_settings", "bootstrap_dns_settings", "map_node_settings",
           "node_settings", "relay_settings"]
