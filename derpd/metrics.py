"""Relay statistics, counted in plain ints on the hot path and exported to Prometheus by a
custom collector at scrape time (design rule 5: no prometheus-client call per packet).

Names: ``derp_`` for the relay (the prefix derper uses for the same counters), ``stun_`` for
the STUN server (the same in derpd and stund), ``derpd_`` for the program itself
(``derpd_build_info``) and its coordinator (``derpd_coordinator_``); ``process_`` and
``python_`` are prometheus-client's.  Counters end in ``_total``, gauges never do.  Label
values come from closed vocabularies (``DROP_REASONS``, ``KINDS``, ``HTTP_ROUTES``, ...),
pre-created at zero so dashboards and alerts see every series from the start.

Per-process series (``process_*``, ``python_*``, see ``ProcessMetrics``) carry a ``worker``
label in every mode: ``"0"`` for a single process, ``"0"``..``"N-1"`` and ``"parent"`` with
``--workers N``.  Every other series is one per relay (``derpd.workers`` merges them).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from . import __version__, accel

DROP_REASONS = (
    "unknown_dest",
    "unknown_dest_on_fwd",
    "gone_disconnected",
    "queue_head",
    "queue_tail",
    "write_error",
    "dup_client",
)
KINDS = ("disco", "other")
# Plain-HTTP routes (``http_front``'s table, plus /debug and everything else, "home").
HTTP_ROUTES = ("derp", "probe", "generate_204", "robots", "metrics", "bootstrap_dns", "debug", "home")
# Control frames a logged-in client sends (SendPacket and ForwardPacket are counted as packets).
FRAME_TYPES = ("ping", "pong", "note_preferred", "watch_conns", "close_peer")
# Reasons of admission control (derpd.admission, derpd.localapi).
ADMISSION_REASONS = ("not_allowed", "verify_denied", "verify_status", "verify_bad_response", "verify_unreachable",
                     "admission_busy_source", "admission_busy_key")
# The usual reasons of failed upgrades and logins; rarer ones appear at their first event.
HANDSHAKE_REASONS = ("tls", "http_timeout", "http_write_timeout", "bad_http", "head_too_large", "login_timeout",
                     "login_too_large", "eof", "bad_client_info", "box_open_failed", "websocket_subprotocol")
# The usual reasons a logged-in connection is closed for a protocol violation.
CONNECTION_ERRORS = ("frame_too_large", "truncated_frame", "control_flood", "mesh_only_frame", "bad_send_packet")

# Families one per process: they carry a ``worker`` label (``ProcessMetrics``).
PER_PROCESS_PREFIXES = ("process_", "python_")


def data_plane() -> str:
    """Which packet path runs: ``compiled`` (derpd/_dataplane.c) or ``pure`` (Python)."""
    return "compiled" if accel.dataplane is not None else "pure"


def build_info() -> GaugeMetricFamily:
    """``derpd_build_info{version, data_plane} 1``."""
    fam = GaugeMetricFamily("derpd_build_info", "derpd's version and data plane (compiled or pure); always 1.",
                            labels=["version", "data_plane"])
    fam.add_metric([__version__, data_plane()], 1)
    return fam


class ProcessMetrics(Collector):
    """The families of ``source`` (prometheus-client's default registry: process, Python, and
    in-process STUN), with ``worker="<worker>"`` added to the per-process ones."""

    def __init__(self, source: Any, worker: str) -> None:
        self._source = source
        self.worker = worker

    def collect(self) -> Iterable[Any]:
        for fam in self._source.collect():
            if fam.name.startswith(PER_PROCESS_PREFIXES):
                fam = copy.copy(fam)  # a collector may hand out the same family every time (python_info)
                fam.samples = [s._replace(labels={**s.labels, "worker": self.worker}) for s in fam.samples]
            yield fam


class RelayStats:
    """Plain counters, mutated by the relay's tasks (all on one thread)."""

    def __init__(self) -> None:
        self.accepts = 0
        self.websocket_accepts = 0
        self.current_connections = 0
        self.current_home_connections = 0
        self.current_notideal_connections = 0
        self.dup_client_conns = 0
        self.packets_received = 0
        self.bytes_received = 0
        self.disco_packets_received = 0
        self.packets_sent = 0
        self.bytes_sent = 0
        self.packets_forwarded_in = 0
        self.packets_forwarded_out = 0
        self.bytes_forwarded_in = 0
        self.bytes_forwarded_out = 0
        self.got_ping = 0
        self.sent_pong = 0
        self.home_moves_in = 0
        self.home_moves_out = 0
        self.write_timeouts = 0
        # Unexpected exceptions, each contained to one connection: in its Python tasks or in the
        # compiled data plane.
        self.internal_errors: Counter[str] = Counter({"connection": 0, "dataplane": 0})
        self.unknown_frames = 0
        self.rate_limit_waits = 0
        self.frames_received: Counter[str] = Counter(dict.fromkeys(FRAME_TYPES, 0))
        self.handshake_failures: Counter[str] = Counter(dict.fromkeys(HANDSHAKE_REASONS, 0))
        self.connection_errors: Counter[str] = Counter(dict.fromkeys(CONNECTION_ERRORS, 0))
        self.http_requests: Counter[str] = Counter(dict.fromkeys(HTTP_ROUTES, 0))
        self.peer_gone_sent: Counter[str] = Counter({"disconnected": 0, "not_here": 0})
        self.admission_refused: Counter[str] = Counter(dict.fromkeys(ADMISSION_REASONS, 0))
        self.throttled: Counter[str] = Counter({"control_frames": 0})
        self.accepts_rejected: Counter[str] = Counter({"rate_limit": 0, "per_ip_limit": 0})
        self.tls_reloads: Counter[str] = Counter({"ok": 0, "error": 0})
        self.dropped_packets: Counter[tuple[str, str]] = Counter({(r, k): 0 for r in DROP_REASONS for k in KINDS})
        self.dropped_bytes: Counter[tuple[str, str]] = Counter({(r, k): 0 for r in DROP_REASONS for k in KINDS})

    def drop(self, reason: str, disco: bool, nbytes: int, count: int = 1) -> None:
        kind = "disco" if disco else "other"
        self.dropped_packets[reason, kind] += count
        self.dropped_bytes[reason, kind] += nbytes


class RelayCollector(Collector):
    """Exports a ``RelayStats`` plus the registry's gauges at scrape time."""

    def __init__(self, stats: RelayStats, gauges: "GaugeSource") -> None:
        self._s = stats
        self._g = gauges

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self._s

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield build_info()
        yield gauge("derp_current_connections", "Logged-in DERP connections (incl. duplicates and mesh peers).",
                    s.current_connections - self._g.internal_connections())
        yield gauge("derp_current_home_connections", "Connections whose last NotePreferred was true.",
                    s.current_home_connections)
        yield gauge("derp_current_notideal_connections", "Connections that sent an Ideal-Node header.",
                    s.current_notideal_connections)
        g = self._g.gauge_values()
        for name, (doc, value) in g.items():
            yield gauge(name, doc, value)
        yield from self._g.extra_families()
        yield counter("derp_accepts", "Connections handed to the DERP server (before login).", s.accepts)
        yield counter("derp_websocket_accepts", "WebSocket DERP connections accepted.", s.websocket_accepts)
        yield counter("derp_dup_client_conns", "Connections accepted while their key already had one.",
                      s.dup_client_conns)
        yield counter("derp_packets_received", "SendPacket packets received from clients.", s.packets_received)
        yield counter("derp_bytes_received", "SendPacket payload bytes received from clients.", s.bytes_received)
        kind = CounterMetricFamily("derp_packets_received_kind", "Packets received, by disco detection.",
                                   labels=["kind"])
        kind.add_metric(["disco"], s.disco_packets_received)
        kind.add_metric(["other"], s.packets_received - s.disco_packets_received)
        yield kind
        yield counter("derp_packets_sent", "RecvPacket frames written to clients.", s.packets_sent)
        yield counter("derp_bytes_sent", "RecvPacket payload bytes written to clients.", s.bytes_sent)
        yield counter("derp_packets_forwarded_in", "ForwardPacket frames accepted from mesh peers.",
                      s.packets_forwarded_in)
        yield counter("derp_packets_forwarded_out", "Packets forwarded to mesh peers.", s.packets_forwarded_out)
        yield counter("derp_bytes_forwarded_in", "Packet bytes accepted from mesh peers.", s.bytes_forwarded_in)
        yield counter("derp_bytes_forwarded_out", "Packet bytes forwarded to mesh peers.", s.bytes_forwarded_out)
        yield counter("derp_got_ping", "Ping frames received.", s.got_ping)
        yield counter("derp_sent_pong", "Pong frames written.", s.sent_pong)
        yield counter("derp_home_moves_in", "NotePreferred changes to home after the first 5 s.", s.home_moves_in)
        yield counter("derp_home_moves_out", "NotePreferred changes away from home after the first 5 s.",
                      s.home_moves_out)
        yield counter("derp_write_timeouts", "Send loops ended by the write deadline.", s.write_timeouts)
        yield counter("derp_unknown_frames", "Frames of unknown types skipped after login.", s.unknown_frames)
        yield counter("derp_rate_limit_waits", "Times a client's reader waited for its receive rate limit.",
                      s.rate_limit_waits)
        for name, doc, label, values in (
            ("derp_internal_errors", "Unexpected exceptions (a bug), each closing one connection, by where: "
             "its Python tasks or the compiled data plane.", "where", s.internal_errors),
            ("derp_frames_received", "Control frames received after login, by type.", "type", s.frames_received),
            ("derp_handshake_failures", "Failed HTTP upgrades and logins, by reason.", "reason",
             s.handshake_failures),
            ("derp_connection_errors", "Logged-in connections closed for a protocol violation, by reason.",
             "reason", s.connection_errors),
            ("derp_http_requests", "Plain HTTP requests on the relay ports, by route.", "route", s.http_requests),
            ("derp_peer_gone_frames", "PeerGone frames sent, by reason.", "reason", s.peer_gone_sent),
            ("derp_admission_refused", "Clients refused by admission control, by reason.", "reason",
             s.admission_refused),
            ("derp_accepts_rejected", "TCP connections closed at accept by a limit, by reason.", "reason",
             s.accepts_rejected),
            ("derp_tls_reloads", "TLS certificate reloads, by result.", "result", s.tls_reloads),
            ("derp_throttled", "Times a client's reader was slowed by a per-client budget, by reason.", "reason",
             s.throttled),
        ):
            fam = CounterMetricFamily(name, doc, labels=[label])
            for k, v in sorted(values.items()):
                fam.add_metric([k], v)
            yield fam
        for name, doc, values in (
            ("derp_packets_dropped", "Packets dropped, by reason and kind.", s.dropped_packets),
            ("derp_bytes_dropped", "Packet bytes dropped, by reason and kind.", s.dropped_bytes),
        ):
            fam = CounterMetricFamily(name, doc, labels=["reason", "kind"])
            for (r, k), v in sorted(values.items()):
                fam.add_metric([r, k], v)
            yield fam


class GaugeSource:
    """Something that reports gauges computed from live state (the client registry)."""

    def gauge_values(self) -> dict[str, tuple[str, float]]:  # pragma: no cover - interface
        raise NotImplementedError

    def extra_families(self) -> list:
        return []

    def internal_connections(self) -> int:
        """Connections that are plumbing, not clients (the links between ``--workers``)."""
        return 0
