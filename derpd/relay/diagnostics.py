"""Per-client diagnostics for operators: the queue-delay histogram and ``/debug/clients``.

``derp_queue_delay_seconds``
    How long a packet waits inside the relay, from the moment it is queued for its receiver to
    the moment the write that carries it returns.  One packet in 64 per receiver is stamped
    (``QD_EVERY`` in ``sendpath``; the compiled data plane samples the same way and
    keeps its own buckets, ``Engine.queue_delay()``), so the cost per packet is a counter, and
    a clock read only for the stamped ones.  A packet written the moment it arrives counts as
    (close to) zero.

``/debug/clients``
    One JSON row per connection, the ones that hurt most first: most packets dropped because
    their queue was full, then the fullest queues, then the most bytes waiting in the kernel.
    Each row has the queue depth, drops by reason, packets and bytes each way, the Health text
    the client was sent, and the TCP path from ``TCP_INFO`` (RTT, retransmits, congestion
    window); the ``getsockopt`` runs only for the rows returned, only when the page is asked
    for.  ``?key=nodekey:...`` shows one node (all its connections); ``?limit=N`` (default 100,
    at most 1000) bounds the answer.

Dependencies: used by ``server``, ``sendpath`` and ``debug``; imports nothing from ``derpd.relay``.
"""

from __future__ import annotations

import json
import socket
import struct
from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

# Upper bounds of the histogram buckets, in seconds (the compiled data plane uses the same).
QD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


class QueueDelay:
    """A plain histogram (cumulative on export), filled by the Python writer."""

    __slots__ = ("counts", "total", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(QD_BUCKETS) + 1)  # the last one: over the largest bound
        self.total = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(QD_BUCKETS, seconds)] += 1
        self.total += 1
        self.sum += seconds

    def family(self, engine: Any = None):  # noqa: ANN201
        """The Prometheus family, with the compiled data plane's samples added."""
        from prometheus_client.core import HistogramMetricFamily

        counts = list(self.counts)
        total_sum = self.sum
        if engine is not None and hasattr(engine, "queue_delay"):
            bounds, ecounts, esum = engine.queue_delay()
            if tuple(bounds) == QD_BUCKETS:
                counts = [a + b for a, b in zip(counts, ecounts)]
                total_sum += esum
        buckets = []
        running = 0
        for bound, n in zip((*map(repr, QD_BUCKETS), "+Inf"), counts):
            running += n
            buckets.append((bound, running))
        return HistogramMetricFamily(
            "derp_queue_delay_seconds",
            "Time a packet waited inside the relay before it was written (one packet in 64 sampled).",
            buckets=buckets, sum_value=total_sum)


# ------------------------------------------------------------------------------ TCP_INFO

# struct tcp_info (linux/tcp.h): 8 one-byte fields, then 32-bit fields from offset 8.
_TCP_INFO_LEN = 160
_U32 = struct.Struct("<I")
_FIELDS = {  # name: byte offset of a u32 (times in microseconds)
    "rto_us": 8, "unacked": 24, "lost": 32, "retrans": 36, "pmtu": 60, "rtt_us": 68, "rttvar_us": 72,
    "snd_ssthresh": 76, "snd_cwnd": 80, "total_retrans": 100, "notsent_bytes": 144, "min_rtt_us": 148,
}


def tcp_info(sock: socket.socket | None) -> dict[str, Any] | None:
    """RTT, retransmits and congestion window of a TCP socket (Linux), or None."""
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    info: dict[str, Any] = {}
    for name, off in _FIELDS.items():
        if off + 4 <= len(raw):
            info[name] = _U32.unpack_from(raw, off)[0]
    if len(raw) > 2:
        info["retransmits"] = raw[2]  # consecutive unanswered retransmits right now
    out: dict[str, Any] = {}
    for name, value in info.items():
        if name.endswith("_us"):
            out[name[:-3] + "_ms"] = round(value / 1000, 3)
        else:
            out[name] = value
    return out


# ------------------------------------------------------------------------------ /debug/clients


def _hurt(row: dict[str, Any]) -> tuple[int, int, int]:
    return (row["drops"]["queue_full"], row["queue"]["packets"] + row["queue"]["disco"], row["bytes_out"])


def client_rows(conns: Iterable[Any], now: float) -> list[dict[str, Any]]:
    """One row per connection (no syscalls), unsorted."""
    rows = []
    for c in conns:
        k = c.counters()
        h = c.health
        rows.append({
            "key": str(c.public),
            "remote": f"{c.remote_ip}:{c.remote_port}",
            "kind": "mesh" if c.can_mesh else "prober" if h is False else "client",
            "path": "dataplane" if c.engine_slot >= 0 else "python",
            "duplicate": c.is_dup,
            "home": c.preferred,
            "connected_s": round(now - c.connected_at, 1),
            "queue": {"packets": k["queued"], "disco": k["queued_disco"], "control": k["queued_control"]},
            "drops": {"queue_full": k["drops_queue_full"], "unknown_dest": k["drops_unknown_dest"]},
            "packets_in": k["packets_in"], "bytes_in": k["bytes_in"],
            "packets_out": k["packets_out"], "bytes_out": k["bytes_out"],
            "health": h.sent if h else "",
            "_conn": c,
        })
    return rows


def clients_report(conns: Iterable[Any], now: float, *, key: str = "", limit: int = DEFAULT_LIMIT) -> bytes:
    """The ``/debug/clients`` JSON: the ``limit`` rows that hurt most (or every connection of
    ``key``), each with its ``TCP_INFO``."""
    rows = client_rows(conns, now)
    if key:
        rows = [r for r in rows if r["key"] == key]
    rows.sort(key=_hurt, reverse=True)
    total = len(rows)
    rows = rows[: max(1, min(limit, MAX_LIMIT))]
    for r in rows:
        conn = r.pop("_conn")
        r["tcp"] = tcp_info(conn.tcp_socket())
    body = {"clients": total, "shown": len(rows), "sorted_by": "drops.queue_full, queue, bytes_out",
            "rows": rows}
    return json.dumps(body, indent=1).encode() + b"\n"


def parse_limit(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        return DEFAULT_LIMIT
    return max(1, min(n, MAX_LIMIT))


__all__ = ["QD_BUCKETS", "QueueDelay", "clients_report", "parse_limit", "tcp_info"]
