"""Health probes: every node, every ``probe_interval`` seconds.

One probe round of a node runs three checks one after the other, each under a third of
``probe_timeout`` (run at once, their TLS handshakes would share the CPU and each latency
would include the others' work):

    https  GET https://<node>/derp/probe (TLS checked as a client would: CertName pin,
           InsecureForTests, or the system roots plus the config's ca_file)
    derp   two clients of our own log in to the node (IsProber; as mesh peers when the
           config has a mesh key for the region, as ``derpprobe -mesh-psk-file`` does,
           so admission lets them in), one sends a random 8-byte packet to the other,
           which must receive exactly it from the right source.  The relay's DERP server
           key must be the ``PublicKey`` the node registered with.
    stun   a STUN binding request to the node's STUN port (skipped for STUNPort -1)

Each latency is timed from the start of the connection to the answer (no DNS: the
prober dials the :class:`ProbeTarget`'s address; TLS contexts are made once), and the
DERP packet is sent once: the relay registers a client before it answers its login.

A relay whose admission refuses the DERP probe (no mesh key configured) is not failed for
it: the node is "up, DERP probe refused by admission" and https and STUN decide.

STUN-only nodes get the STUN check only.  A node is healthy when every check that applies
passed; health changes after two rounds agree (see :mod:`derpd.coordinator.state`).

Rounds run at most ``max_parallel_probes`` nodes at a time and end after
``probe_timeout`` whatever happens, healthy nodes first, so no number of unreachable
registrations can stretch a round or starve the nodes that answer.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable

import trio

from derpd import client as derp_client
from derpd.keys import NodePrivate, NodePublic
from derpd.protocol import messages
from derpd.protocol.errors import RemoteProtocolError
from stund import client as stun_client

from .httpclient import HTTPClient, HTTPError, PinMismatch, client_ssl_context
from .model import PIN_PREFIX, DerpNode
from .state import CoordinatorState, ProbeResult, ProbeTarget

log = logging.getLogger("derpd.coordinator")

ProbeFn = Callable[[ProbeTarget], Awaitable[ProbeResult]]

ADMISSION_NOTE = "DERP probe refused by admission"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class ProbeFailure(Exception):
    """A probe failed; ``kind`` is the short class shown to anonymous viewers."""

    def __init__(self, kind: str, detail: str, *, fatal: bool = False) -> None:
        self.kind = kind
        self.fatal = fatal
        super().__init__(detail)


class NodeProber:
    """The real probe of one node (see the module docstring)."""

    def __init__(self, *, cafile: str | None = None, timeout: float = 5.0) -> None:
        self.cafile = cafile
        self.timeout = timeout
        self._ctx = client_ssl_context(cafile=cafile)
        self._insecure_ctx = client_ssl_context(insecure=True)
        self._http = HTTPClient(ssl_context=self._ctx, timeout=timeout, keepalive=False,
                                max_response_bytes=64 * 1024)
        self._http_insecure = HTTPClient(ssl_context=self._insecure_ctx, timeout=timeout, keepalive=False,
                                         max_response_bytes=64 * 1024)

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._http_insecure.aclose()

    def _tls(self, node: DerpNode) -> tuple[ssl.SSLContext, str | None, str]:
        """Returns (context, pin, SNI name) for a node."""
        if node.cert_name.startswith(PIN_PREFIX):
            return self._insecure_ctx, node.cert_name, node.host_name
        if node.insecure_for_tests:
            return self._insecure_ctx, None, node.host_name
        # A DNS-name CertName: we check the certificate for that name (and send it as SNI).
        return self._ctx, None, node.cert_name or node.host_name

    async def __call__(self, target: ProbeTarget) -> ProbeResult:
        node = target.node
        latency: dict[str, float] = {}
        failed: dict[str, str] = {}
        classes: dict[str, str] = {}
        notes: dict[str, str] = {}
        skipped: list[str] = []
        fatal = False

        # One kind after the other, each with a third of the budget: run at once, their TLS
        # handshakes would share the CPU and each would time the others' work too.
        share = max(1.0, self.timeout / 3)

        async def timed(kind: str, fn: Callable[[ProbeTarget], Awaitable[float]]) -> None:
            nonlocal fatal
            try:
                with trio.fail_after(share):
                    latency[kind] = await fn(target)
            except _Skip as exc:
                skipped.append(kind)
                log.debug("probe %s of %s skipped: %s", kind, node.name, exc)
            except derp_client.LoginRefused:
                notes[kind] = ADMISSION_NOTE
            except trio.TooSlowError:
                failed[kind] = f"no answer within {share:g} s"
                classes[kind] = "timeout"
            except ProbeFailure as exc:
                failed[kind], classes[kind] = str(exc), exc.kind
                fatal = fatal or exc.fatal
            except Exception as exc:  # any failure of a probe is the node's failure
                failed[kind], classes[kind] = _describe(exc), _classify(exc)

        if not node.stun_only:
            await timed("https", self.probe_https)
            await timed("derp", self.probe_derp)
        await timed("stun", self.probe_stun)
        return ProbeResult(time.time(), latency, failed, tuple(skipped), classes, notes, fatal)

    async def probe_https(self, target: ProbeTarget) -> float:
        node = target.node
        ctx, pin, sni = self._tls(node)
        client = self._http_insecure if ctx is self._insecure_ctx else self._http
        url = f"https://{_url_host(node.host_name)}:{node.derp_port or 443}/derp/probe"
        start = trio.current_time()
        try:
            resp = await client.request(url, "GET", connect_host=target.dial, server_name=sni, cert_pin=pin)
        except PinMismatch as exc:
            raise ProbeFailure("pin_mismatch", str(exc)) from None
        elapsed = trio.current_time() - start
        if resp.status != 200:
            raise ProbeFailure("http_status", f"/derp/probe answered {resp.status}, want 200")
        return elapsed

    async def probe_derp(self, target: ProbeTarget) -> float:
        node = target.node
        ctx, pin, sni = self._tls(node)
        url = f"https://{_url_host(sni)}:{node.derp_port or 443}/derp"
        kwargs: dict[str, object] = {"connect_host": target.dial, "is_prober": True, "timeout": self.timeout,
                                     "ssl_context": ctx, "cert_pin": pin, "mesh_key": target.mesh_key}
        a_key, b_key = NodePrivate.generate(), NodePrivate.generate()
        payload = os.urandom(8)
        # With the registered key, a logs in with fast start too, and a relay with another key
        # fails the login at its ServerKey frame.
        expected = NodePublic.parse(target.public_key) if target.public_key else None
        start = trio.current_time()
        try:
            async with derp_client.connect(url, a_key, server_key=expected,
                                           **kwargs) as a:  # type: ignore[arg-type]
                _check_server_key(target, str(a.server_key))
                # b knows the key now: fast start (ClientInfo right behind the request, spec 9.3)
                async with derp_client.connect(url, b_key, server_key=a.server_key,
                                               **kwargs) as b:  # type: ignore[arg-type]
                    await a.send(b_key.public, payload)  # b is registered: its login has completed
                    while True:
                        ev = await b.recv()
                        if isinstance(ev, messages.RecvPacket):
                            if ev.src != a_key.public or ev.data != payload:
                                raise ProbeFailure("protocol", "relayed packet arrived with the wrong source "
                                                               "or payload")
                            return trio.current_time() - start
        except derp_client.LoginRefused:
            raise
        except RemoteProtocolError as exc:
            if exc.reason == "server_key_mismatch":
                raise ProbeFailure("key_mismatch", f"the relay at {target.dial} is not the registered "
                                                   f"{target.public_key[:20]}...", fatal=True) from None
            raise ProbeFailure("protocol", str(exc)) from None
        except derp_client.DerpClientError as exc:
            text = str(exc)
            raise ProbeFailure("pin_mismatch" if "pin" in text else "protocol", text) from None

    async def probe_stun(self, target: ProbeTarget) -> float:
        node = target.node
        if node.stun_port == -1:
            raise _Skip("STUNPort is -1")
        start = trio.current_time()
        await stun_client.stun_query(target.stun, node.stun_port or 3478, timeout=2.0)
        return trio.current_time() - start


def _check_server_key(target: ProbeTarget, presented: str) -> None:
    if target.public_key and presented != target.public_key:
        raise ProbeFailure("key_mismatch", f"the relay at {target.dial} logs in as {presented[:20]}..., "
                                           f"not the registered {target.public_key[:20]}...", fatal=True)


class _Skip(Exception):
    """This probe does not apply to the node."""


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    return text[:300]


def _classify(exc: BaseException) -> str:
    """Returns a short failure class that does not reveal socket details."""
    text = str(exc).lower()
    if isinstance(exc, ssl.SSLError) or "tls" in text or "certificate" in text or "ssl" in text:
        return "tls"
    if "refused" in text:
        return "refused"
    if "no answer" in text or "timed out" in text or "timeout" in text:
        return "timeout"
    if isinstance(exc, (OSError, HTTPError, trio.BrokenResourceError)) and "connect" in text:
        return "unreachable"
    if isinstance(exc, (OSError, trio.BrokenResourceError, trio.ClosedResourceError)):
        return "connection_lost"
    return "protocol"


class Prober:
    """Runs probe rounds over every node of a :class:`CoordinatorState`."""

    def __init__(self, state: CoordinatorState, probe: ProbeFn) -> None:
        self.state = state
        self.probe = probe
        self.rounds = 0
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
        """Probes every node once: at most ``max_parallel_probes`` at a time, healthy nodes
        first, and the whole round ends ``probe_timeout`` after it began (a node not probed
        by then keeps its health, and the next round starts with the healthy ones again)."""
        config = self.state.config
        queue = deque(self.state.probe_targets())

        async def worker() -> None:  # workers take targets in order, so healthy nodes go first
            while queue:
                await self._probe_one(queue.popleft())

        with trio.move_on_after(config.probe_timeout + 0.5) as scope:
            async with trio.open_nursery() as nursery:
                for _ in range(min(config.max_parallel_probes, len(queue))):
                    nursery.start_soon(worker)
        if scope.cancelled_caught:
            log.info("probe round cut at its deadline (%g s); nodes not probed keep their health",
                     config.probe_timeout)
        self.rounds += 1
        self._round_done.set()
        self._round_done = trio.Event()

    async def _probe_one(self, target: ProbeTarget) -> None:
        timeout = self.state.config.probe_timeout
        result: ProbeResult | None = None
        with trio.move_on_after(timeout):
            try:
                result = await self.probe(target)
            except Exception as exc:
                log.warning("probe of %s crashed: %r", target.node.name, exc)
                result = ProbeResult(time.time(), failed={"probe": f"internal error: {exc!r}"[:300]},
                                     classes={"probe": "internal"})
        if result is None:
            result = ProbeResult(time.time(), failed={"probe": f"no answer within {timeout:g} s"},
                                 classes={"probe": "timeout"})
        self.state.record_probe(target.node, result)

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
