"""TLS for the relay: derper's ``--certmode manual`` files, self-signed IP certificates with a
``sha256-raw:`` pin, and the meta-certificate that lets Go clients fast-start (spec 11).

The meta-certificate is a throw-away self-signed certificate appended to the served chain.
Its subject CN is ``derpkey<64 hex of the server's public key>`` and its serial number is the
protocol version.  Go clients that see it over TLS 1.3 already know the server key, so they
send ClientInfo right behind the HTTP request and skip a round trip (spec 9.3).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import os
import re
import ssl
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..keys import NodePublic
from ..protocol.frames import PROTOCOL_VERSION
from ..settings import SettingsError, is_ip

log = logging.getLogger("derpd.tls")


class CertError(SettingsError):
    """A certificate or key cannot be used; the message says which file and why."""


@dataclass(frozen=True, slots=True)
class ServerCert:
    cert_path: Path
    key_path: Path
    pin: str  # "sha256-raw:<hex of the leaf's DER>"
    not_after: dt.datetime
    self_signed_generated: bool = False


def cert_file_base(hostname: str) -> str:
    """derper's file name rule: drop every character outside ``[A-Za-z0-9.-]``."""
    return re.sub(r"[^A-Za-z0-9.\-]", "", hostname)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _self_signed(
    name: x509.Name, key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, serial: int,
    not_before: dt.datetime, not_after: dt.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def generate_self_signed_ip_cert(ip: str, cert_path: Path, key_path: Path) -> None:
    """An ECDSA P-256 certificate for one IP, valid a year, as derper makes (spec 11.3)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)])
    now = _now()
    cert = (
        _self_signed(name, key, x509.random_serial_number(), now - dt.timedelta(minutes=5),
                     now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_encipherment=True, content_commitment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write_private(
        key_path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                          serialization.NoEncryption()),
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_meta_cert(server_key: NodePublic) -> bytes:
    """Returns the PEM of the meta-certificate for ``server_key`` (spec 11.2)."""
    key = ed25519.Ed25519PrivateKey.generate()
    # "derpkey" + 64 hex digits is 71 characters, over X.509's usual 64-character bound for a
    # CN; Go clients expect exactly this, so skip cryptography's length check.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        cn = x509.NameAttribute(NameOID.COMMON_NAME, "derpkey" + server_key.hex(), _validate=False)
    name = x509.Name([cn])
    now = _now()
    cert = (
        _self_signed(name, key, PROTOCOL_VERSION, now - dt.timedelta(days=30), now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, None)
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def load_manual_cert(certdir: Path, hostname: str, *, self_sign_ip: bool = True) -> ServerCert:
    """Find ``<certdir>/<hostname>.crt`` and ``.key``; for an IP hostname with no files,
    generate a self-signed certificate and key (key mode 0600) if ``self_sign_ip``.

    Raises:
        CertError: files missing for a DNS hostname, unreadable, or not a certificate.
    """
    base = cert_file_base(hostname)
    cert_path = certdir / f"{base}.crt"
    key_path = certdir / f"{base}.key"
    generated = False
    if not cert_path.exists() and not key_path.exists():
        if not is_ip(hostname) or not self_sign_ip:
            raise CertError(
                f"no certificate for {hostname!r}: put {cert_path} and {key_path} in place "
                "(PEM; the .crt may hold the chain), or use an IP --hostname for a self-signed certificate"
            )
        try:
            certdir.mkdir(parents=True, exist_ok=True)
            generate_self_signed_ip_cert(hostname, cert_path, key_path)
        except OSError as e:
            raise CertError(f"cannot write a self-signed certificate for {hostname} into {certdir}: "
                            f"{e.strerror or e}; fix --certdir or its permissions") from e
        generated = True
    try:
        pem = cert_path.read_bytes()
        leaf = x509.load_pem_x509_certificate(pem)
    except (OSError, ValueError) as e:
        raise CertError(f"cannot read the certificate {cert_path}: {e}") from e
    if not key_path.exists():
        raise CertError(f"missing the key {key_path} for {cert_path}")
    pin = "sha256-raw:" + hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
    return ServerCert(cert_path, key_path, pin, leaf.not_valid_after_utc, generated)


def server_context(cert: ServerCert, server_key: NodePublic | None) -> ssl.SSLContext:
    """An SSLContext serving ``cert``'s chain, with the meta-certificate appended for a relay
    (``server_key``; None: the chain alone, as the coordinator serves it).

    Raises:
        CertError: OpenSSL refused the certificate or the key.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    chain = cert.cert_path.read_bytes().rstrip(b"\n") + b"\n"
    if server_key is not None:
        chain += make_meta_cert(server_key)
    with tempfile.NamedTemporaryFile("wb", suffix=".pem", delete=False) as f:
        f.write(chain)
        tmp = f.name
    try:
        ctx.load_cert_chain(tmp, str(cert.key_path))
    except (ssl.SSLError, OSError) as e:
        if isinstance(e, ssl.SSLError) and "KEY_VALUES_MISMATCH" in str(e):
            why = "the key does not belong to the certificate; put the matching key there"
        elif isinstance(e, ssl.SSLError):
            why = f"the key is not a PEM private key ({e.reason or e}); put the certificate's key there"
        else:
            why = f"cannot read the key ({e.strerror or e}); check the file and its permissions"
        raise CertError(f"cannot use {cert.cert_path} with {cert.key_path}: {why}") from e
    finally:
        os.unlink(tmp)
    return ctx


class CertificateFiles:
    """The certificate in use from ``<certdir>/<hostname>.crt`` and ``.key``, and its reload:
    the one certificate loader of ``derpd serve`` and ``derpd coordinator``.

    With ``acme`` (``--certmode letsencrypt``/``gcp``: :mod:`derpd.acme` writes the files)
    missing files are not an error at start and no self-signed certificate is made; without
    it (``manual``) the files must be there, or an IP hostname gets a self-signed one.
    ``context`` is the SSLContext for new connections (None until there is a certificate);
    a reload makes a new one, so open connections keep theirs.  ``server_key`` appends the
    relay's meta-certificate.
    """

    def __init__(self, certdir: Path, hostname: str, *, acme: bool = False,
                 server_key: NodePublic | None = None) -> None:
        self.certdir = certdir
        self.hostname = hostname
        self.acme = acme
        self.server_key = server_key
        self.cert: ServerCert | None = None
        self.context: ssl.SSLContext | None = None
        self._stamp: tuple[float, float] | None = None

    def load(self) -> None:
        """Loads the certificate at start.

        Raises:
            CertError: the files are missing or unusable (not with ``acme``: then it is logged
            and the ACME client obtains one).
        """
        try:
            cert = load_manual_cert(self.certdir, self.hostname, self_sign_ip=not self.acme)
            ctx = server_context(cert, self.server_key)
        except CertError as e:
            if not self.acme:
                raise
            log.info("no usable cached certificate yet (%s); ACME will obtain one", e)
            return
        self.cert, self.context = cert, ctx
        self._stamp = self.stamp()

    def stamp(self) -> tuple[float, float] | None:
        if self.cert is None:
            return None
        try:
            return self.cert.cert_path.stat().st_mtime, self.cert.key_path.stat().st_mtime
        except OSError:
            return None

    def changed(self) -> bool:
        """True when the files in use were replaced since they were loaded (or last tried)."""
        return self.cert is not None and self.stamp() not in (None, self._stamp)

    def reload(self) -> bool:
        """Loads the files again (SIGHUP, a change, a new ACME certificate).  A bad new
        certificate keeps the old one and logs why.  Returns True if the new one is in use."""
        if self.cert is None and not self.acme:
            return False
        self._stamp = self.stamp()
        try:
            cert = load_manual_cert(self.certdir, self.hostname, self_sign_ip=not self.acme)
            ctx = server_context(cert, self.server_key)
        except SettingsError as e:
            log.error("TLS reload failed, keeping the current certificate: %s", e)
            return False
        self.cert, self.context = cert, ctx
        self._stamp = self.stamp()
        if self.acme:  # publicly trusted: no pin to publish
            log.warning("TLS certificate reloaded: %s, valid until %s", cert.cert_path, cert.not_after.isoformat())
        else:
            log.warning("TLS certificate reloaded: %s, valid until %s, pin %s", cert.cert_path,
                        cert.not_after.isoformat(), cert.pin)
        return True


ACME_TLS_ALPN = b"acme-tls/1"
_ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")  # id-pe-acmeIdentifier, RFC 8737


class ChallengeResponder(Protocol):
    """What the listeners ask an ACME client (derpd.acme) while it proves control of the name."""

    def http01_response(self, token: str) -> bytes | None:
        """The key authorization for a pending HTTP-01 token, else None."""

    def tls_alpn01_pending(self) -> bool:
        """True while a TLS-ALPN-01 validation may arrive (connections are then peeked at)."""

    def tls_alpn01_context(self, server_name: str | None) -> ssl.SSLContext | None:
        """The acme-tls/1 context for a pending TLS-ALPN-01 validation of ``server_name``."""


def tls_alpn01_context(name: str, key_authorization: str) -> ssl.SSLContext:
    """A server context answering RFC 8737's TLS-ALPN-01 challenge for ``name``: a throw-away
    self-signed certificate for the name with the critical acmeIdentifier extension holding
    SHA-256(key authorization), negotiating only ``acme-tls/1``."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode()).digest()
    san: x509.GeneralName = (x509.IPAddress(ipaddress.ip_address(name)) if is_ip(name) else x509.DNSName(name))
    now = _now()
    cert = (
        _self_signed(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "derpd acme-tls/1")]), key,
                     x509.random_serial_number(), now - dt.timedelta(minutes=5), now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.UnrecognizedExtension(_ACME_IDENTIFIER_OID, b"\x04\x20" + digest), critical=True)
        .sign(key, hashes.SHA256())
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols([ACME_TLS_ALPN.decode()])
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with tempfile.NamedTemporaryFile("wb", suffix=".pem") as f:  # mode 0600, removed on close
        f.write(pem)
        f.flush()
        ctx.load_cert_chain(f.name)
    return ctx


def node_json_for_pinned_cert(hostname: str, pin: str, port: int, stun_port: int, *, name: str = "custom",
                              region_id: int = 900) -> dict[str, object]:
    """The DERP-map node an operator pastes for a self-signed IP certificate (spec 11.4).
    ``stun_port`` is the bound STUN port (-1: none)."""
    node: dict[str, object] = {"Name": name, "RegionID": region_id, "HostName": hostname, "CertName": pin}
    if port != 443:
        node["DERPPort"] = port
    ip = ipaddress.ip_address(hostname) if is_ip(hostname) else None
    if ip is not None:
        node["IPv4" if ip.version == 4 else "IPv6"] = hostname
    if stun_port > 0 and stun_port != 3478:
        node["STUNPort"] = stun_port
    elif stun_port < 0:
        node["STUNPort"] = -1
    return node
