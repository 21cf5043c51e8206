"""``derpd check URL``: log two clients in, relay packets both ways, report loss and RTT."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import trio

from . import client as derp_client
from .keys import NodePrivate
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
        if isinstance(e, (trio.BrokenResourceError, trio.EndOfChannel)) or (
                getattr(e, "reason", None) == "eof"):
            return f"{host}:{port} closed the connection ({e or 'end of stream'}); is it a DERP relay?"
    return str(exc) or type(exc).__name__
