"""``derpd dev``: a complete DERP region on loopback, in one process.

It runs, all on 127.0.0.1:

* the relay, with TLS for ``localhost`` from a generated test CA (the leaf is also pinned
  in the map with ``CertName: sha256-raw:...``, so Tailscale clients need no CA install);
* a STUN server;
* the coordinator, publishing the region and probing it.

It prints the map URL, the CA path, a ready ``derpprobe`` command line and the headscale
``derp.urls`` snippet, and stops cleanly on Ctrl-C.  Certificates are kept in ``--dir``
and reused while valid, so the pin stays the same across restarts.

The relay and STUN are a node like any other, assembled by ``derpd.node`` from
``NodeSettings``; the command (``derpd dev``'s flags) is in ``derpd.cli``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import os
import shlex
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio
from stund.oneline import single_error
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .coordinator.config import CoordinatorConfig
from .coordinator.model import DerpMap, DerpNode, DerpRegion
from .coordinator.server import RunningCoordinator, serve_coordinator
from .keys import NodePrivate
from .node import RunningNode, prepare, start_node
from .relay.listener import BindError
from .settings import NodeSettings, RelaySettings, StunSettings

log = logging.getLogger("derpd.dev")

HOSTNAME = "localhost"
# The derpprobe the banner recommends: the Tailscale release the interop suite is pinned to
# (tests/interop/go.mod; a test keeps the two equal).
DERPPROBE_MODULE = "tailscale.com/cmd/derpprobe@v1.98.10"
_MIN_REMAINING = dt.timedelta(days=8)  # derpprobe's TLS probe wants > 7 days left


@dataclass(frozen=True, slots=True)
class DevCerts:
    ca_path: Path
    cert_path: Path
    key_path: Path
    pin: str


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pin(cert: x509.Certificate) -> str:
    return "sha256-raw:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def ensure_dev_certs(directory: Path, *, now: dt.datetime | None = None) -> DevCerts:
    """Returns a test CA and a ``localhost`` leaf in ``directory``, creating them if missing
    or if the leaf expires within 8 days.

    Files: ``ca.pem`` (the CA certificate, for SSL_CERT_FILE), ``ca.key``, ``localhost.crt``
    (leaf only: a ``sha256-raw:`` pin allows no intermediates, spec P-22), ``localhost.key``.
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    directory.mkdir(parents=True, exist_ok=True)
    ca_path, ca_key_path = directory / "ca.pem", directory / "ca.key"
    cert_path, key_path = directory / f"{HOSTNAME}.crt", directory / f"{HOSTNAME}.key"
    try:
        leaf = x509.load_pem_x509_certificate(cert_path.read_bytes())
        ca_path.read_bytes()
        key_path.read_bytes()
        if leaf.not_valid_after_utc - now > _MIN_REMAINING:
            return DevCerts(ca_path, cert_path, key_path, _pin(leaf))
    except (OSError, ValueError):
        pass

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "derpd dev CA (test only)")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTNAME)]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName(HOSTNAME),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    _write(ca_key_path, ca_key.private_bytes(pem, pkcs8, serialization.NoEncryption()), 0o600)
    _write(key_path, leaf_key.private_bytes(pem, pkcs8, serialization.NoEncryption()), 0o600)
    _write(ca_path, ca.public_bytes(pem))
    _write(cert_path, leaf.public_bytes(pem))
    log.info("generated a test CA and a %s certificate in %s", HOSTNAME, directory)
    return DevCerts(ca_path, cert_path, key_path, _pin(leaf))


@dataclass(frozen=True, slots=True)
class RunningDevRegion:
    certs: DevCerts
    relay_port: int
    stun_port: int
    coordinator: RunningCoordinator

    @property
    def map_url(self) -> str:
        return self.coordinator.url + "/derpmap/default"

    def banner(self) -> str:
        """Returns what ``derpd dev`` prints once everything listens."""
        c = self.coordinator.url
        return "\n".join([
            "derpd dev: a DERP region on this machine (Ctrl-C stops it)",
            f"  relay        https://{HOSTNAME}:{self.relay_port}/derp   (pin {self.certs.pin})",
            f"  STUN         127.0.0.1:{self.stun_port}/udp",
            f"  DERP map     {self.map_url}",
            f"  map as YAML  {c}/derpmap/default.yaml",
            f"  status       {c}/status",
            f"  test CA      {self.certs.ca_path}",
            "",
            f"Probe it with Tailscale's derpprobe (install: go install {DERPPROBE_MODULE}):",
            f"  SSL_CERT_FILE={self.certs.ca_path} derpprobe -derp-map={self.map_url} -once -spread=false",
            "",
            "Relay packets between two clients through it:",
            f"  derpd check https://{HOSTNAME}:{self.relay_port}/derp --ca-file {shlex.quote(str(self.certs.ca_path))}",
            "",
            "headscale config (config.yaml):",
            "  derp:",
            "    server:",
            "      enabled: false",
            "    urls:",
            f"      - {self.map_url}",
            "    paths: []",
            "    auto_update_enabled: true",
            "    update_frequency: 1m",
            "",
        ])


async def serve_dev_region(
    directory: Path,
    *,
    relay_port: int = 8443,
    stun_port: int = 3478,
    map_port: int = 8080,
    probe_interval: float = 10.0,
    task_status: trio.TaskStatus[RunningDevRegion] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Runs relay, STUN and coordinator on 127.0.0.1 until cancelled (ports 0 = any free port).

    Raises:
        BindError: a port is in use (``which``: "relay", "stun" or "map").
    """
    certs = ensure_dev_certs(directory)
    settings = NodeSettings(
        relay=RelaySettings(addr=f"127.0.0.1:{relay_port}", private_key=NodePrivate.generate(), certmode="manual",
                            certdir=directory, hostname=HOSTNAME),
        stun=StunSettings(stun_port),
    )
    async with trio.open_nursery() as nursery:
        node: RunningNode = await start_node(nursery, settings, prepare(settings))
        dev_node = DerpNode("900a", 900, HOSTNAME, cert_name=certs.pin, ipv4="127.0.0.1",
                            stun_port=node.stun_port, derp_port=node.relay.port)
        config = CoordinatorConfig(
            static_map=DerpMap((DerpRegion(900, "dev", "derpd dev (loopback)", (dev_node,)),),
                               omit_default_regions=True),
            listen=f"127.0.0.1:{map_port}",
            probe_interval=probe_interval,
            probe_timeout=probe_interval * 0.8,
            allow_loopback_nodes=True,  # every node of a dev region is on loopback
            source="derpd dev",
        )
        try:
            coordinator: RunningCoordinator = await nursery.start(
                lambda task_status: serve_coordinator(config, task_status=task_status))
        except (OSError, BaseExceptionGroup) as e:  # hypercorn's bind error arrives in a group
            err = single_error(e)
            if not isinstance(err, OSError):
                raise
            raise BindError(err, "127.0.0.1", map_port, "map") from e
        task_status.started(RunningDevRegion(certs, node.relay.port, node.stun_port, coordinator))


async def run_dev_region(directory: Path, *, relay_port: int, stun_port: int, map_port: int, probe_interval: float,
                         show: Callable[[str], None]) -> None:
    """``derpd dev``: serve the region, ``show`` its banner, and stop on SIGINT or SIGTERM."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            region: RunningDevRegion = await nursery.start(lambda task_status: serve_dev_region(
                directory, relay_port=relay_port, stun_port=stun_port, map_port=map_port,
                probe_interval=probe_interval, task_status=task_status))
            show(region.banner())
            async for signum in signals:
                show(f"derpd dev: stopped ({signal.Signals(signum).name})")
                nursery.cancel_scope.cancel()
                break
