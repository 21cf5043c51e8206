"""The relay: ``RelayServer`` holds the registry and statistics, logs clients in, and routes
packets that have no local destination; ``listener.serve_relay`` runs its listeners and
reports a ``listener.RunningRelay``.

Dependencies inside ``derpd.relay`` run one way:
``listener`` -> ``http_front`` -> ``server`` -> ``client_connection`` -> ``registry``.
This module never imports ``listener`` or ``http_front``; it implements
``client_connection.ConnectionHost``, the interface through which a connection calls back up.
"""

from __future__ import annotations

import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import cast

import trio

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from ..keys import NodePublic, mesh_keys_equal

from ..metrics import ProcessMetrics, RelayCollector, RelayStats
from ..protocol.errors import RemoteProtocolError
from ..protocol.frames import SERVER_READ_LIMITS, FrameType, PeerPresentFlags
from ..protocol.handshake import NEED_DATA, ClientAuthenticated, ServerHandshake
from ..protocol.messages import KEEP_ALIVE_FRAME, encode_restarting
from ..protocol.upgrade import derp_switching_protocols
from ..ratelimit import ClientRateLimits
from ..settings import RelaySettings
from ..transport.raw_socket import raw_io_for
from ..transport.websocket_stream import WebSocketStream
from .client_address import parse_cidrs
from .client_connection import RECV_SIZE, ClientConnection
from .dataplane import DataPlane
from .diagnostics import QueueDelay, clients_report
from .health import (
    HealthBoard,
    text_admission,
    text_cloned_key,
    text_draining,
    text_rate_limited,
    text_restarting,
)
from .registry import Forwarder, Registry
from .tls import CertificateFiles, ChallengeResponder, ServerCert

log = logging.getLogger("derpd.relay")


# What a client may send before its login completes: a ClientInfo is at most 256 KiB, and
# WebSocket framing around it costs some more (on top of the login deadline).
LOGIN_BYTE_BUDGET = 512 * 1024

# An admission check: (client key, ClientInfo, remote ip) -> (admitted, reason).
AdmissionCheck = Callable[[NodePublic, object, str], Awaitable[tuple[bool, str]]]


class RelayServer:
    def __init__(self, settings: RelaySettings) -> None:
        self.settings = settings
        self.public_key = settings.private_key.public
        self.stats = RelayStats()
        self.registry = Registry(self.stats, self.public_key.raw)
        self.health = HealthBoard()  # Health frames to clients (derpd/relay/health.py)
        self.registry.on_cloned = self._cloned
        self.queue_delay = QueueDelay()  # derp_queue_delay_seconds, Python writers' part
        self.admission_checks: list[AdmissionCheck] = []
        self.ssl_context: ssl.SSLContext | None = None
        self.cert: ServerCert | None = None
        self.challenges: ChallengeResponder | None = None  # ACME (derpd.acme) installs itself here
        self.connections_per_ip: dict[str, int] = {}
        self.trusted_proxies = parse_cidrs(settings.trusted_proxies)
        self.restarting_frame: bytes | None = None  # set once shutdown has begun (drain)
        self.draining = False  # a maintenance drain is under way (derpd.drain): clients are moving away
        self.port = 0  # the relay port, once bound
        self.mesh_peers_connected = 0  # outgoing mesh links that are logged in (derpd.mesh)
        self.mesh_peers_configured = 0
        self.mesh_links: list = []  # derpd.mesh.MeshPeer, for metrics
        self.tls_files: CertificateFiles | None = None  # set by load_tls
        self.reload_hooks: list[Callable[[], None]] = []
        self.cert_hooks: list[Callable[[], None]] = []  # after a new certificate is in use
        self.client_rate_limits = ClientRateLimits(self.stats)  # --rate-config (derpd.ratelimit)
        # The compiled packet path for plain-TCP clients (engine None without the extension);
        # while a receive rate limit is configured it hands every byte to the Python reader.
        self.dataplane = DataPlane(
            self.registry.active, self.registry.watch_peer_gone, self.registry.note_activity, self.stats,
            send_limit=SERVER_READ_LIMITS[FrameType.SEND_PACKET], depth=settings.queue_depth, recv_size=RECV_SIZE,
            write_timeout=settings.write_timeout, passthrough=lambda: self.client_rate_limits.config.enabled,
        )
        # /bootstrap-dns: (q parameter, client IP) -> JSON body; derpd.bootstrapdns installs one
        self.bootstrap_dns: Callable[[str, str], bytes] = lambda query, ip: b""
        self.started = time.monotonic()  # for /debug/ uptime
        self.metrics_registry = CollectorRegistry(auto_describe=True)
        self.metrics_registry.register(RelayCollector(self.stats, self))
        # process_* and python_* of this process, labelled worker="0" (``--workers`` sets its index)
        self.process_metrics = ProcessMetrics(REGISTRY, "0")
        # Whether the DERP map pins the served certificate (CertName "sha256-raw:..."); derpd.node
        # installs the full check (a certificate that does not chain to a trusted root is pinned too).
        self.cert_pinned: Callable[[], bool] = lambda: self.cert is not None and self.cert.self_signed_generated
        # the same every login: ServerKey, and the 101 of a binary upgrade with it (one write)
        self._server_key_frame = ServerHandshake(settings.private_key).server_key_frame()
        self.derp_101 = derp_switching_protocols(settings.private_key.public)
        self._derp_101_and_key = self.derp_101 + self._server_key_frame

    # ------------------------------------------------------------------ TLS

    def load_tls(self) -> None:
        """Load the certificate at start-up.  With ACME (``--certmode letsencrypt``/``gcp``) a
        missing or unusable cached certificate is not an error: the ACME client obtains one.

        Raises:
            CertError: the files are missing or unusable (``--certmode manual``).
        """
        s = self.settings
        if s.certdir is None or not (s.acme or (s.tls and s.certmode == "manual")):
            return
        self.tls_files = CertificateFiles(s.certdir, s.hostname, acme=s.acme, server_key=self.public_key)
        self.tls_files.load()
        self.cert, self.ssl_context = self.tls_files.cert, self.tls_files.context

    def cert_files_changed(self) -> bool:
        return self.tls_files is not None and self.tls_files.changed()

    def reload_tls(self) -> bool:
        """Load the certificate files again (SIGHUP, or they changed).  New connections use the
        new certificate and a new meta-certificate; open connections are untouched.  A bad new
        certificate keeps the old one and logs why.

        Returns True if the new certificate is in use.
        """
        files = self.tls_files
        if files is None or (files.cert is None and not files.acme):
            return False
        if not files.reload():
            self.stats.tls_reloads["error"] += 1
            return False
        self.cert, self.ssl_context = files.cert, files.context
        self.stats.tls_reloads["ok"] += 1
        for hook in self.cert_hooks:
            hook()
        return True

    def reload(self) -> None:
        """SIGHUP: reload the certificate and run every registered reload hook."""
        self.reload_tls()
        for hook in self.reload_hooks:
            hook()

    def gauge_values(self) -> dict[str, tuple[str, float]]:
        g = self.registry.gauge_values()
        if self.cert is not None:
            g["derp_tls_cert_not_after_seconds"] = (
                "Expiry of the served TLS certificate, as a Unix time.", self.cert.not_after.timestamp())
            g["derp_tls_cert_pinned"] = (
                "1 if the DERP map pins the served certificate (a sha256-raw CertName): a new certificate "
                "needs a new pin in the map.", 1 if self.cert_pinned() else 0)
        g["derp_mesh_peers_connected"] = ("Mesh peers this relay is logged in to.", self.mesh_peers_connected)
        g["derp_draining"] = ("1 while a maintenance drain moves clients away (SIGUSR1, or SIGTERM with "
                              "--drain-grace).", 1 if self.draining else 0)
        g["derp_mesh_peers_configured"] = ("Mesh peers this relay should be logged in to.",
                                           self.mesh_peers_configured)
        g["derp_health_problem_clients"] = ("Clients whose last Health frame reported a problem.",
                                            sum(1 for c in self.health.watch if c.health and c.health.sent))
        return g

    def internal_connections(self) -> int:
        return self.registry.internal_connections()

    def extra_families(self) -> list:
        """Labelled metrics about the mesh links."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        keys = GaugeMetricFamily("derp_mesh_peer_keys", "Client keys a mesh peer reported.", labels=["peer"])
        up = GaugeMetricFamily("derp_mesh_peer_up", "1 if the link to a mesh peer is logged in.", labels=["peer"])
        reconnects = CounterMetricFamily("derp_mesh_reconnects", "Reconnects of a mesh link.", labels=["peer"])
        for link in self.mesh_links:
            keys.add_metric([link.target.host], len(link.keys))
            up.add_metric([link.target.host], 1 if link.connected else 0)
            reconnects.add_metric([link.target.host], link.reconnects)
        health = CounterMetricFamily("derp_health_frames", "Health frames sent to clients (problems and clears).",
                                     value=self.health.frames_sent)
        parked = CounterMetricFamily("derp_parked_delivered", "Packets held for a client that had just left and "
                                     "delivered once it logged in again, here or on a mesh peer.",
                                     value=self.registry.parking.delivered)
        return [keys, up, reconnects, health, parked, self.queue_delay.family(self.dataplane.engine)]

    async def run_keepalives(self, tick: float = 1.0) -> None:
        """Queue a KeepAlive on every connection whose period has come (spec 5.6).  One ticker
        for the whole relay is far cheaper than a timer per connection."""
        registry = self.registry
        while True:
            await trio.sleep(tick)
            registry.parking.expire()
            now = trio.current_time()
            for c in cast("list[ClientConnection]", registry.all_connections()):
                if now >= c.next_keepalive:
                    c.next_keepalive = max(c.next_keepalive + c.keepalive_interval, now)
                    c.send_control(KEEP_ALIVE_FRAME)

    # ------------------------------------------------------------------ Health frames

    def set_relay_problem(self, text: str | None, source: str = "operator") -> None:
        """Tell every regular client that the relay has a problem (``text``), or that it is
        over (None).  ``source`` names the problem, so that several can be current at once
        ("restarting" for a drain, "admission" for a verify URL that fails open)."""
        if self.health.set_relay(source, text, self.registry.all_connections()):
            log.info("relay problem %s: %s", source, text or "cleared")

    def set_draining(self, on: bool) -> None:
        """A maintenance drain starts (``derpd.drain``) or ends: ``derp_draining`` and, for every
        regular client, a Health text saying that its device moves to another relay."""
        self.draining = on
        self.set_relay_problem(text_draining() if on else None, "draining")

    def note_rate_limited(self, conn: ClientConnection) -> None:
        config = self.client_rate_limits.config
        self.health.set_client(conn, "rate_limited", text_rate_limited(config.bytes_per_sec, config.burst),
                               until=self.health.linger(trio.current_time()))

    def note_admission_fail_open(self, failing: bool) -> None:
        """The admission check's endpoint stopped answering and clients are admitted unchecked
        (True), or it answers again (False)."""
        self.set_relay_problem(text_admission() if failing else None, "admission")

    def _cloned(self, members: list, cloned: bool) -> None:
        text = text_cloned_key() if cloned else None
        for m in members:
            self.health.set_client(m, "cloned_key", text)

    async def run_health(self) -> None:
        """Queue the Health frames that are due, every ``health.period`` (1 s); every
        ``health.DROP_WINDOW`` seconds, look at the share of each receiver's packets dropped
        (only after drops)."""
        board = self.health
        drops_seen = -1
        while True:
            await trio.sleep(board.period)
            now = trio.current_time()
            if board.drop_window_due(now):
                dropped = self.stats.dropped_packets["queue_head", "other"]
                if dropped != drops_seen or any(c.health and c.health.dropping for c in board.watch):
                    drops_seen = dropped
                    for c in cast("list[ClientConnection]", self.registry.all_connections()):
                        if c.health is not False:
                            k = c.counters()
                            if k["drops_queue_full"] or (c.health and c.health.dropping):
                                board.note_drops(c, k["drops_queue_full"], k["packets_out"], now)
            for conn, frame in board.tick(now):
                conn.send_control(frame)

    def clients_json(self, key: str = "", limit: int = 100) -> bytes:
        """``/debug/clients`` (derpd/relay/diagnostics.py)."""
        return clients_report(self.registry.all_connections(), trio.current_time(), key=key, limit=limit)

    # ------------------------------------------------------------------ per-IP limit

    def enter_ip(self, ip: str) -> bool:
        """Count one more connection from ``ip``; False (and counted) if it is at
        ``--max-connections-per-ip``.  Every True must be paired with ``leave_ip``."""
        cap = self.settings.max_connections_per_ip
        per_ip = self.connections_per_ip
        n = per_ip.get(ip, 0)
        if cap and n >= cap:
            self.stats.accepts_rejected["per_ip_limit"] += 1
            log.debug("closing a connection from %s: %d connections from that address already", ip, cap)
            return False
        per_ip[ip] = n + 1
        return True

    def leave_ip(self, ip: str) -> None:
        per_ip = self.connections_per_ip
        left = per_ip[ip] - 1
        if left:
            per_ip[ip] = left
        else:
            del per_ip[ip]

    # ------------------------------------------------------------------ shutdown

    def all_connections(self) -> list[ClientConnection]:
        return [c for key in list(self.registry.active) for c in self.registry.connections(key)]

    def client_count(self) -> int:
        """Connections of clients: mesh peers and probers (which come and go by themselves) not
        counted.  A drain waits for this to reach 0."""
        skip = PeerPresentFlags.IS_MESH_PEER | PeerPresentFlags.IS_PROBER
        return sum(1 for c in cast("list[ClientConnection]", self.registry.all_connections())
                   if not c.can_mesh and not c.present_flags & skip)

    async def drain(self, grace: float, reconnect_in_ms: int = 1000, try_for_ms: int = 10000) -> int:
        """Tell every client we are restarting, then let their queues empty for at most
        ``grace`` seconds.  Returns how many connections still had packets queued."""
        frame = self.restarting_frame = encode_restarting(reconnect_in_ms, try_for_ms)
        self.set_relay_problem(text_restarting(), "restarting")
        for conn, health in self.health.tick(trio.current_time()):  # before Restarting
            conn.send_control(health)
        conns = self.all_connections()
        for c in conns:
            c.send_control(frame)
        deadline = trio.current_time() + grace
        while trio.current_time() < deadline:
            busy = [c for c in conns if c.has_pending() and not c.closing]
            if not busy:
                return 0
            await trio.sleep(0.02)
        return sum(1 for c in conns if c.has_pending() and not c.closing)

    # ------------------------------------------------------------------ login

    async def serve_derp(
        self,
        stream: trio.abc.Stream,
        remote: tuple[str, int],
        initial: bytes,
        *,
        preamble: bytes = b"",
        not_ideal: bool = False,
    ) -> None:
        """Log a client in on ``stream`` and serve it until it leaves.

        ``initial`` holds bytes already read past the HTTP head (a fast-start ClientInfo);
        ``preamble`` is written right before ServerKey (the 101, in one write with it).
        """
        s = self.settings
        stats = self.stats
        stats.accepts += 1
        ws = isinstance(stream, WebSocketStream)  # its framing counts against the budget too
        raw = raw_io_for(stream)  # plain TCP: no scheduler round per read or write that need not wait
        send_all = raw.send_all if raw is not None else stream.send_all
        receive_some = raw.receive_some if raw is not None else stream.receive_some
        hs = ServerHandshake(s.private_key)
        if initial:
            hs.receive_data(initial)
        elif raw is not None:
            raw.mark_drained()  # the client answers ServerKey first: wait before reading
        # One cancel scope per connection (each costs a few microseconds): the login deadline
        # first, then, with the deadline lifted, the scope that close() cancels.
        scope = trio.CancelScope(deadline=trio.current_time() + s.login_timeout)
        conn: ClientConnection | None = None
        running = False
        with scope:
            try:
                if preamble is self.derp_101:
                    await send_all(self._derp_101_and_key)
                else:
                    await send_all(preamble + self._server_key_frame if preamble else self._server_key_frame)
                event = hs.next_event()
                received = len(initial)
                while event is NEED_DATA:
                    data = await receive_some(RECV_SIZE)
                    received = stream.wire_bytes_received if ws else received + len(data)
                    if received > LOGIN_BYTE_BUDGET:
                        raise RemoteProtocolError(f"over {LOGIN_BYTE_BUDGET} bytes before the login",
                                                  "login_too_large")
                    hs.receive_data(data)
                    event = hs.next_event()
                assert isinstance(event, ClientAuthenticated)
                can_mesh = mesh_keys_equal(event.info.mesh_key, s.mesh_key)
                if not can_mesh and self.admission_checks:
                    ok, why = await self.admit(event.key, event.info, remote[0])
                    if not ok:
                        stats.admission_refused[why] += 1
                        log.info("refused %s from %s: %s", event.key, remote[0], why)
                        return
            except RemoteProtocolError as e:
                stats.handshake_failures[e.reason] += 1
                log.debug("login from %s failed: %s", remote[0], e)
                return
            conn = ClientConnection(
                self, stream, event.key, event.info, remote, scope,
                can_mesh=can_mesh, is_prober=event.info.is_prober, not_ideal=not_ideal,
            )
            if not can_mesh:  # mesh peers are exempt from the receive rate limit (spec 5.9)
                conn.rate_limiter = self.client_rate_limits.limiter()
            # Register before ServerInfo (packets may queue from now on), but start the writer only
            # after ServerInfo is out, so it is the first frame after ServerKey (P-3).
            self.registry.register(conn)
            self.health.joined(conn)
            if self.restarting_frame is not None:  # a login that finished while we shut down
                conn.send_control(self.restarting_frame)
            if not_ideal:
                stats.current_notideal_connections += 1
            frame = hs.server_info_frame()
            try:
                sent = raw.send_now(frame) if raw is not None else 0  # the usual case: no wait
                if sent < len(frame):  # a fresh login_timeout for the rest of ServerInfo
                    scope.deadline = trio.current_time() + s.login_timeout
                    await send_all(frame[sent:])
            except BaseException:
                conn.closing = True
                conn.teardown()
                raise
            scope.deadline = math.inf
            running = True
            if log.isEnabledFor(logging.DEBUG):
                log.debug("client %s connected from %s", event.key.short(), remote[0])
            await conn.run(hs.decoder)  # tears the connection down when it ends
        if running:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("client %s gone (%s)", event.key.short(), conn.close_reason or "eof")
        elif scope.cancelled_caught and (conn is None or not conn.close_reason):
            stats.handshake_failures["login_timeout"] += 1
            log.debug("login from %s timed out", remote[0])

    async def admit(self, key: NodePublic, info: object, ip: str) -> tuple[bool, str]:
        for check in self.admission_checks:
            ok, why = await check(key, info, ip)
            if not ok:
                return False, why
        return True, ""

    # ------------------------------------------------------------------ routing

    def route_elsewhere(
        self, sender: ClientConnection, src: bytes, dst: bytes, packet: bytes, disco: bool, *, forwarded: bool
    ) -> Forwarder | None:
        """A packet for a key with no active local connection: forward it one hop to the mesh
        peer that holds the key, hold it a moment if the key left the region just now and may
        be logging in again (``parking``), or drop it (spec 5.2).

        Returns the forwarder when its queue is past its high-water mark: the sender's reader
        then waits (bounded) for it to drain, as derper's reader waits on its mesh write, so an
        overloaded mesh link pushes back on senders instead of dropping."""
        fwds = None if forwarded else self.registry.forwarders.get(dst)
        if fwds:
            fwd = fwds[0]
            if fwd.forward(src, dst, packet):
                self.stats.packets_forwarded_out += 1
                self.stats.bytes_forwarded_out += len(packet)
            return fwd if fwd.congested else None
        if self.registry.parking.park(src, dst, packet, disco, forwarded):  # its key may be moving
            return None
        self.stats.drop("unknown_dest_on_fwd" if forwarded else "unknown_dest", disco, len(packet))
        sender.drops_unknown += 1
        if disco:
            sender.not_here(dst)
        return None


    def close_peer(self, target: NodePublic) -> None:
        conns = self.registry.connections(target.raw)
        if not conns:
            log.info("ClosePeer for %s: not connected here", target.short())
        for c in conns:
            log.info("closing %s on a mesh peer's request", target.short())
            c.close("close_peer")

    def metrics_text(self) -> bytes:
        """Prometheus text: this relay's metrics plus the process-wide default registry
        (process and Python, labelled with ``worker``, and in-process STUN)."""
        return generate_latest(self.metrics_registry) + generate_latest(self.process_metrics)  # type: ignore[arg-type]


__all__ = ["AdmissionCheck", "RelayServer"]
