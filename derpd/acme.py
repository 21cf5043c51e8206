"""ACME (``--certmode letsencrypt`` / ``gcp``): obtain and renew the relay's certificate.

``AcmeManager`` runs beside the relay.  It proves control of ``--hostname`` with
TLS-ALPN-01 on the relay's own TLS listener (``derpd.relay.tls_select``) or HTTP-01 on
``--http-port`` (``derpd.relay.http_front``), obtains a certificate, writes it into
``--certdir`` with the names ``--certmode manual`` uses (``<hostname>.crt``, ``.key``) and
swaps it in through the relay's TLS reload (new connections get it and a new
meta-certificate; open ones keep theirs).  It renews when a third of the lifetime is left.

The protocol is certbot's ``acme`` library (sync, ``requests``): each attempt runs in a worker
thread, one at a time per process, never more than one order in flight for a name.  Failure
backs off from ``backoff_min`` to ``backoff_max`` and logs one line with what the CA answered;
the relay keeps serving whatever certificate it has.  Layout and behaviour: docs/acme.md.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import ipaddress
import logging
import os
import ssl
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import josepy as jose
import requests
import trio
from trio.lowlevel import RunVar
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .relay.tls import cert_file_base, tls_alpn01_context
from .settings import SettingsError, is_ip

if TYPE_CHECKING:
    from .relay.server import RelayServer

log = logging.getLogger("derpd.acme")

LETSENCRYPT_DIRECTORY = "https://acme-v02.api.letsencrypt.org/directory"
GCP_DIRECTORY = "https://dv.acme-v02.api.pki.goog/directory"
ACCOUNT_KEY_FILE = "acme-account.key"
IP_PROFILE = "shortlived"
TLS_ALPN_01 = "tls-alpn-01"
HTTP_01 = "http-01"

# One ACME conversation at a time per trio run (each is a worker thread doing blocking I/O),
# and the names with an order in flight.  Per run, not per process: a thread abandoned by a
# cancelled run must not hold up the next run (tests run many).
_LIMITER: RunVar[trio.CapacityLimiter] = RunVar("derpd_acme_limiter")
_IN_FLIGHT: RunVar[set[str]] = RunVar("derpd_acme_in_flight")


def _run_state() -> tuple[trio.CapacityLimiter, set[str]]:
    try:
        return _LIMITER.get(), _IN_FLIGHT.get()
    except LookupError:
        _LIMITER.set(trio.CapacityLimiter(1))
        _IN_FLIGHT.set(set())
        return _LIMITER.get(), _IN_FLIGHT.get()


def decode_eab_key(text: str) -> bytes:
    """derper's rule: base64url without padding, else standard base64."""
    for decode in (lambda s: base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)), base64.b64decode):
        try:
            key = decode(text)
        except (binascii.Error, ValueError):
            continue
        if key:
            return key
    raise SettingsError("--acme-eab-key is not valid base64; paste the HMAC key exactly as the CA gave it")


@dataclass(frozen=True)
class AcmeConfig:
    hostname: str
    certdir: Path
    directory: str = LETSENCRYPT_DIRECTORY
    email: str = ""
    eab_kid: str = ""
    eab_key: bytes = b""
    ip_cert: bool = False  # --acme-ip-certs: an IP identifier, short-lived profile, HTTP-01
    challenges: tuple[str, ...] = (TLS_ALPN_01, HTTP_01)  # tried in this order within one attempt
    profile: str | None = None  # None: the CA's default (IP_PROFILE for an IP certificate)
    ca_file: str | None = None  # verifies the directory's TLS; default SSL_CERT_FILE, else system roots
    backoff_min: float = 60.0
    backoff_max: float = 1800.0
    order_timeout: float = 90.0  # validation and issuance of one order
    network_timeout: float = 30.0  # one HTTP request to the CA

    @property
    def name(self) -> str:
        """The identifier to certify (a DNS name in lower case, or the IP); ``hostname`` as
        given names the files, as the relay's TLS loader does."""
        return self.hostname.lower()

    @classmethod
    def from_options(cls, *, certmode: str, hostname: str, certdir: Path, http_port: int, directory: str | None,
                     email: str, eab_kid: str, eab_key: str, ip_certs: bool) -> AcmeConfig:
        """Checks the flags the way an operator reads them.

        Raises:
            SettingsError: one line that says what to change.
        """
        if certmode == "gcp":
            if not eab_kid or not eab_key:
                raise SettingsError("--certmode=gcp requires --acme-eab-kid and --acme-eab-key (from "
                                    "`gcloud publicca external-account-keys create`)")
            if not email:
                raise SettingsError("--certmode=gcp requires --acme-email")
        elif bool(eab_kid) != bool(eab_key):
            raise SettingsError("--acme-eab-kid and --acme-eab-key go together; pass both or neither")
        key = decode_eab_key(eab_key) if eab_key else b""
        url = directory or (GCP_DIRECTORY if certmode == "gcp" else LETSENCRYPT_DIRECTORY)
        if not url.startswith(("https://", "http://")):
            raise SettingsError(f"--acme-directory {url!r} must be the https:// URL of the CA's ACME directory")
        host = hostname.strip()
        if is_ip(host):
            if not ip_certs:
                raise SettingsError(
                    f"--hostname {host} is an IP address: pass --acme-ip-certs for a short-lived publicly "
                    "trusted IP certificate (HTTP-01 on --http-port), or use --certmode manual for a "
                    "self-signed one with a sha256-raw: pin")
            if http_port < 0:
                raise SettingsError("--acme-ip-certs validates over HTTP-01 on --http-port; "
                                    "do not pass --http-port -1")
            challenges: tuple[str, ...] = (HTTP_01,)
        else:
            if ip_certs:
                raise SettingsError(f"--acme-ip-certs needs an IP --hostname (the public IP to certify), "
                                    f"not {host!r}")
            if host.lower() == "derp.tailscale.com":
                raise SettingsError("--hostname derp.tailscale.com (derper's default) is Tailscale's own relay; "
                                    "pass this relay's DNS name, e.g. --hostname derp.example.com")
            if "." not in host and url in (LETSENCRYPT_DIRECTORY, GCP_DIRECTORY):
                raise SettingsError(f"--hostname {host!r} cannot get a public certificate; pass the relay's "
                                    "DNS name, e.g. --hostname derp.example.com")
            challenges = (TLS_ALPN_01, HTTP_01) if http_port >= 0 else (TLS_ALPN_01,)
        check_certdir(certdir)
        return cls(hostname=host, certdir=certdir, directory=url, email=email, eab_kid=eab_kid, eab_key=key,
                   ip_cert=ip_certs, challenges=challenges)


def check_certdir(certdir: Path) -> None:
    """Creates ``certdir`` (mode 0700) and checks this process can write there.

    Raises:
        SettingsError: it cannot be created or written.
    """
    try:
        certdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=certdir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SettingsError(
            f"cannot write to --certdir {certdir} ({e.strerror or e}): ACME keeps the account key and "
            "certificates there; make it writable by this user or pass another --certdir") from e


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a new file beside ``path`` and rename it over ``path``: readers see the
    old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def renewal_due(not_before: dt.datetime, not_after: dt.datetime) -> dt.datetime:
    """When a third of the lifetime is left."""
    return not_after - (not_after - not_before) / 3


def covers(cert: x509.Certificate, hostname: str) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    if is_ip(hostname):
        return ipaddress.ip_address(hostname) in san.get_values_for_type(x509.IPAddress)
    return hostname in [n.lower() for n in san.get_values_for_type(x509.DNSName)]


def challenge_type(challb: messages.ChallengeBody) -> str:
    """The challenge's type; certbot's library knows http-01 and dns-01, not tls-alpn-01."""
    chall = challb.chall
    if isinstance(chall, challenges.UnrecognizedChallenge):
        return str(chall.jobj.get("type", "?"))
    return str(chall.typ)


def describe_failure(exc: BaseException) -> str:
    """What the CA answered (or why it could not be asked), as one line."""
    text: str
    if isinstance(exc, messages.Error):
        text = f"the CA answered {exc}"
    elif isinstance(exc, errors.ValidationError):
        parts = []
        for authzr in exc.failed_authzrs:
            for challb in authzr.body.challenges:
                if challb.error is not None:
                    parts.append(f"{challenge_type(challb)} for {authzr.body.identifier.value}: {challb.error}")
        text = "validation failed: " + "; ".join(parts or ["no detail from the CA"])
    elif isinstance(exc, errors.IssuanceError):
        text = f"the CA refused to issue: {exc.error}"
    elif isinstance(exc, errors.TimeoutError):
        text = "the CA did not finish validating and issuing within the order timeout"
    elif isinstance(exc, errors.ClientError) and exc.args and isinstance(exc.args[0], requests.Response):
        r = exc.args[0]
        text = f"the CA answered HTTP {r.status_code} {r.reason} from {r.url}: {r.text[:200]!r}"
    elif isinstance(exc, errors.ClientError) and exc.args and isinstance(exc.args[0], tuple):
        r = exc.args[0][0]
        text = f"the CA answered HTTP {r.status_code} with an unreadable problem document: {r.text[:200]!r}"
    elif isinstance(exc, errors.ClientError):
        text = f"the CA's answer is not ACME: {exc}"
    elif isinstance(exc, requests.exceptions.SSLError):
        text = (f"TLS verification of the CA failed ({exc}); for a private CA point SSL_CERT_FILE at its root")
    elif isinstance(exc, requests.exceptions.ConnectionError):
        text = f"cannot connect to the CA ({exc})"
    elif isinstance(exc, requests.exceptions.Timeout):
        text = f"the CA did not answer in time ({exc})"
    elif isinstance(exc, AcmeFailure):
        text = str(exc)
    elif isinstance(exc, (KeyError, ValueError)):
        text = f"the CA's answer is not ACME ({type(exc).__name__}: {exc})"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:600]


class AcmeFailure(Exception):
    """An attempt failed for a reason derpd itself found; the message says which."""


class TLSALPN01Response(challenges.ChallengeResponse):
    """RFC 8737 3: the client answers a tls-alpn-01 challenge with an empty JSON object
    (certbot's library has HTTP-01 but no TLS-ALPN-01 classes)."""

    typ = TLS_ALPN_01

    def __bool__(self) -> bool:  # the library sends an empty POST-as-GET for a falsy (empty) object
        return True


def _default_ca_file() -> str | bool:
    """``requests`` would use certifi's bundle; use SSL_CERT_FILE, else the system roots."""
    if env := os.environ.get("SSL_CERT_FILE"):
        return env
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, paths.capath, paths.openssl_capath):
        if candidate and os.path.exists(candidate):
            return candidate
    return True


@dataclass
class _Pending:
    lock: threading.Lock = field(default_factory=threading.Lock)
    http01: dict[str, bytes] = field(default_factory=dict)  # token -> key authorization
    tls_alpn01: dict[str, ssl.SSLContext] = field(default_factory=dict)  # name -> challenge context


class AcmeManager:
    """Obtains and renews the certificate of one hostname; answers its challenges.

    ``install`` is called (in the trio thread) after new files are in ``certdir``; it is the
    relay's TLS reload and returns True if the new certificate is in use.  ``current`` returns
    the certificate in use (its PEM path), if any.
    """

    def __init__(self, config: AcmeConfig, install: Callable[[], bool],
                 current: Callable[[], Path | None]) -> None:
        self.config = config
        self._install = install
        self._current = current
        self._pending = _Pending()
        self.base = cert_file_base(config.hostname)
        self.cert_path = config.certdir / f"{self.base}.crt"
        self.key_path = config.certdir / f"{self.base}.key"
        self.account_key_path = config.certdir / ACCOUNT_KEY_FILE
        self.issued = 0  # certificates obtained and installed
        self.failures = 0  # attempts that failed
        self.consecutive_failures = 0  # since the last success
        self.last_error: str | None = None
        self.answered: Counter[str] = Counter()  # validation requests answered, by challenge type
        self._changed = trio.Event()

    # ------------------------------------------------------------ ChallengeResponder

    def http01_response(self, token: str) -> bytes | None:
        with self._pending.lock:
            answer = self._pending.http01.get(token)
        if answer is not None:
            self.answered[HTTP_01] += 1
        return answer

    def tls_alpn01_pending(self) -> bool:
        return bool(self._pending.tls_alpn01)

    def tls_alpn01_context(self, server_name: str | None) -> ssl.SSLContext | None:
        if server_name is None:
            return None
        with self._pending.lock:
            ctx = self._pending.tls_alpn01.get(server_name.lower())
        if ctx is not None:
            self.answered[TLS_ALPN_01] += 1
        return ctx

    def offer(self, kind: str, name: str, token: str, key_authorization: str) -> tuple[str, str]:
        """Answer validations of ``kind`` for ``name``/``token`` from now on; returns the
        handle ``withdraw`` takes."""
        with self._pending.lock:
            if kind == HTTP_01:
                self._pending.http01[token] = key_authorization.encode()
                return kind, token
            self._pending.tls_alpn01[name] = tls_alpn01_context(name, key_authorization)
            return kind, name

    def withdraw(self, kind: str, key: str) -> None:
        with self._pending.lock:
            (self._pending.http01 if kind == HTTP_01 else self._pending.tls_alpn01).pop(key, None)

    # ------------------------------------------------------------ trio side

    async def wait_changed(self) -> None:
        """Returns after the next success or failure (for tests and status)."""
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def next_due(self) -> float | None:
        """Seconds until the certificate in use should be renewed (<= 0: now); None if there
        is no usable certificate for the hostname."""
        path = self._current()
        if path is None:
            return None
        try:
            leaf = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            return None
        if not covers(leaf, self.config.name):
            return None
        due = renewal_due(leaf.not_valid_before_utc, leaf.not_valid_after_utc)
        return (due - dt.datetime.now(dt.timezone.utc)).total_seconds()

    def adopt_derper_cache(self) -> bool:
        """Take over what derper's ACME client (Go's autocert) left in ``certdir``, so switching
        from derper neither orders a new certificate nor makes a new account: its account key
        ``acme_account+key`` and its ``<hostname>`` file (key and chain in one PEM).  derper's
        files are only read.  Returns True if a certificate was adopted."""
        certdir = self.config.certdir
        if not self.account_key_path.exists():
            for name in ("acme_account+key", "acme_account.key"):
                try:
                    key = serialization.load_pem_private_key((certdir / name).read_bytes(), password=None)
                except (OSError, ValueError):
                    continue
                if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1":
                    _write_atomic(self.account_key_path, key.private_bytes(
                        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption()), 0o600)
                    log.warning("using derper's ACME account key %s", certdir / name)
                    break
        if self.cert_path.exists() or self.key_path.exists():
            return False
        try:
            pem = (certdir / self.config.name).read_bytes()
            key = serialization.load_pem_private_key(pem, password=None)
            chain = x509.load_pem_x509_certificates(pem)
        except (OSError, ValueError):
            return False
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            return False
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        try:
            self._store("".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in chain), key, key_pem)
        except AcmeFailure as e:
            log.info("not using derper's certificate %s: %s", certdir / self.config.name, e)
            return False
        log.warning("using derper's cached certificate %s", certdir / self.config.name)
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a valid certificate in place forever."""
        cfg = self.config
        if self.adopt_derper_cache():
            self._install()
        task_status.started()
        backoff = cfg.backoff_min
        while True:
            wait = self.next_due()
            if wait is not None and wait > 0:
                log.info("certificate for %s valid; renewing in %.0fs", cfg.hostname, wait)
                await trio.sleep(min(wait, 3600.0))  # re-check hourly: the files may change under us
                continue
            if wait is None:  # said once at warning level; the failure lines say the rest
                log.log(logging.WARNING if self.failures == 0 else logging.INFO,
                        "no certificate for %s yet: asking the ACME CA at %s (TLS clients are refused "
                        "until one is issued)", cfg.hostname, cfg.directory)
            else:
                log.info("renewing the certificate for %s (a third of its lifetime left)", cfg.hostname)
            try:
                await self.obtain()
            except Exception as e:  # noqa: BLE001 - a CA failure must never stop the relay
                self.failures += 1
                self.consecutive_failures += 1
                self.last_error = describe_failure(e)
                still = "keeps serving the current certificate" if self._current() else "has no certificate yet"
                log.warning("ACME order for %s failed: %s; the relay %s; retrying in %gs",
                            cfg.hostname, self.last_error, still, backoff)
                self._notify()
                await trio.sleep(backoff)
                backoff = min(backoff * 2, cfg.backoff_max)
                continue
            backoff = cfg.backoff_min
            self.consecutive_failures = 0
            self._notify()

    async def obtain(self) -> None:
        """One attempt: an order per challenge type until one succeeds, then install.

        Raises:
            Exception: whatever stopped the attempt (see describe_failure).
        """
        name = self.config.hostname
        limiter, in_flight = _run_state()
        if name in in_flight:
            raise AcmeFailure(f"an order for {name} is already in flight in this process")
        in_flight.add(name)
        try:
            await trio.to_thread.run_sync(self._obtain_blocking, abandon_on_cancel=True, limiter=limiter)
        finally:
            in_flight.discard(name)
        if not self._install():
            raise AcmeFailure(f"the new certificate in {self.cert_path} could not be loaded (see the TLS log line)")
        self.issued += 1
        log.warning("ACME: certificate for %s issued by %s and in use", name, self.config.directory)

    # ------------------------------------------------------------ worker thread

    def _account_key(self) -> ec.EllipticCurvePrivateKey:
        path = self.account_key_path
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            key = ec.generate_private_key(ec.SECP256R1())
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            _write_atomic(path, pem, 0o600)
            log.info("created the ACME account key %s", path)
            return key
        except (OSError, ValueError) as e:
            raise AcmeFailure(f"cannot use the ACME account key {path} ({e}); move it away to "
                              "create a new account") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise AcmeFailure(f"{path} is not a P-256 key; move it away to create a new account")
        return key

    def _obtain_blocking(self) -> None:
        cfg = self.config
        account_key = self._account_key()
        jwk = jose.JWKEC(key=account_key)
        net = client.ClientNetwork(jwk, alg=jose.ES256, user_agent="derpd", timeout=int(cfg.network_timeout),
                                   verify_ssl=cfg.ca_file or _default_ca_file())  # type: ignore[arg-type]
        directory = client.ClientV2.get_directory(cfg.directory, net)
        for needed in ("newNonce", "newAccount", "newOrder"):
            if not isinstance(directory[needed], str):
                raise AcmeFailure(f"{cfg.directory} is not an ACME directory (no {needed})")
        ca = client.ClientV2(directory, net)
        eab = None
        if cfg.eab_kid:
            eab = messages.ExternalAccountBinding.from_data(
                account_public_key=jwk.public_key(), kid=cfg.eab_kid,
                hmac_key=jose.b64encode(cfg.eab_key).decode(), directory=directory)
        registration = messages.NewRegistration.from_data(
            email=cfg.email or None, terms_of_service_agreed=True, external_account_binding=eab)
        try:
            ca.new_account(registration)
        except errors.ConflictError as e:  # the key already has an account: use it
            net.account = messages.RegistrationResource(uri=e.location, body=messages.Registration())
        profile = cfg.profile if cfg.profile is not None else (IP_PROFILE if cfg.ip_cert else None)
        if profile:
            offered = getattr(getattr(directory, "meta", None), "profiles", None) or {}
            if profile not in offered:
                raise AcmeFailure(f"the CA does not offer the {profile!r} profile "
                                  f"(it offers: {', '.join(offered) or 'none'})")
        cert_key = ec.generate_private_key(ec.SECP256R1())
        key_pem = cert_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
        if cfg.ip_cert:
            csr = crypto_util.make_csr(key_pem, ipaddrs=[ipaddress.ip_address(cfg.hostname)])
        else:
            csr = crypto_util.make_csr(key_pem, domains=[cfg.name])
        thumbprint = jose.b64encode(jwk.public_key().thumbprint(hash_function=hashes.SHA256)).decode()
        last: Exception | None = None
        for kind in cfg.challenges:
            try:
                fullchain = self._one_order(ca, csr, profile, kind, thumbprint)
            except (errors.ValidationError, AcmeFailure) as e:
                last = e  # this challenge type did not work; try the next one with a new order
                log.info("ACME %s for %s failed: %s", kind, cfg.hostname, describe_failure(e))
                continue
            self._store(fullchain, cert_key, key_pem)
            return
        assert last is not None
        raise last

    def _one_order(self, ca: client.ClientV2, csr: bytes, profile: str | None, kind: str, thumbprint: str) -> str:
        cfg = self.config
        orderr = ca.new_order(csr, profile=profile)
        registered: list[tuple[str, str]] = []  # offer() handles, withdrawn whatever happens
        try:
            for authzr in orderr.authorizations:
                if authzr.body.status == messages.STATUS_VALID:
                    continue
                ident = authzr.body.identifier.value.lower()
                challb = next((c for c in authzr.body.challenges if challenge_type(c) == kind), None)
                if challb is None:
                    offered = ", ".join(challenge_type(c) for c in authzr.body.challenges)
                    raise AcmeFailure(f"the CA offers no {kind} challenge for {ident} (it offers: {offered})")
                token = str(challb.chall.to_partial_json().get("token", ""))
                if not token or not all(ch.isalnum() or ch in "-_" for ch in token):
                    raise AcmeFailure(f"the CA sent a malformed {kind} token")
                key_authorization = f"{token}.{thumbprint}"
                registered.append(self.offer(kind, ident, token, key_authorization))
                response: challenges.ChallengeResponse = (
                    challenges.HTTP01Response(key_authorization=key_authorization) if kind == HTTP_01
                    else TLSALPN01Response())
                # ClientV2.answer_challenge insists on a Link "up" header that RFC 8555 does not
                # require (Pebble sends none); the POST itself is all the CA needs.
                ca.net.post(challb.uri, response, new_nonce_url=ca.directory["newNonce"])
            deadline = dt.datetime.now() + dt.timedelta(seconds=cfg.order_timeout)
            orderr = ca.poll_and_finalize(orderr, deadline)
        finally:
            for offered in registered:
                self.withdraw(*offered)
        return str(orderr.fullchain_pem)

    def _store(self, fullchain: str, cert_key: ec.EllipticCurvePrivateKey, key_pem: bytes) -> None:
        """Check the chain, then replace the key and certificate files (each atomically)."""
        try:
            chain = x509.load_pem_x509_certificates(fullchain.encode())
        except ValueError as e:
            raise AcmeFailure(f"the CA's certificate is not PEM ({e})") from e
        leaf = chain[0]
        if not covers(leaf, self.config.name):
            raise AcmeFailure(f"the CA's certificate does not name {self.config.name}")
        ours = cert_key.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
        theirs = leaf.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
        if ours != theirs:
            raise AcmeFailure("the CA's certificate is for another key")
        _write_atomic(self.key_path, key_pem, 0o600)
        _write_atomic(self.cert_path, "".join(
            c.public_bytes(serialization.Encoding.PEM).decode() for c in chain).encode(), 0o644)
        log.info("wrote %s (valid until %s) and %s", self.cert_path, leaf.not_valid_after_utc.isoformat(),
                 self.key_path)


class AcmeCollector(Collector):
    """The ACME client's Prometheus metrics (the certificate's expiry is the relay's
    ``derp_tls_cert_not_after_seconds``)."""

    def __init__(self, manager: AcmeManager) -> None:
        self._m = manager

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        m = self._m
        orders = CounterMetricFamily("derp_acme_attempts", "ACME attempts to obtain a certificate, by result.",
                                     labels=["result"])
        orders.add_metric(["ok"], m.issued)
        orders.add_metric(["error"], m.failures)
        yield orders
        yield GaugeMetricFamily("derp_acme_consecutive_failures",
                                "Failed ACME attempts since the last success (0: fine).",
                                value=m.consecutive_failures)
        answered = CounterMetricFamily("derp_acme_validations_answered",
                                       "CA validation requests answered, by challenge type.", labels=["challenge"])
        for kind in (TLS_ALPN_01, HTTP_01):
            answered.add_metric([kind], m.answered[kind])
        yield answered


async def start_acme(server: RelayServer, config: AcmeConfig, nursery: trio.Nursery) -> AcmeManager:
    """Attach an ACME client to a running relay: it answers the relay's challenge requests,
    installs certificates through the relay's TLS reload and adds its metrics."""
    manager = AcmeManager(config, server.reload_tls,
                          lambda: server.cert.cert_path if server.cert is not None else None)
    server.challenges = manager
    server.metrics_registry.register(AcmeCollector(manager))
    await nursery.start(manager.run)
    return manager
