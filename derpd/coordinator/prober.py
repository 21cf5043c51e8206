"""Health probes: every node, every ``probe_interval`` seconds.

One probe round of a node runs three checks at once, all under ``probe_timeout``:

    https  GET https://<node>/derp/probe (TLS checked as a client would: CertName pin,
           InsecureForTests, or the system roots plus the config's ca_file); latency = the
           whole request including connect and handshake
    derp   two fresh clients of our own log in to the node (IsProber), one sends a random
           8-byte packet to the other, which must receive exactly it from the right source
    stun   a STUN binding request to the node's STUN port (skipped for STUNPort -1)

STUN-only nodes get the STUN check only.  A node is healthy when every check that applies
passed.  A node killed between two rounds fails the next round and leaves the map then, so
it is gone within two probe intervals of dying; it is back after its first good round.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from collections.abc import Awaitable, Callable

import trio

from derpd import client as derp_client
from derpd.keys import NodePrivate
from derpd.protocol import messages
from stund import client as stun_client

from .httpclient import HTTPError, client_ssl_context, request
from .model import PIN_PREFIX, DerpNode
from .state import CoordinatorState, ProbeResult

log = logging.getLogger("derpd.coordinator")

ProbeFn = Callable[[DerpNode], Awaitable[ProbeResult]]


def _literal(value: str, version: int) -> str | None:
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return None
    return str(addr) if addr.version == version else None


def dial_host(node: DerpNode) -> str:
    """Returns the address to dial: the IPv4 literal, else the IPv6 literal, else HostName."""
    return _literal(node.ipv4, 4) or _literal(node.ipv6, 6) or node.host_name


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class NodeProber:
    """The real probe of one node (see the module docstring)."""

    def __init__(self, *, cafile: str | None = None, timeout: float = 5.0) -> None:
        self.cafile = cafile
        self.timeout = timeout
        self._ctx = client_ssl_context(cafile=cafile)
        self._insecure_ctx = client_ssl_context(insecure=True)

    def _tls_args(self, node: DerpNode) -> dict[str, object]:
        if node.cert_name.startswith(PIN_PREFIX):
            return {"cert_pin": node.cert_name}
        if node.insecure_for_tests:
            return {"ssl_context": self._insecure_ctx}
        # A DNS-name CertName: we check the certificate for that name (and send it as SNI).
        return {"ssl_context": self._ctx, "server_name": node.cert_name or node.host_name}

    async def __call__(self, node: DerpNode) -> ProbeResult:
        latency: dict[str, float] = {}
        failed: dict[str, str] = {}
        skipped: list[str] = []

        async def timed(kind: str, fn: Callable[[DerpNode], Awaitable[None]]) -> None:
            start = trio.current_time()
            try:
                with trio.fail_after(self.timeout):
                    await fn(node)
            except _Skip as exc:
                skipped.append(kind)
                log.debug("probe %s of %s skipped: %s", kind, node.name, exc)
                return
            except trio.TooSlowError:
                failed[kind] = f"no answer within {self.timeout:g} s"
                return
            except Exception as exc:  # any failure of a probe is the node's failure
                failed[kind] = _describe(exc)
                return
            latency[kind] = trio.current_time() - start

        async with trio.open_nursery() as nursery:
            if not node.stun_only:
                nursery.start_soon(timed, "https", self.probe_https)
                nursery.start_soon(timed, "derp", self.probe_derp)
            nursery.start_soon(timed, "stun", self.probe_stun)
        return ProbeResult(time.time(), latency, failed, tuple(skipped))

    async def probe_https(self, node: DerpNode) -> None:
        port = node.derp_port or 443
        url = f"https://{_url_host(node.host_name)}:{port}/derp/probe"
        resp = await request(url, "GET", connect_host=dial_host(node), **self._tls_args(node))  # type: ignore[arg-type]
        if resp.status != 200:
            raise HTTPError(f"/derp/probe answered {resp.status}, want 200")

    async def probe_derp(self, node: DerpNode) -> None:
        port = node.derp_port or 443
        tls = self._tls_args(node)
        sni = str(tls.get("server_name") or node.host_name)
        url = f"https://{_url_host(sni)}:{port}/derp"
        kwargs: dict[str, object] = {"connect_host": dial_host(node), "is_prober": True,
                                     "timeout": self.timeout}
        if "cert_pin" in tls:
            kwargs["cert_pin"] = tls["cert_pin"]
        elif node.insecure_for_tests:
            kwargs["insecure"] = True
        else:
            kwargs["ssl_context"] = self._ctx
        a_key, b_key = NodePrivate.generate(), NodePrivate.generate()
        payload = os.urandom(8)
        async with derp_client.connect(url, a_key, **kwargs) as a, \
                derp_client.connect(url, b_key, **kwargs) as b:
            # The relay may register b a moment after b's login completes; resend a few
            # times (same payload) until b has it, within the probe's deadline.
            async with trio.open_nursery() as nursery:

                async def resend() -> None:
                    for _ in range(20):
                        await a.send(b_key.public, payload)
                        await trio.sleep(0.25)

                nursery.start_soon(resend)
                while True:
                    ev = await b.recv()
                    if isinstance(ev, messages.RecvPacket):
                        if ev.src != a_key.public or ev.data != payload:
                            raise HTTPError("relayed packet arrived with the wrong source or payload")
                        nursery.cancel_scope.cancel()
                        return

    async def probe_stun(self, node: DerpNode) -> None:
        if node.stun_port == -1:
            raise _Skip("STUNPort is -1")
        host = node.stun_test_ip or dial_host(node)
        await stun_client.stun_query(host, node.stun_port or 3478, timeout=2.0)


class _Skip(Exception):
    """This probe does not apply to the node."""


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    return text[:300]


class Prober:
    """Runs probe rounds over every node of a :class:`CoordinatorState`."""

    def __init__(self, state: CoordinatorState, probe: ProbeFn, *, max_parallel: int = 16) -> None:
        self.state = state
        self.probe = probe
        self.rounds = 0
        self._limiter = trio.CapacityLimiter(max_parallel)
        self._wake = trio.Event()
        self._round_done = trio.Event()
        state.on_new_node = self.wake

    def wake(self) -> None:
        """Starts the next round now (a node registered)."""
        self._wake.set()

    async def wait_round(self) -> None:
        """Waits for the end of the next probe round."""
        await self._round_done.wait()

    async def run_round(self) -> None:
        """Probes every node once, concurrently, each under ``probe_timeout``."""
        async with trio.open_nursery() as nursery:
            for node in self.state.probe_targets():
                nursery.start_soon(self._probe_one, node)
        self.rounds += 1
        self._round_done.set()
        self._round_done = trio.Event()

    async def _probe_one(self, node: DerpNode) -> None:
        timeout = self.state.config.probe_timeout
        async with self._limiter:
            result: ProbeResult | None = None
            with trio.move_on_after(timeout):
                try:
                    result = await self.probe(node)
                except Exception as exc:
                    log.warning("probe of %s crashed: %r", node.name, exc)
                    result = ProbeResult(time.time(), failed={"probe": f"internal error: {exc!r}"[:300]})
            if result is None:
                result = ProbeResult(time.time(), failed={"probe": f"no answer within {timeout:g} s"})
        self.state.record_probe(node, result)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Probes forever: a round, then sleep until ``probe_interval`` after its start."""
        task_status.started()
        while True:
            start = trio.current_time()
            self._wake = trio.Event()
            await self.run_round()
            self.state.expire(trio.current_time())
            with trio.move_on_at(start + self.state.config.probe_interval):
                await self._wake.wait()
