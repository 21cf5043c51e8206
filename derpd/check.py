"""``derpd check URL``: log two clients in, relay packets both ways, report loss and RTT; with
``--throughput DURATION``, how fast the relay path is (and the relay's counters for the run).

The small HTTP helpers here (one GET on a fresh connection, the relay's Prometheus counters)
serve ``derpd doctor`` too."""

from __future__ import annotations

import os
import ssl
import struct
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h11
import trio

from . import client as derp_client
from .keys import NodePrivate
from .protocol.errors import RemoteProtocolError
from .protocol.messages import RecvPacket

_STAMP = struct.Struct(">Id")  # sequence number, send time


@dataclass
class CheckResult:
    sent: int = 0
    delivered: int = 0
    corrupted: int = 0
    rtts: list[float] = field(default_factory=list)
    ping_rtt: float | None = None

    @property
    def lost(self) -> int:
        return self.sent - self.delivered

    def percentile(self, p: float) -> float | None:
        if not self.rtts:
            return None
        xs = sorted(self.rtts)
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def run_check(
    url: str, *, count: int = 100, size: int = 256, timeout: float = 10.0, window: int = 16,
    **connect_options: object,
) -> CheckResult:
    """Client A sends ``count`` packets to B, which echoes each back; RTT is A→B→A.

    At most ``window`` packets are in flight, so a healthy relay loses none (its queues hold
    32 packets per client): any loss means the relay or the path dropped packets.

    Raises:
        derpd.client.DerpClientError, OSError, trio.TooSlowError: connecting failed.
    """
    result = CheckResult()
    size = max(size, _STAMP.size)
    a_key, b_key = NodePrivate.generate(), NodePrivate.generate()
    async with (
        derp_client.connect(url, a_key, timeout=timeout, **connect_options) as a,  # type: ignore[arg-type]
        derp_client.connect(url, b_key, timeout=timeout, **connect_options) as b,  # type: ignore[arg-type]
    ):
        result.ping_rtt = await a.ping(timeout=timeout)
        # The relay only delivers to B once B is registered, which its login guarantees.
        payloads = {i: _STAMP.pack(i, 0.0)[:4] + os.urandom(size - 4) for i in range(count)}

        async def echo() -> None:
            async for ev in b:
                if isinstance(ev, RecvPacket) and ev.src == a.public_key:
                    await b.send(a.public_key, ev.data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo)
            with trio.move_on_after(timeout):
                async with trio.open_nursery() as inner:

                    credit = trio.Semaphore(window)

                    async def sender() -> None:
                        for i in range(count):
                            await credit.acquire()
                            p = payloads[i]
                            stamped = p[:4] + struct.pack(">d", trio.current_time()) + p[12:]
                            payloads[i] = stamped
                            await a.send(b.public_key, stamped)
                            result.sent += 1

                    inner.start_soon(sender)
                    seen: set[int] = set()
                    async for ev in a:
                        if not isinstance(ev, RecvPacket) or ev.src != b.public_key:
                            continue
                        seq = _STAMP.unpack_from(ev.data)[0]
                        if seq in seen or payloads.get(seq) != ev.data:
                            result.corrupted += 1
                            continue
                        seen.add(seq)
                        credit.release()
                        result.delivered += 1
                        result.rtts.append(trio.current_time() - _STAMP.unpack_from(ev.data)[1])
                        if len(seen) == count:
                            break
            nursery.cancel_scope.cancel()
    return result


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and everything behind it (causes, contexts, members of exception groups)."""
    out: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e in out:
            continue
        out.append(e)
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return out


def explain_failure(exc: BaseException, url: str, *, server_name: str | None = None, mesh: bool = False) -> str:
    """One line: why connecting or logging in to the relay at ``url`` failed, and what to do.

    ``server_name`` is the name the certificate was checked against (default: the URL's
    host); ``mesh`` says we presented a mesh key (``close-peer``).
    """
    import ssl
    from urllib.parse import urlsplit

    from .client import DerpClientError, LoginRefused

    parts = urlsplit(url)
    host = parts.hostname or url
    try:
        port = parts.port or (443 if parts.scheme in ("https", "wss") else 80)
    except ValueError:
        port = 0
    chain = _causes(exc)
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError):
            name = server_name or host
            return (f"the certificate of {host}:{port} is not trusted for the name {name!r} "
                    f"({e.verify_message or e.reason}); pass --ca-file with the CA that signed it, or --cert-pin "
                    "with the node's CertName (sha256-raw:...) for a self-signed certificate")
    for e in chain:
        if isinstance(e, LoginRefused):
            if mesh:
                return ("the relay refused the login: it does not take this mesh key (use the region's "
                        "--mesh-psk-file), and its admission did not admit the key as an ordinary client")
            return ("the relay refused the login: its admission (--allow-keys, --verify-client-url) "
                    "does not admit this client key")
        if isinstance(e, DerpClientError):
            if "during the HTTP upgrade" in str(e) and parts.scheme in ("http", "ws"):
                return f"{e}; if {host}:{port} serves TLS, use an https:// URL"
            return str(e)
    for e in chain:
        if isinstance(e, ssl.SSLError):
            return (f"the TLS handshake with {host}:{port} failed ({e.reason or e}); is that port TLS? "
                    "A plain-HTTP relay takes an http:// URL")
        if isinstance(e, ConnectionRefusedError):
            return f"connection refused by {host}:{port}: nothing listens there; is the relay running on that port?"
        if isinstance(e, OSError) and e.errno is not None and e.strerror and not isinstance(e, trio.BrokenResourceError):
            return f"cannot connect to {host}:{port}: {e.strerror}"
        if isinstance(e, trio.TooSlowError):
            return f"{host}:{port} did not answer in time; is the address right and the relay up?"
    for e in chain:
        if isinstance(e, h11.RemoteProtocolError):
            return f"{host}:{port} does not answer in HTTP/1.1 ({e}); is it a DERP relay?"
    for e in chain:
        if isinstance(e, (trio.BrokenResourceError, trio.EndOfChannel)) or (
                getattr(e, "reason", None) == "eof"):
            return f"{host}:{port} closed the connection ({e or 'end of stream'}); is it a DERP relay?"
    return str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------- HTTP, one request


@dataclass(frozen=True)
class HTTPAnswer:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes
    rest: bytes = b""  # after a 101: the bytes that came behind the head (the upgraded protocol's)


async def open_stream(host: str, port: int, *, tls: bool, ssl_context: ssl.SSLContext | None = None,
                      server_name: str | None = None) -> trio.abc.Stream:
    """A TCP connection, with TLS on top when ``tls`` (no verification unless ``ssl_context``
    says so: the callers judge the certificate themselves)."""
    stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    if tls:
        ctx = ssl_context or derp_client.make_ssl_context(insecure=True)
        tls_stream = trio.SSLStream(stream, ctx, server_hostname=server_name or host)
        try:
            await tls_stream.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        stream = tls_stream
    return stream


async def http_exchange(stream: trio.abc.Stream, host_header: str, target: str,
                        headers: Sequence[tuple[str, str]] = (), max_body: int = 1 << 20,
                        head_only: bool = False) -> HTTPAnswer:
    """Send one GET, read the answer: the head of a 101 (or of any answer with ``head_only``),
    or a whole response (at most ``max_body`` bytes of body).

    Raises:
        DerpClientError: the server closed the connection before answering, or sent more than ``max_body``.
    """
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target=target,
                          headers=[("Host", host_header), ("User-Agent", "derpd-doctor"), *headers])
    await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
    status, head, body = 0, {}, bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            raise derp_client.DerpClientError(f"the answer is not HTTP/1.1 ({e})") from None
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            if not data and status == 0:
                raise derp_client.DerpClientError("the server closed the connection without an HTTP answer")
            conn.receive_data(data)
            continue
        if isinstance(event, (h11.Response, h11.InformationalResponse)):
            status = event.status_code
            head = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
            if isinstance(event, h11.InformationalResponse) and status == 101:
                return HTTPAnswer(status, head, b"", conn.trailing_data[0])
            if head_only and isinstance(event, h11.Response):
                return HTTPAnswer(status, head, b"")
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > max_body:
                raise derp_client.DerpClientError(f"the answer is longer than {max_body} bytes")
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            return HTTPAnswer(status, head, bytes(body))


def host_header(host: str, port: int, tls: bool) -> str:
    h = f"[{host}]" if ":" in host else host
    return h if port == (443 if tls else 80) else f"{h}:{port}"


async def http_get(url: str, *, ssl_context: ssl.SSLContext | None = None, server_name: str | None = None,
                   headers: Sequence[tuple[str, str]] = (), max_body: int = 1 << 20) -> HTTPAnswer:
    """One GET of an http:// or https:// URL on a fresh connection (callers bound the time)."""
    parts = urlsplit(url)
    tls = parts.scheme in ("https", "wss")
    host = parts.hostname or ""
    port = parts.port or (443 if tls else 80)
    stream = await open_stream(host, port, tls=tls, ssl_context=ssl_context, server_name=server_name)
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return await http_exchange(stream, host_header(host, port, tls), target, headers, max_body)
    finally:
        await trio.aclose_forcefully(stream)


# ---------------------------------------------------------------------------- the relay's counters

# The counters a throughput run moves, and how they are shown.
RUN_COUNTERS = (
    ("derp_packets_received_total", "received"),
    ("derp_packets_sent_total", "sent"),
    ("derp_packets_dropped_total", "dropped"),
    ("derp_packets_forwarded_out_total", "forwarded out"),
    ("derp_packets_forwarded_in_total", "forwarded in"),
    ("derp_write_timeouts_total", "write timeouts"),
)


def base_url(derp_url: str) -> str:
    """``scheme://host:port`` of a DERP URL, in http(s) terms."""
    parts = urlsplit(derp_url)
    scheme = "https" if parts.scheme in ("https", "wss") else "http"
    return f"{scheme}://{parts.netloc}"


def parse_counters(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name: value}; labelled samples as ``name{reason=x}`` and
    summed under their bare name too."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value if s.labels else s.value
            if s.labels:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
    return out


async def scrape_counters(derp_url: str, *, metrics_url: str | None = None, timeout: float = 5.0,
                          ssl_context: ssl.SSLContext | None = None,
                          server_name: str | None = None) -> tuple[str, dict[str, float]] | str:
    """The relay's counters: ``metrics_url``, else ``/metrics`` and then ``/debug/varz`` on the
    relay's port.  Returns (where they came from, counters), or one line saying why none."""
    urls = [metrics_url] if metrics_url else [base_url(derp_url) + "/metrics", base_url(derp_url) + "/debug/varz"]
    why = []
    for url in urls:
        try:
            with trio.fail_after(timeout):
                answer = await http_get(url, ssl_context=ssl_context, server_name=server_name)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, derp_client.DerpClientError) as e:
            why.append(f"{url}: {explain_failure(e, url)}")
            continue
        if answer.status != 200:
            why.append(f"{url}: HTTP {answer.status}")
            continue
        try:
            return url, parse_counters(answer.body.decode("utf-8", "replace"))
        except ValueError as e:
            why.append(f"{url}: not Prometheus text ({e})")
    return "; ".join(why)


# ---------------------------------------------------------------------------- throughput

_DATA = struct.Struct(">Id")  # sequence number, send time (trio clock)
ACK_EVERY = 4  # the receiver echoes the stamp of every 4th packet: RTT samples and the sender's window
WARMUP = 0xFFFFFFFF  # sequence number of the packets that wait for the path to exist


@dataclass
class ThroughputResult:
    duration: float = 0.0  # seconds of sending
    size: int = 0
    sent: int = 0
    received: int = 0
    corrupted: int = 0
    stalls: int = 0  # times the window waited a whole stall period for an echo
    rtts: list[float] = field(default_factory=list)
    ping_rtt: float | None = None  # an idle Ping/Pong before the run
    counters: dict[str, tuple[str, dict[str, float]] | str] = field(default_factory=dict)  # url -> before/after

    @property
    def lost(self) -> int:
        return max(0, self.sent - self.received)

    @property
    def mbit_per_s(self) -> float:
        return self.received * self.size * 8 / 1e6 / self.duration if self.duration else 0.0

    @property
    def packets_per_s(self) -> float:
        return self.received / self.duration if self.duration else 0.0

    def percentile(self, p: float) -> float | None:
        return CheckResult(rtts=self.rtts).percentile(p)


async def _log_in(stack: AsyncExitStack, url: str, key: NodePrivate, timeout: float,
                  options: dict[str, object]) -> derp_client.DerpClient:
    try:
        return await stack.enter_async_context(
            derp_client.connect(url, key, timeout=timeout, **options))  # type: ignore[arg-type]
    except (derp_client.DerpClientError, OSError, trio.TooSlowError, trio.BrokenResourceError,
            RemoteProtocolError, h11.RemoteProtocolError) as e:
        name = options.get("server_name")
        raise derp_client.DerpClientError(
            f"cannot log in to {url}: {explain_failure(e, url, server_name=name)}") from e  # type: ignore[arg-type]


def counter_deltas(before: dict[str, float], after: dict[str, float]) -> list[tuple[str, float]]:
    """(label, increase) of ``RUN_COUNTERS`` and of each drop reason that moved."""
    out = []
    for name, label in RUN_COUNTERS:
        if name in after:
            out.append((label, after[name] - before.get(name, 0.0)))
    for name, value in sorted(after.items()):
        if name.startswith("derp_packets_dropped_total{") and value - before.get(name, 0.0) > 0:
            out.append((name[len("derp_packets_dropped_total"):], value - before.get(name, 0.0)))
    return out


async def run_throughput(
    url: str, duration: float, *, via: str | None = None, size: int = 1200, window: int = 24,
    timeout: float = 10.0, metrics_urls: dict[str, str] | None = None, **connect_options: object,
) -> ThroughputResult:
    """Client A (on ``url``) sends ``size``-byte packets to B (on ``via``, else also on ``url``)
    for ``duration`` seconds, keeping at most ``window`` unacknowledged; B echoes the stamp of
    every ``ACK_EVERY``-th packet, so A learns the RTT under load.  The relays' counters are
    read before and after (``metrics_urls`` maps a DERP URL to its metrics URL).

    Raises:
        derpd.client.DerpClientError, OSError, trio.TooSlowError: connecting failed, or no
        packet reached B within ``timeout`` (the path between the nodes does not exist).
    """
    size = max(size, _DATA.size)
    result = ThroughputResult(size=size)
    nodes = [url] if via is None else [url, via]
    tls_options = {k: v for k, v in connect_options.items() if k in ("ssl_context", "server_name")}
    if "ssl_context" not in tls_options:
        tls_options["ssl_context"] = derp_client.make_ssl_context(
            insecure=bool(connect_options.get("insecure") or connect_options.get("cert_pin")))
    before: dict[str, tuple[str, dict[str, float]] | str] = {}
    for node in nodes:
        before[node] = await scrape_counters(node, metrics_url=(metrics_urls or {}).get(node),
                                             timeout=min(timeout, 5.0), **tls_options)  # type: ignore[arg-type]
    a_key, b_key = NodePrivate.generate(), NodePrivate.generate()
    padding = os.urandom(size - _DATA.size)
    stall = max(0.5, min(timeout, 2.0))
    async with AsyncExitStack() as stack:
        a = await _log_in(stack, url, a_key, timeout, connect_options)
        b = await _log_in(stack, via or url, b_key, timeout, connect_options)
        result.ping_rtt = await a.ping(timeout=timeout)
        path_up = trio.Event()
        acked = -1  # highest sequence number echoed so far
        progress = trio.Event()
        sending = True
        drained = trio.Event()

        async def receiver() -> None:
            expected_tail = padding
            async for ev in b:
                if not isinstance(ev, RecvPacket) or ev.src != a.public_key:
                    continue
                data = ev.data
                if len(data) != size or data[_DATA.size:] != expected_tail:
                    result.corrupted += 1
                    continue
                seq = _DATA.unpack_from(data)[0]
                if seq == WARMUP:
                    path_up.set()
                    continue
                result.received += 1
                if not sending and result.received >= result.sent:
                    drained.set()
                if seq % ACK_EVERY == 0:
                    await b.send(a.public_key, data[:_DATA.size])

        async def acks() -> None:
            nonlocal acked, progress
            async for ev in a:
                if not isinstance(ev, RecvPacket) or ev.src != b.public_key or len(ev.data) != _DATA.size:
                    continue
                seq, stamp = _DATA.unpack(ev.data)
                result.rtts.append(trio.current_time() - stamp)
                if seq > acked:
                    acked = seq
                    progress.set()
                    progress = trio.Event()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            nursery.start_soon(acks)
            # Across a mesh, A's node learns about B a moment after B logs in: until then packets to B are dropped.
            with trio.move_on_after(timeout):
                while not path_up.is_set():
                    await a.send(b.public_key, _DATA.pack(WARMUP, 0.0) + padding)
                    with trio.move_on_after(0.05):
                        await path_up.wait()
            if not path_up.is_set():
                where = f"on {via}" if via else "on the same node"
                raise derp_client.DerpClientError(
                    f"no packet reached the receiver {where} within {timeout:g}s"
                    + (": the two nodes do not forward to each other; check their mesh (derpd doctor "
                       "--mesh-psk-file) and that both are in one region" if via else ""))
            start = trio.current_time()
            end = start + duration
            seq = 0
            while True:
                now = trio.current_time()
                if now >= end:
                    break
                room = window - (seq - acked - 1)
                if room <= 0:
                    with trio.move_on_at(min(end, now + stall)) as waited:
                        await progress.wait()
                    if waited.cancelled_caught and trio.current_time() < end:
                        result.stalls += 1
                        acked = seq - 1  # the echoes were lost: open the window again
                    continue
                batch = []
                for _ in range(min(room, 16)):
                    batch.append((b.public_key, _DATA.pack(seq, now) + padding))
                    seq += 1
                await a.send_many(batch)
                result.sent += len(batch)
            result.duration = trio.current_time() - start
            sending = False
            if result.received >= result.sent:
                drained.set()
            with trio.move_on_after(stall):  # let what is in flight arrive
                await drained.wait()
            nursery.cancel_scope.cancel()
    for node in nodes:
        after = await scrape_counters(node, metrics_url=(metrics_urls or {}).get(node),
                                      timeout=min(timeout, 5.0), **tls_options)  # type: ignore[arg-type]
        first = before[node]
        if isinstance(first, str):
            result.counters[node] = first
        elif isinstance(after, str):
            result.counters[node] = after
        else:
            result.counters[node] = (after[0], dict(counter_deltas(first[1], after[1])))
    return result


def throughput_lines(url: str, via: str | None, run: ThroughputResult) -> list[str]:
    """What ``derpd check --throughput`` prints: the run, then the counters of each relay."""
    ms = lambda v: "n/a" if v is None else f"{v * 1000:.2f}ms"  # noqa: E731
    path = f"{url} -> {via}" if via else url
    share = 100 * run.lost / run.sent if run.sent else 0.0
    lines = [f"{path}: {run.duration:.1f}s of {run.size}-byte packets: {run.mbit_per_s:.1f} Mbit/s, "
             f"{run.packets_per_s:.0f} packets/s, lost {run.lost}/{run.sent} ({share:.2f}%), "
             f"corrupted {run.corrupted}, rtt under load p50 {ms(run.percentile(50))} "
             f"p99 {ms(run.percentile(99))}, idle ping {ms(run.ping_rtt)}"]
    if run.stalls:
        lines.append(f"  the window stalled {run.stalls} times (no echo for a while): packets or echoes were lost")
    for node, counters in run.counters.items():
        if isinstance(counters, str):
            lines.append(f"  relay counters of {node}: not readable ({counters}); run the check on the relay's "
                         "host, or pass --metrics-url / allow this address with --debug-allow")
        else:
            where, deltas = counters
            text = ", ".join(f"{label} +{value:.0f}" for label, value in deltas.items())
            lines.append(f"  relay counters of {node} during the run (all clients, from {where}): {text}")
    return lines
