"""Typed settings: the relay's (``RelaySettings``) and the node's around it (``NodeSettings``),
frozen dataclasses built once at the command line (``derpd.cli_settings``) or by tests, and
checked as they are built."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .keys import NodePrivate


ACME_CERTMODES = ("letsencrypt", "gcp")


class SettingsError(ValueError):
    """A setting is invalid; the message says what to change."""


def split_host_port(addr: str, default_port: int = 443) -> tuple[str, int]:
    """Parse ``:port``, ``host:port``, ``[v6]:port``, ``host`` or ``port``.

    Returns ``(host, port)`` where host ``""`` means every address.

    Raises:
        SettingsError: the port is not a number in 0..65535.
    """
    addr = addr.strip()
    host, port_s = addr, ""
    if addr.startswith("["):
        end = addr.find("]")
        if end < 0:
            raise SettingsError(f"address {addr!r}: missing ']' after the IPv6 address")
        host = addr[1:end]
        rest = addr[end + 1 :]
        if rest.startswith(":"):
            port_s = rest[1:]
        elif rest:
            raise SettingsError(f"address {addr!r}: expected ':port' after ']'")
    elif addr.isdigit():
        host, port_s = "", addr
    elif addr.count(":") == 1:
        host, port_s = addr.split(":")
    if port_s == "https":
        port_s = "443"
    elif port_s == "http":
        port_s = "80"
    if not port_s:
        return host, default_port
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise SettingsError(f"address {addr!r}: the port must be a number from 0 to 65535")
    return host, int(port_s)


def split_listen_addr(addr: str, flag: str = "-a") -> tuple[str, int]:
    """``-a`` as derper reads it (Go's ``net.SplitHostPort``): ``:port``, ``host:port`` or
    ``[v6]:port``.  An address without a port (``8443``, ``127.0.0.1``, ``[::1]``) or with
    an unbracketed IPv6 address (``::1``) is refused, as derper refuses it, instead of being
    guessed at (``8443`` as a port would bind every interface).

    Raises:
        SettingsError: one line naming the form to write.
    """
    text = addr.strip()
    if text.startswith("["):
        end = text.find("]")
        host, rest = (text[1:end], text[end + 1:]) if end > 0 else (text[1:], "")
        missing = not rest.startswith(":") or rest == ":"
    else:
        host, _, port = text.rpartition(":")
        if host.count(":"):
            raise SettingsError(f"{flag} {addr!r}: too many colons in address; write an IPv6 address in "
                                f"brackets with its port, e.g. [{text}]:443")
        missing = not port or not host and ":" not in text
        if ":" not in text:
            host = text
    if missing:
        if host.isdigit():
            example = f":{host} (every interface) or 127.0.0.1:{host}"
        else:
            example = f"[{host}]:443" if ":" in host else f"{host}:443"
        raise SettingsError(f"{flag} {addr!r}: missing port in address; write {example}")
    return split_host_port(text)


def parse_networks(flag: str, text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """A comma-separated list of CIDRs (a bare address is a /32 or /128).

    Raises:
        SettingsError: an entry that is not a network.
    """
    nets = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise SettingsError(f"{flag}: {entry!r} is not an address or CIDR such as 10.0.0.0/8") from None
    return tuple(nets)


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """Everything the relay needs to run.  Defaults match derper where they mean the same."""

    private_key: NodePrivate = field(default_factory=NodePrivate.generate)
    addr: str = ":443"
    certmode: str | None = None  # None (plain, or letsencrypt on port 443), "manual", "letsencrypt", "gcp"
    certdir: Path | None = None
    hostname: str = "localhost"
    http_port: int = -1  # plain-HTTP port beside TLS; -1 disables
    home: str = ""
    derp_enabled: bool = True
    mesh_key: bytes | None = None
    queue_depth: int = 32
    write_timeout: float = 2.0  # 0 disables (non-mesh clients)
    mesh_write_timeout: float = 30.0
    keepalive_interval: float = 60.0
    keepalive_jitter: float = 5.0
    login_timeout: float = 10.0
    http_timeout: float = 30.0
    http_write_timeout: float = 30.0  # every HTTP response (derper's WriteTimeout)
    tcp_keepalive: float = 600.0
    tcp_user_timeout: float = 15.0
    max_connections_per_ip: int = 0  # 0 = unlimited
    accept_connection_limit: float = float("inf")  # new connections per second
    accept_connection_burst: int = 1 << 30
    shutdown_grace: float = 5.0
    drain_grace: float = 30.0  # maintenance drain before a stop (derpd.drain); 0 = none
    serve_metrics: bool = True  # /metrics on the relay port, loopback peers only
    debug_allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # /debug/ beyond loopback
    proxy_protocol: bool = False  # PROXY protocol v1/v2 on the relay listener, from trusted_proxies only
    trusted_proxies: tuple[str, ...] = ()  # CIDRs whose PROXY headers and X-Forwarded-For are believed

    def __post_init__(self) -> None:
        host, port = split_host_port(self.addr)
        if self.certmode not in (None, "manual", *ACME_CERTMODES):
            raise SettingsError(
                f"--certmode {self.certmode!r} is not supported; use letsencrypt (the default), gcp or manual"
            )
        if self.certmode == "manual" and self.certdir is None:
            raise SettingsError("--certmode manual needs --certdir (holding <hostname>.crt and <hostname>.key)")
        if self.acme and self.certdir is None:
            raise SettingsError(f"--certmode {self.effective_certmode} needs --certdir (where the certificate "
                                "and the ACME account key are kept)")
        if self.queue_depth < 1:
            raise SettingsError("the send queue depth must be at least 1")
        if not -1 <= self.http_port <= 65535:
            raise SettingsError("--http-port must be -1 (off) or a port number")
        del host, port
        for cidr in self.trusted_proxies:
            try:
                ipaddress.ip_network(cidr.strip(), strict=False)
            except ValueError:
                raise SettingsError(
                    f"--trusted-proxies: {cidr!r} is not an IP address or CIDR network (e.g. 10.0.0.0/8,::1)"
                ) from None
        if self.proxy_protocol and not self.trusted_proxies:
            raise SettingsError("--proxy-protocol needs --trusted-proxies CIDR,... (the addresses of the proxies "
                                "that send PROXY headers)")

    @property
    def listen(self) -> tuple[str, int]:
        return split_host_port(self.addr)

    @property
    def tls(self) -> bool:
        """derper serves TLS iff the port is 443 or a certmode is given (P-25)."""
        return self.certmode is not None or self.listen[1] == 443

    @property
    def effective_certmode(self) -> str | None:
        """The certmode in force: derper's default ``letsencrypt`` on port 443 when none is given."""
        if self.certmode is None and self.listen[1] == 443:
            return "letsencrypt"
        return self.certmode

    @property
    def acme(self) -> bool:
        """The certificate comes from an ACME CA (``--certmode letsencrypt`` or ``gcp``)."""
        return self.effective_certmode in ACME_CERTMODES


# ----------------------------------------------------------------------------- the node around the relay
#
# ``RelaySettings`` is what the relay server itself reads.  A node (``derpd.node``) also runs STUN,
# a metrics listener, mesh links, admission checks, bootstrap DNS, ACME and its registration with
# coordinators: each has a frozen group below, and ``NodeSettings`` holds them all.  Every group
# is plain data (it crosses into ``--workers`` processes as it is); ``__post_init__`` refuses what
# can be judged from the values alone, in one line naming the flag.  Reading files and parsing
# what another module owns (mesh entries, coordinator URLs, DNS names) happens where the flags
# become settings (``derpd.cli_settings``).


@dataclass(frozen=True, slots=True)
class StunSettings:
    """``--stun-port`` (and ``--stun``): the UDP STUN port on the relay's IP; below 0: no STUN."""

    port: int = 3478

    def __post_init__(self) -> None:
        if self.port > 65535:
            raise SettingsError(f"--stun-port {self.port}: give a port number from 0 to 65535, or -1 (no STUN)")


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """``--metrics-addr``: a dedicated Prometheus listener; None: /metrics on the relay port only."""

    addr: str | None = None

    def __post_init__(self) -> None:
        if self.addr is not None:
            split_host_port(self.addr, default_port=9090)


@dataclass(frozen=True, slots=True)
class MeshSettings:
    """``--mesh-with`` and ``--mesh-ca-file``; the mesh key itself is ``RelaySettings.mesh_key``.

    ``peers`` are derper's ``host[:port][/dialhost]`` entries (``derpd.mesh.parse_mesh_with``
    reads them); ``key_file`` names where the mesh key came from, for the start-up line, and
    ``key_file_default`` says it was derper's default path rather than ``--mesh-psk-file``."""

    peers: tuple[str, ...] = ()
    ca_file: str | None = None
    key_file: Path | None = None
    key_file_default: bool = False


@dataclass(frozen=True, slots=True)
class MapNodeSettings:
    """How this node appears in a DERP map: the node printed at start (a pinned certificate)
    and the node registered with coordinators (``--region-id``, ``--node-name`` and friends)."""

    region_id: int = 900
    region_code: str | None = None
    region_name: str | None = None
    node_name: str | None = None  # None: the hostname
    ipv4: str | None = None  # --advertise-ipv4
    ipv6: str | None = None  # --advertise-ipv6

    def __post_init__(self) -> None:
        for flag, value, version in (("--advertise-ipv4", self.ipv4, 4), ("--advertise-ipv6", self.ipv6, 6)):
            if value is not None and not (is_ip(value) and ipaddress.ip_address(value).version == version):
                raise SettingsError(f"{flag} {value!r} is not an IPv{version} address")


@dataclass(frozen=True, slots=True)
class AnnounceSettings:
    """``--coordinator URL,...``: register with every coordinator and keep heartbeating."""

    coordinators: tuple[str, ...]
    token: str  # the contents of --coordinator-token-file
    interval: float = 15.0  # --heartbeat-interval, until a coordinator sets the pace

    def __post_init__(self) -> None:
        if not self.coordinators:
            raise SettingsError("--coordinator needs at least one URL, e.g. http://coordinator:8080")
        for one in self.coordinators:
            try:
                host = urlsplit(one).hostname
                urlsplit(one).port
            except ValueError:
                raise SettingsError(f"--coordinator {one!r}: the port must be a number from 1 to 65535") from None
            if not host:
                raise SettingsError(f"--coordinator {one!r} has no host; give http(s)://HOST[:PORT]")
        if not 1.0 <= self.interval <= 3600:
            raise SettingsError(f"--heartbeat-interval {self.interval:g}s: give a duration from 1s to 1h, e.g. 15s")


@dataclass(frozen=True, slots=True)
class AdmissionSettings:
    """Who may log in, and how fast clients may send (``derpd.admission``, ``derpd.ratelimit``,
    ``derpd.localapi``).  Files are read when the node starts and again on SIGHUP."""

    allow_keys: Path | None = None  # --allow-keys
    verify_client_url: str | None = None  # --verify-client-url
    verify_client_url_fail_open: bool = True
    verify_clients: bool = False  # --verify-clients: ask the local tailscaled
    socket: str | None = None  # --socket: tailscaled's LocalAPI socket
    rate_config: Path | None = None  # --rate-config


@dataclass(frozen=True, slots=True)
class AcmeSettings:
    """The ACME flags beside ``--certmode letsencrypt``/``gcp`` (``derpd.acme.AcmeConfig`` is
    built from these and ``RelaySettings``)."""

    email: str = ""
    eab_kid: str = ""
    eab_key: str = ""
    directory: str | None = None
    ip_certs: bool = False


@dataclass(frozen=True, slots=True)
class BootstrapDNSSettings:
    """``--bootstrap-dns-names`` and ``--unpublished-bootstrap-dns-names``, split into names."""

    published: tuple[str, ...] = ()
    unpublished: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """Everything a node runs with (``derpd.node`` assembles it; ``derpd.cli_settings`` makes it
    from ``derpd serve``'s flags; ``derpd dev`` and tests write it directly)."""

    relay: RelaySettings
    stun: StunSettings = field(default_factory=StunSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    mesh: MeshSettings = field(default_factory=MeshSettings)
    map_node: MapNodeSettings = field(default_factory=MapNodeSettings)
    announce: AnnounceSettings | None = None  # None: no --coordinator
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)
    acme: AcmeSettings = field(default_factory=AcmeSettings)
    bootstrap_dns: BootstrapDNSSettings = field(default_factory=BootstrapDNSSettings)
    workers: int = 1  # --workers: relay processes sharing the port (derpd.workers)
    verbose: int = 0  # -v count: each worker process sets up its logging from it

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= 64:
            raise SettingsError(f"--workers {self.workers}: give a number from 1 to 64, or auto")
        if self.mesh.peers and self.relay.mesh_key is None:
            raise SettingsError("--mesh-with needs the region's mesh key: pass --mesh-psk-file")
        if not self.relay.acme:
            acme = self.acme
            for flag, given in (("--acme-ip-certs", acme.ip_certs), ("--acme-eab-kid", acme.eab_kid),
                                ("--acme-eab-key", acme.eab_key), ("--acme-directory", acme.directory)):
                if given:
                    raise SettingsError(f"{flag} is for --certmode letsencrypt or gcp")
        elif self.workers > 1:
            raise SettingsError("ACME with --workers > 1 is not supported yet: run one worker, or get the "
                                "certificate with an external ACME client and use --certmode manual")
        if self.workers > 1 and self.mesh.peers:
            raise SettingsError("--workers cannot be combined with --mesh-with yet: run one process per mesh node")
