"""``derpd doctor URL``: walk what an operator checks by hand on a relay, one line per check.

Each check returns a ``Finding`` (ok, warn, fail or skip, and a text that says what was seen
and, unless ok, what to do).  Every network step runs under ``timeout`` and every error
becomes the failing line of its check: the doctor never hangs and never raises.  The
checks, in order:

* dns: the URL's host resolves (an IP needs no lookup);
* connect: TCP to the relay port;
* tls: the chain is trusted for the name (system roots or ``--ca-file``), or the leaf
  matches the ``sha256-raw:`` pin with no intermediate (spec 11.1); days to expiry;
* upgrade: ``GET /derp`` with ``Upgrade: DERP`` answers 101 and the server's key;
* fast start: TLS 1.3 and a meta-certificate naming that key (spec 11.2);
* websocket: ``GET /derp`` with ``Upgrade: websocket`` answers 101 with the ``derp`` subprotocol;
* stun: a Binding request over UDP answers with our reflexive address and port;
* port 80: ``/generate_204`` on the plain-HTTP port answers 204 with the challenge echoed;
* clock: the relay's HTTP ``Date`` against ours;
* key: a given key logs in (admitted), or why not (the relay's ``derp_admission_refused``
  counter names the reason when its metrics are readable); a public key alone is looked up
  among the connected clients with the mesh key;
* mesh: with the mesh key, the mesh peers connected to this node (WatchConns);
* coordinator: the node (host and port) is in each coordinator's published map.

Dependencies: uses ``derpd.client``, ``derpd.check`` (HTTP helpers, failure texts),
``derpd.coordinator.httpclient`` and ``stund.client``; only ``derpd.cli`` imports it.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
import json
import socket
import ssl
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import trio

from . import client as derp_client
from .check import explain_failure, host_header, http_exchange, open_stream, scrape_counters
from .keys import KeyFormatError, NodePrivate, NodePublic
from .protocol.errors import RemoteProtocolError
from .protocol.frames import PROTOCOL_VERSION, PeerPresentFlags
from .protocol.handshake import NEED_DATA, ClientHandshake, ServerKeyReceived
from .protocol.messages import ClientInfo, PeerPresent
from .settings import is_ip

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
EXPIRY_WARN_DAYS = 14  # an ACME certificate is renewed 30 days ahead: 14 left means renewal is failing
SKEW_WARN = 5.0  # seconds
SKEW_FAIL = 60.0
MAX_PRESENT = 100_000  # PeerPresent frames kept from one WatchConns flood
PRESENT_QUIET = 0.2  # seconds to wait after the Pong for a late part of the WatchConns flood

_CONNECT_ERRORS = (OSError, trio.TooSlowError, trio.BrokenResourceError, derp_client.DerpClientError,
                   RemoteProtocolError, ssl.SSLError)


@dataclass(frozen=True)
class Finding:
    check: str
    status: str  # ok, warn, fail, skip
    text: str

    def line(self) -> str:
        return f"{self.status:<4}  {self.check:<11} {self.text}"


@dataclass
class DoctorOptions:
    url: str  # DERP URL (http, https, ws, wss)
    timeout: float = 5.0  # per network step
    ca_file: str | None = None
    cert_pin: str | None = None
    server_name: str | None = None
    http_port: int = 80  # -1: not checked
    stun_port: int = 3478  # -1: not checked
    key: NodePrivate | NodePublic | None = None
    mesh_key: bytes | None = None
    coordinators: list[str] = field(default_factory=list)
    metrics_url: str | None = None


@dataclass
class _State:
    """What earlier checks learned, for later ones."""

    host: str = ""
    port: int = 0
    tls: bool = False
    reachable: bool = True
    server_key: NodePublic | None = None
    tls_version: str | None = None
    chain: list[bytes] = field(default_factory=list)  # DER, as served (leaf first)
    date_seen: float | None = None  # skew from a Date header seen on the way (seconds)


class KeyArgError(ValueError):
    """``--key`` names neither a key nor a readable key file."""


def parse_key_arg(text: str) -> NodePrivate | NodePublic:
    """``nodekey:<hex>``, ``privkey:<hex>``, or a file holding one of them or derper's JSON
    key file (``{"PrivateKey": "privkey:..."}``).

    Raises:
        KeyArgError: unreadable file or no key in it.
    """
    source = text.strip()
    if not source.startswith(("nodekey:", "privkey:")):
        try:
            source = Path(text).read_text().strip()
        except OSError as e:
            raise KeyArgError(f"--key {text!r}: cannot read it ({e.strerror or e}); give nodekey:<hex>, "
                              "privkey:<hex> or a key file") from None
        if source.startswith("{"):
            try:
                source = str(json.loads(source).get("PrivateKey", ""))
            except (ValueError, AttributeError):
                source = ""
    try:
        if source.startswith("nodekey:"):
            return NodePublic.parse(source)
        return NodePrivate.parse(source)
    except KeyFormatError:
        raise KeyArgError(f"--key {text!r}: no nodekey:<64 hex> or privkey:<64 hex> (nor derper's JSON key "
                          "file) found") from None


def _why(exc: BaseException, url: str, opts: DoctorOptions) -> str:
    return explain_failure(exc, url, server_name=opts.server_name)


def _der_certs(chain: list[bytes]) -> list[object]:
    from cryptography import x509

    out = []
    for der in chain:
        try:
            out.append(x509.load_der_x509_certificate(der))
        except ValueError:
            out.append(None)
    return out


def _common_name(cert: object) -> str:
    from cryptography.x509.oid import NameOID

    try:
        with warnings.catch_warnings():  # the meta-certificate's 71-character CN is over X.509's usual bound
            warnings.simplefilter("ignore", UserWarning)
            attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)  # type: ignore[attr-defined]
        return str(attrs[0].value) if attrs else ""
    except (ValueError, AttributeError):
        return ""


def _peer_chain(obj: ssl.SSLObject) -> list[bytes]:
    """The certificates the server sent, DER, leaf first (Python 3.13 has this in public;
    before, the C object under the SSLObject has it)."""
    getter = getattr(obj, "get_unverified_chain", None) or getattr(getattr(obj, "_sslobj", None),
                                                                   "get_unverified_chain", None)
    leaf = obj.getpeercert(binary_form=True)
    if getter is None:
        return [leaf] if leaf else []
    out = []
    for cert in getter() or []:
        if isinstance(cert, bytes):
            out.append(cert)
        else:
            out.append(ssl.PEM_cert_to_DER_cert(cert.public_bytes()))
    return out or ([leaf] if leaf else [])


async def _tls_handshake(host: str, port: int, ctx: ssl.SSLContext, sni: str | None) -> ssl.SSLObject:
    """A TLS handshake driven over a trio socket; returns the SSLObject (the socket is closed)."""
    stream = await trio.open_tcp_stream(host, port)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pending = outgoing.read()
                if pending:
                    await stream.send_all(pending)
                data = await stream.receive_some(65536)
                if not data:
                    raise derp_client.DerpClientError(f"{host}:{port} closed the connection during the TLS "
                                                      "handshake") from None
                incoming.write(data)
    finally:
        await trio.aclose_forcefully(stream)
    return obj


def _days(delta: dt.timedelta) -> str:
    days = delta.total_seconds() / 86400
    return f"{days:.0f} days" if abs(days) >= 2 else f"{delta.total_seconds() / 3600:.0f} hours"


def check_url(url: str) -> str:
    """The DERP URL the doctor examines: ``HOST`` alone means ``https://HOST/derp``.

    Raises:
        ValueError: not an http(s):// or ws(s):// URL with a host and a valid port.
    """
    full = url if "://" in url else f"https://{url}/derp"
    bad = ValueError(f"{url!r} is not a relay URL: give https://HOST[:PORT]/derp (or http://, ws://, wss://), "
                     "or just HOST")
    try:
        parts = urlsplit(full)
        parts.port  # noqa: B018 - raises ValueError when out of range
    except ValueError:
        raise bad from None
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
        raise bad
    return full


class Doctor:
    def __init__(self, opts: DoctorOptions) -> None:
        """Raises ValueError for a URL that is not a relay URL (``check_url``)."""
        self.opts = opts
        self.url = url = check_url(opts.url)
        parts = urlsplit(url)
        self.s = _State()
        self.s.tls = parts.scheme in ("https", "wss")
        self.s.host = parts.hostname or ""
        self.s.port = parts.port or (443 if self.s.tls else 80)
        self.path = parts.path or "/derp"
        self.derp_url = f"{'https' if self.s.tls else 'http'}://{parts.netloc}{self.path}"

    # ------------------------------------------------------------------ plumbing

    def _connect_options(self) -> dict[str, object]:
        o = self.opts
        if o.cert_pin:
            return {"cert_pin": o.cert_pin, "server_name": o.server_name}
        return {"ssl_context": derp_client.make_ssl_context(insecure=True), "server_name": o.server_name}

    async def _relay_stream(self) -> trio.abc.Stream:
        return await open_stream(self.s.host, self.s.port, tls=self.s.tls, server_name=self.opts.server_name)

    def _note_date(self, headers: dict[str, str], sent: float, received: float) -> None:
        date = headers.get("date")
        if date and self.s.date_seen is None:
            try:
                theirs = email.utils.parsedate_to_datetime(date).timestamp()
            except (TypeError, ValueError):
                return
            self.s.date_seen = theirs - (sent + received) / 2

    async def run(self, report: Callable[[Finding], Awaitable[None] | None] | None = None) -> list[Finding]:
        checks: list[tuple[str, Callable[[], Awaitable[Finding]], bool]] = [
            ("dns", self.check_dns, False),
            ("connect", self.check_connect, False),
            ("tls", self.check_tls, True),
            ("upgrade", self.check_upgrade, True),
            ("fast start", self.check_fast_start, True),
            ("websocket", self.check_websocket, True),
            ("stun", self.check_stun, False),
            ("port 80" if self.opts.http_port in (80, -1) else f"port {self.opts.http_port}", self.check_port80,
             False),
            ("clock", self.check_clock, False),
            ("key", self.check_key, True),
            ("mesh", self.check_mesh, True),
        ]
        for c in self.opts.coordinators:
            checks.append(("coordinator", lambda c=c: self.check_coordinator(c), False))
        out = []
        for name, fn, needs_relay in checks:
            if needs_relay and not self.s.reachable:
                finding = Finding(name, SKIP, "not checked: the relay port does not answer (see above)")
            else:
                finding = await self._guarded(name, fn)
            out.append(finding)
            if report is not None:
                maybe = report(finding)
                if maybe is not None:
                    await maybe
        return out

    async def _guarded(self, name: str, fn: Callable[[], Awaitable[Finding]]) -> Finding:
        """Runs one check; any error or an overrun of the step's time becomes its failing line."""
        # A check takes a few steps, each bounded by its own timeout inside; this bounds the sum.
        with trio.move_on_after(self.opts.timeout * 4) as scope:
            try:
                return await fn()
            except trio.TooSlowError:
                return Finding(name, FAIL, f"no answer within {self.opts.timeout:g}s: is the relay overloaded, or "
                                           "another program (or a proxy) listening there?")
            except Exception as e:  # noqa: BLE001 - the doctor reports, it never raises
                text = _why(e, self.derp_url, self.opts)
                return Finding(name, FAIL, text if text else type(e).__name__)
        assert scope.cancelled_caught
        return Finding(name, FAIL, f"did not finish within {self.opts.timeout * 4:g}s")

    # ------------------------------------------------------------------ the checks

    async def check_dns(self) -> Finding:
        host = self.s.host
        if not host:
            return Finding("dns", FAIL, f"{self.opts.url!r} has no host; give https://HOST[:PORT]/derp")
        if is_ip(host):
            return Finding("dns", OK, f"{host} is an IP address: no lookup needed")
        try:
            with trio.fail_after(self.opts.timeout):
                infos = await trio.socket.getaddrinfo(host, self.s.port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            self.s.reachable = False
            return Finding("dns", FAIL, f"{host} does not resolve ({e.strerror}); add its A/AAAA record, or fix "
                                        "the host in the URL")
        addrs = sorted({str(i[4][0]) for i in infos})
        v4 = any(":" not in a for a in addrs)
        text = f"{host} -> {', '.join(addrs[:4])}{' ...' if len(addrs) > 4 else ''}"
        if not v4:
            return Finding("dns", WARN, text + "; no IPv4 address: clients on IPv4-only networks cannot reach it "
                                               "(add an A record)")
        return Finding("dns", OK, text)

    async def check_connect(self) -> Finding:
        if not self.s.reachable:
            return Finding("connect", SKIP, "not checked: no address")
        start = time.monotonic()
        try:
            with trio.fail_after(self.opts.timeout):
                stream = await trio.open_tcp_stream(self.s.host, self.s.port)
        except (OSError, trio.TooSlowError) as e:
            self.s.reachable = False
            return Finding("connect", FAIL, _why(e, self.derp_url, self.opts))
        await trio.aclose_forcefully(stream)
        return Finding("connect", OK, f"TCP {self.s.host}:{self.s.port} accepts connections "
                                      f"({(time.monotonic() - start) * 1000:.1f} ms)")

    async def check_tls(self) -> Finding:
        o = self.opts
        if not self.s.tls:
            return Finding("tls", SKIP, "http:// URL: no TLS to check (clients need TLS unless the DERP map "
                                        "sets InsecureForTests)")
        sni = o.server_name or (None if is_ip(self.s.host) else self.s.host)
        with trio.fail_after(o.timeout):
            obj = await _tls_handshake(self.s.host, self.s.port, derp_client.make_ssl_context(insecure=True), sni)
        self.s.tls_version = obj.version()
        self.s.chain = _peer_chain(obj)
        certs = _der_certs(self.s.chain)
        real = [(der, c) for der, c in zip(self.s.chain, certs) if not _common_name(c).startswith("derpkey")]
        if not real or real[0][1] is None:
            return Finding("tls", FAIL, "the server sent no usable certificate")
        leaf_der, leaf = real[0]
        pin = "sha256-raw:" + hashlib.sha256(leaf_der).hexdigest()
        now = dt.datetime.now(dt.timezone.utc)
        not_after = leaf.not_valid_after_utc  # type: ignore[attr-defined]
        not_before = leaf.not_valid_before_utc  # type: ignore[attr-defined]
        left = not_after - now
        when = f"expires {not_after:%Y-%m-%d} (in {_days(left)})"
        if o.cert_pin:
            if pin != o.cert_pin:
                return Finding("tls", FAIL, f"the certificate does not match the pin: the server has {pin}; put "
                                            "that in the DERP map's CertName (or serve the pinned certificate)")
            if len(real) > 1:
                return Finding("tls", FAIL, f"the pin matches, but the server sends {len(real)} certificates: "
                                            "pinned clients accept only the leaf (and the meta-certificate); "
                                            "serve the leaf alone")
            how = "the leaf matches the pin"
        else:
            name = o.server_name or self.s.host
            ctx = ssl.create_default_context()  # the system roots, as Go clients use, and the CA file too
            if o.ca_file:
                ctx.load_verify_locations(cafile=o.ca_file)
            try:
                with trio.fail_after(o.timeout):
                    await _tls_handshake(self.s.host, self.s.port, ctx, name)
            except ssl.SSLCertVerificationError as e:
                return Finding("tls", FAIL, f"not trusted for {name!r} ({e.verify_message or e.reason}); "
                                            f"use a certificate from a public CA for that name, or pin this one "
                                            f"in the DERP map: CertName {pin} (then --cert-pin here)")
            how = f"trusted for {name!r}" + (" (by --ca-file)" if o.ca_file else "")
        if left.total_seconds() <= 0:
            return Finding("tls", FAIL, f"{how}, but it expired {not_after:%Y-%m-%d} ({_days(-left)} ago): "
                                        "clients refuse it; renew it (derpd reloads a replaced file within 30 s)")
        if not_before > now + dt.timedelta(minutes=5):
            return Finding("tls", FAIL, f"{how}, but it is valid only from {not_before:%Y-%m-%d %H:%M} UTC: is "
                                        "this machine's or the relay's clock wrong?")
        text = f"{how}, {self.s.tls_version}, {when}"
        if left < dt.timedelta(days=EXPIRY_WARN_DAYS):
            return Finding("tls", WARN, text + "; renew it now (an ACME certificate renews 30 days ahead: "
                                               "look for renewal errors in the relay's log)")
        return Finding("tls", OK, text)

    async def check_upgrade(self) -> Finding:
        o = self.opts
        start = time.monotonic()
        with trio.fail_after(o.timeout):
            stream = await self._relay_stream()
            try:
                sent = time.time()
                answer = await http_exchange(stream, host_header(self.s.host, self.s.port, self.s.tls), self.path,
                                             [("Connection", "Upgrade"), ("Upgrade", "DERP")])
                self._note_date(answer.headers, sent, time.time())
                if answer.status != 101:
                    return Finding("upgrade", FAIL, self._not_101(answer.status, "DERP"))
                hs = ClientHandshake(NodePrivate.generate(), ClientInfo())
                if answer.rest:
                    hs.receive_data(answer.rest)
                while True:
                    event = hs.next_event()
                    if isinstance(event, ServerKeyReceived):
                        break
                    if event is NEED_DATA:
                        data = await stream.receive_some(65536)
                        if not data:
                            return Finding("upgrade", FAIL, "101, then the connection closed before the server's "
                                                            "key: is it a DERP relay behind that path?")
                        hs.receive_data(data)
            finally:
                await trio.aclose_forcefully(stream)
        self.s.server_key = event.key
        return Finding("upgrade", OK, f"GET {self.path} -> 101 Switching Protocols and the server key "
                                      f"{event.key} ({(time.monotonic() - start) * 1000:.1f} ms)")

    def _not_101(self, status: int, what: str) -> str:
        hint = {
            404: "the relay answers 404 at that path: is DERP off (--derp=false), the path wrong, or a proxy "
                 "routing it elsewhere?",
            426: "the upgrade was refused (426): a proxy in front drops the Upgrade and Connection headers; "
                 "pass them through (or route TCP/TLS straight to the relay)",
            400: "the relay rejected the request (400): a proxy in front rewrites it; pass the upgrade through "
                 "untouched",
        }
        text = hint.get(status, f"the server answered HTTP {status}: a proxy or another server answers there, "
                                "not the relay")
        return f"{what} upgrade: no 101; {text}"

    async def check_fast_start(self) -> Finding:
        if not self.s.tls:
            return Finding("fast start", SKIP, "needs TLS: the meta-certificate travels in the TLS chain")
        if not self.s.chain:
            return Finding("fast start", SKIP, "not checked: no certificate chain (see tls)")
        metas = [c for c in _der_certs(self.s.chain) if _common_name(c).startswith("derpkey")]
        if not metas:
            return Finding("fast start", WARN, "no meta-certificate in the chain: every login takes an extra round "
                                               "trip; if TLS ends at a proxy in front, pass TLS through to the "
                                               "relay (an SNI router) instead")
        meta = metas[0]
        hexkey = _common_name(meta)[len("derpkey"):]
        try:
            key = NodePublic.from_hex(hexkey)
        except (KeyFormatError, ValueError):
            return Finding("fast start", FAIL, f"the meta-certificate's name {_common_name(meta)!r} holds no key: "
                                               "clients cannot fast-start")
        if self.s.server_key is not None and key != self.s.server_key:
            return Finding("fast start", FAIL, f"the meta-certificate names {key.short()} but the relay is "
                                               f"{self.s.server_key.short()}: clients that fast-start fail to log "
                                               "in; is a proxy serving another node's chain?")
        serial = meta.serial_number  # type: ignore[attr-defined]
        if serial != PROTOCOL_VERSION:
            return Finding("fast start", WARN, f"the meta-certificate says protocol version {serial}, not "
                                               f"{PROTOCOL_VERSION}")
        if self.s.tls_version != "TLSv1.3":
            return Finding("fast start", WARN, f"meta-certificate present, but {self.s.tls_version} was "
                                               "negotiated: clients fast-start only over TLS 1.3")
        return Finding("fast start", OK, f"TLS 1.3 and a meta-certificate naming {key.short()}: clients skip a "
                                         "round trip at login")

    async def check_websocket(self) -> Finding:
        with trio.fail_after(self.opts.timeout):
            stream = await self._relay_stream()
            try:
                answer = await http_exchange(stream, host_header(self.s.host, self.s.port, self.s.tls), self.path, [
                    ("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13"),
                    ("Sec-WebSocket-Key", "ZGVycGQtZG9jdG9yLWtleQ=="), ("Sec-WebSocket-Protocol", "derp")])
            finally:
                await trio.aclose_forcefully(stream)
        if answer.status != 101:
            return Finding("websocket", FAIL, self._not_101(answer.status, "WebSocket")
                           + " (browser and WebSocket-only clients cannot connect)")
        proto = answer.headers.get("sec-websocket-protocol", "")
        if proto.strip().lower() != "derp":
            return Finding("websocket", FAIL, f"101, but with subprotocol {proto!r} instead of 'derp'")
        return Finding("websocket", OK, f"GET {self.path} over WebSocket -> 101 with the derp subprotocol")

    async def check_stun(self) -> Finding:
        from stund.client import StunError, stun_query

        port = self.opts.stun_port
        if port < 0:
            return Finding("stun", SKIP, "not checked (--stun-port -1)")
        where = f"UDP {self.s.host}:{port}"
        try:
            with trio.fail_after(self.opts.timeout + 1):
                got = await stun_query(self.s.host, port, timeout=self.opts.timeout)
        except (StunError, OSError) as e:
            return Finding("stun", FAIL, f"{where}: {e}; clients cannot learn their public "
                                         "address and relay what could go direct; run STUN (derpd serve --stun "
                                         f"--stun-port {port}) and open UDP {port} in the firewall")
        ip, p = got.address
        shown = f"[{ip}]:{p}" if ":" in ip else f"{ip}:{p}"
        return Finding("stun", OK, f"{where} answers: our reflexive address is {shown} "
                                   f"({got.rtt * 1000:.1f} ms)")

    async def check_port80(self) -> Finding:
        port = self.opts.http_port
        name = "port 80" if port in (80, -1) else f"port {port}"
        if port < 0:
            return Finding(name, SKIP, "not checked (--http-port -1)")
        where = f"http://{host_header(self.s.host, port, False)}/generate_204"
        try:
            with trio.fail_after(self.opts.timeout):
                stream = await open_stream(self.s.host, port, tls=False)
                try:
                    sent = time.time()
                    answer = await http_exchange(stream, host_header(self.s.host, port, False), "/generate_204",
                                                 [("X-Tailscale-Challenge", "doctor")])
                    self._note_date(answer.headers, sent, time.time())
                finally:
                    await trio.aclose_forcefully(stream)
        except (OSError, derp_client.DerpClientError, trio.BrokenResourceError) as e:
            return Finding(name, FAIL, f"{where}: {_why(e, where, self.opts)}; clients' captive-portal check and "
                                       f"ACME HTTP-01 need it: serve it (derpd serve --http-port {port}) and open "
                                       f"TCP {port}")
        if answer.status != 204:
            return Finding(name, FAIL, f"{where} answered {answer.status}, not 204: another server holds port "
                                       f"{port}; give it to the relay (--http-port)")
        if answer.headers.get("x-tailscale-response") != "response doctor":
            return Finding(name, WARN, f"{where} answers 204 but does not echo X-Tailscale-Challenge: clients' "
                                       "captive-portal check may take it for a portal")
        return Finding(name, OK, f"{where} answers 204 with the challenge echoed")

    async def check_clock(self) -> Finding:
        if self.s.date_seen is None and self.s.reachable:
            with trio.fail_after(self.opts.timeout):
                stream = await self._relay_stream()
                try:
                    sent = time.time()
                    answer = await http_exchange(stream, host_header(self.s.host, self.s.port, self.s.tls), "/",
                                                 head_only=True)
                    self._note_date(answer.headers, sent, time.time())
                finally:
                    await trio.aclose_forcefully(stream)
        skew = self.s.date_seen
        if skew is None and not self.s.reachable:
            return Finding("clock", SKIP, "not checked: no HTTP answer from the relay (see above)")
        if skew is None:
            return Finding("clock", WARN, "the relay sent no Date header: its clock cannot be compared")
        ahead = "ahead of" if skew > 0 else "behind"
        text = f"the relay's clock is {abs(skew):.0f} s {ahead} ours (HTTP Date)"
        if abs(skew) >= SKEW_FAIL:
            return Finding("clock", FAIL, text + ": certificates, ACME and the coordinator's heartbeats go wrong; "
                                                 "run NTP (chrony or systemd-timesyncd) on the relay, or on this "
                                                 "machine if it is the one off")
        if abs(skew) >= SKEW_WARN:
            return Finding("clock", WARN, text + "; check NTP on both machines")
        return Finding("clock", OK, f"the relay's clock agrees with ours within {max(abs(skew), 1):.0f} s")

    async def check_key(self) -> Finding:
        key = self.opts.key
        if key is None:
            return Finding("key", SKIP, "pass --key (a client's privkey or key file) to see whether it is admitted")
        if isinstance(key, NodePublic):
            if self.opts.mesh_key is None:
                return Finding("key", SKIP, f"{key.short()}: a public key cannot log in; pass the private key "
                                            "(file) to test admission, or --mesh-psk-file to see it connected")
            present = await self._present()
            if isinstance(present, Finding):
                return Finding("key", present.status, present.text)
            for p in present:
                if p.peer == key:
                    return Finding("key", OK, f"{key} is connected to this node now (from "
                                              f"{p.ip}:{p.port}), so it is admitted")
            return Finding("key", WARN, f"{key} is not connected to this node now; pass its private key (file) to "
                                        "test whether it is admitted")
        before = await self._admission_counters()
        try:
            with trio.fail_after(self.opts.timeout):
                async with derp_client.connect(self.derp_url, key, timeout=self.opts.timeout,
                                               **self._connect_options()):  # type: ignore[arg-type]
                    pass
        except derp_client.LoginRefused:
            return Finding("key", FAIL, f"{key.public} is refused: {await self._refusal(before)}")
        return Finding("key", OK, f"{key.public} is admitted (it logged in)")

    async def _admission_counters(self) -> dict[str, float] | str:
        with trio.move_on_after(self.opts.timeout):
            got = await scrape_counters(self.derp_url, metrics_url=self.opts.metrics_url, timeout=self.opts.timeout,
                                        ssl_context=derp_client.make_ssl_context(insecure=True),
                                        server_name=self.opts.server_name)
            if isinstance(got, str):
                return got
            return {k: v for k, v in got[1].items() if k.startswith("derp_admission_refused_total{")}
        return "no answer in time"

    async def _refusal(self, before: dict[str, float] | str) -> str:
        why = {
            "not_allowed": "it is not in the relay's --allow-keys file; add the line nodekey:<hex> there (the "
                           "relay re-reads it when it changes)",
            "verify_denied": "the --verify-client-url endpoint (headscale's /verify) answered Allow false: is the "
                             "node registered with that control server?",
            "verify_status": "the --verify-client-url endpoint answered an error status; check it and its log",
            "verify_bad_response": "the --verify-client-url endpoint answered something that is not its JSON",
            "verify_unreachable": "the --verify-client-url endpoint is unreachable and admission fails closed",
            "admission_busy_source": "too many logins from this address wait for admission; try again",
            "admission_busy_key": "too many logins of this key wait for admission; try again",
        }
        after = await self._admission_counters()
        if isinstance(before, dict) and isinstance(after, dict):
            moved = [k for k, v in after.items() if v > before.get(k, 0.0)]
            for k in moved:
                reason = k.split("reason=", 1)[-1].rstrip("}")
                return f"{why.get(reason, reason)} (derp_admission_refused_total reason {reason})"
        note = after if isinstance(after, str) else before if isinstance(before, str) else ""
        return ("admission (--allow-keys, --verify-client-url or --verify-clients) does not admit it; the reason "
                "is counted in derp_admission_refused_total on the relay's /metrics"
                + (f" (not readable from here: {note})" if note else ""))

    async def _present(self) -> list[PeerPresent] | Finding:
        """Everyone connected to this node, as the WatchConns flood of a mesh login tells."""
        assert self.opts.mesh_key is not None
        me = NodePrivate.generate()
        refused = Finding("mesh", FAIL, "the relay closed the connection on WatchConns: it does not take this mesh "
                                        "key (it has another one, or none); use the region's --mesh-psk-file on "
                                        "every node")
        seen: list[PeerPresent] = []
        closed = False
        try:
            with trio.fail_after(self.opts.timeout * 2):
                async with derp_client.connect(self.derp_url, me, mesh_key=self.opts.mesh_key,
                                               timeout=self.opts.timeout,
                                               **self._connect_options()) as c:  # type: ignore[arg-type]
                    async with trio.open_nursery() as nursery:
                        async def read() -> None:
                            nonlocal closed
                            try:
                                async for ev in c:
                                    if isinstance(ev, PeerPresent) and ev.peer != me.public:
                                        seen.append(ev)
                                        if len(seen) >= MAX_PRESENT:  # a relay flooding us gets no more memory
                                            break
                            except (RemoteProtocolError, trio.BrokenResourceError):
                                pass
                            closed = len(seen) < MAX_PRESENT
                            nursery.cancel_scope.cancel()

                        nursery.start_soon(read)
                        await c.watch_conns()
                        # The relay queues the flood before the Pong; the quiet period covers relays that do not.
                        await c.ping(timeout=self.opts.timeout)
                        await trio.sleep(PRESENT_QUIET)
                        nursery.cancel_scope.cancel()
        except derp_client.LoginRefused:
            return Finding("mesh", FAIL, "the relay refused the login with this mesh key: it is not the region's "
                                         "key (compare the --mesh-psk-file of every node)")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return refused
        if closed:
            return refused
        return seen

    async def check_mesh(self) -> Finding:
        if self.opts.mesh_key is None:
            return Finding("mesh", SKIP, "pass --mesh-psk-file (the region's mesh key) to list the mesh peers")
        present = await self._present()
        if isinstance(present, Finding):
            return present
        peers = [p for p in present if p.flags & PeerPresentFlags.IS_MESH_PEER]
        clients = len(present) - len(peers)
        if not peers:
            return Finding("mesh", WARN, f"no mesh peer is connected to this node ({clients} clients are): the "
                                         "other nodes of the region need it in --mesh-with and the same "
                                         "--mesh-psk-file (a node alone in its region needs neither)")
        names = ", ".join(f"{p.peer.short()} from {p.ip}:{p.port}" for p in peers[:8])
        return Finding("mesh", OK, f"{len(peers)} mesh peer{'s' if len(peers) > 1 else ''} connected: {names}"
                                   f"{' ...' if len(peers) > 8 else ''} ({clients} clients)")

    async def check_coordinator(self, coordinator: str) -> Finding:
        from .coordinator.announce import registration_url
        from .coordinator.httpclient import HTTPError, client_ssl_context, request

        base = registration_url(coordinator)[: -len("/v1/nodes")]
        map_url = base + "/derpmap/default"
        try:
            with trio.fail_after(self.opts.timeout):
                answer = await request(map_url, ssl_context=client_ssl_context(cafile=self.opts.ca_file))
        except HTTPError as e:
            return Finding("coordinator", FAIL, f"{map_url}: {e}; is the coordinator up and the URL right?")
        if answer.status != 200:
            return Finding("coordinator", FAIL, f"{map_url} answered HTTP {answer.status}, not the map")
        try:
            regions = json.loads(answer.body)["Regions"]
            nodes = [(r, n) for r in regions.values() for n in r.get("Nodes") or []]
        except (ValueError, KeyError, TypeError, AttributeError):
            return Finding("coordinator", FAIL, f"{map_url} is not a DERP map: is {coordinator} the "
                                                "coordinator's URL?")
        host, port = self.s.host, self.s.port
        for region, node in nodes:
            names = {node.get("HostName"), node.get("IPv4"), node.get("IPv6")}
            node_port = int(node.get("DERPPort") or 443)
            if host in names and node_port == port:
                return Finding("coordinator", OK, f"{base}: published as node {node.get('Name')!r} in region "
                                                  f"{region.get('RegionID')} ({region.get('RegionCode', '')})")
        return Finding("coordinator", FAIL, f"{base}: {host}:{port} is not in its published map ({len(nodes)} nodes): "
                                            "start the node with --coordinator and --coordinator-token-file, and "
                                            f"see {base}/status for why it is missing (a failing probe, a wrong "
                                            "token in the node's log)")


async def run_doctor(opts: DoctorOptions,
                     report: Callable[[Finding], Awaitable[None] | None] | None = None) -> list[Finding]:
    """Every check in order; ``report`` sees each finding as soon as it is made."""
    return await Doctor(opts).run(report)


__all__ = ["Doctor", "DoctorOptions", "Finding", "KeyArgError", "check_url", "parse_key_arg", "run_doctor",
           "OK", "WARN", "FAIL", "SKIP"]
