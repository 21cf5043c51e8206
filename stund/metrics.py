"""stun_* Prometheus metrics, counted in plain integers on the hot path.

The server increments slots of a flat integer array (:class:`StunStats`); a custom collector
registered once in prometheus_client's default REGISTRY turns them into counter families at
scrape time.  So the metrics appear on ``stund serve --metrics-addr`` and, when derpd runs
:func:`stund.server.serve_stun` in-process, on derpd's own ``/metrics``.

With ``--workers N`` every worker process counts into its own shared-memory arrays and the
parent's collector adds them up.

``stund serve --metrics-addr`` serves :func:`registry`: the ``process_*`` and ``python_*``
series carry a ``worker`` label, as derpd's do: ``"0"`` for a single process; with
``--workers N``, ``"parent"`` for this process and ``"0"``..``"N-1"`` for the workers
(``process_*`` read from ``/proc/<pid>``: each has its own descriptors and core).

Each :class:`StunStats` has two arrays with the same layout: ``counts``, which Python code
increments under the GIL, and ``shared``, 64-bit counters that only the compiled answering
threads (``stund._mmsg.FastStun``) write, with atomic adds.  The collector sums both.

Families (derper's equivalents from spec §13.3 in brackets):

* ``stun_requests_total{family, kind}``: Binding requests received and parsed, by address
  family (``ipv4``/``ipv6``; IPv4-mapped sources count as ipv4) and kind (``tailscale``,
  ``rfc5389``, ``rfc3489``)  [``stun_addrfamily{family}``].
* ``stun_responses_total{result}``: replies sent, ``success`` or ``error`` (420)
  [``stun_requests{disposition="success"}``].
* ``stun_ignored_total{reason}``: datagrams not answered, by reason
  [``stun_requests{disposition="not_stun"}``].
* ``stun_read_errors_total``, ``stun_write_errors_total``
  [``disposition="read_error"/"write_error"``].
"""

from __future__ import annotations

import copy
import threading
from array import array
from collections.abc import Iterator, MutableSequence

from prometheus_client import ProcessCollector
from prometheus_client.core import REGISTRY, CounterMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from .binding import IGNORE_REASONS, KIND_RFC3489, KIND_RFC5389, KIND_TAILSCALE

__all__ = ["FAMILIES", "KINDS", "RESULTS", "StunStats", "PROCESS_STATS", "add_source", "add_worker_process",
           "registry", "slot_count"]

FAMILIES = ("ipv4", "ipv6")
KINDS = (KIND_TAILSCALE, KIND_RFC5389, KIND_RFC3489)
RESULTS = ("success", "error")

# Flat slot layout: requests[family][kind], responses[result], ignored[reason], read, write.
_REQ_BASE = 0
_RESP_BASE = _REQ_BASE + len(FAMILIES) * len(KINDS)
_IGN_BASE = _RESP_BASE + len(RESULTS)
_READ = _IGN_BASE + len(IGNORE_REASONS)
_WRITE = _READ + 1
_N_SLOTS = _WRITE + 1


def slot_count() -> int:
    """Length of the integer array one :class:`StunStats` needs."""
    return _N_SLOTS


class StunStats:
    """Counters as plain integers.  Methods return slot indexes so the hot path can do
    ``stats.counts[idx] += 1`` with precomputed indexes."""

    __slots__ = ("counts", "shared")

    def __init__(self, counts: MutableSequence[int] | None = None, shared: MutableSequence[int] | None = None) -> None:
        self.counts: MutableSequence[int] = counts if counts is not None else [0] * _N_SLOTS
        #: Counters of the compiled threads: a writable buffer of 64-bit integers.
        self.shared: MutableSequence[int] = shared if shared is not None else array("Q", bytes(8 * _N_SLOTS))

    @staticmethod
    def request_slot(is_ipv6: bool, kind: str) -> int:
        return _REQ_BASE + int(is_ipv6) * len(KINDS) + KINDS.index(kind)

    @staticmethod
    def response_slot(error: bool) -> int:
        return _RESP_BASE + int(error)

    @staticmethod
    def ignored_slot(reason: str) -> int:
        return _IGN_BASE + IGNORE_REASONS.index(reason)

    READ_ERROR = _READ
    WRITE_ERROR = _WRITE

    def snapshot(self) -> list[int]:
        return [a + b for a, b in zip(self.counts, self.shared, strict=True)]


#: Counters of every server running in this process.
PROCESS_STATS = StunStats()

_sources: list[MutableSequence[int]] = [PROCESS_STATS.counts, PROCESS_STATS.shared]
_sources_lock = threading.Lock()


def add_source(counts: MutableSequence[int]) -> None:
    """Adds another process's counter array (``--workers``) to what this process exports."""
    with _sources_lock:
        _sources.append(counts)


def totals() -> list[int]:
    """Sum of every source, slot by slot."""
    with _sources_lock:
        sources = list(_sources)
    out = [0] * _N_SLOTS
    for counts in sources:
        for i, v in enumerate(list(counts)):
            out[i] += v
    return out


class _StunCollector(Collector):
    def collect(self) -> Iterator[CounterMetricFamily]:
        t = totals()
        req = CounterMetricFamily(
            "stun_requests",
            "STUN Binding requests received, by source address family and request kind.",
            labels=["family", "kind"],
        )
        for fi, fam in enumerate(FAMILIES):
            for ki, kind in enumerate(KINDS):
                req.add_metric([fam, kind], t[_REQ_BASE + fi * len(KINDS) + ki])
        yield req
        resp = CounterMetricFamily(
            "stun_responses", "STUN responses sent, by result.", labels=["result"]
        )
        for ri, result in enumerate(RESULTS):
            resp.add_metric([result], t[_RESP_BASE + ri])
        yield resp
        ign = CounterMetricFamily(
            "stun_ignored", "UDP datagrams the STUN server did not answer, by reason.", labels=["reason"]
        )
        for ii, reason in enumerate(IGNORE_REASONS):
            ign.add_metric([reason], t[_IGN_BASE + ii])
        yield ign
        yield CounterMetricFamily("stun_read_errors", "STUN socket receive errors.", value=t[_READ])
        yield CounterMetricFamily("stun_write_errors", "STUN socket send errors (reply dropped).", value=t[_WRITE])

    def describe(self) -> Iterator[CounterMetricFamily]:
        return iter(())


_COLLECTOR = _StunCollector()
REGISTRY.register(_COLLECTOR)


# ---------------------------------------------------------------------------- per-process series

_PER_PROCESS = ("process_", "python_")
_workers: list[tuple[str, int]] = []  # (worker name, pid) of the --workers processes


def add_worker_process(name: str, pid: int) -> None:
    """A ``--workers`` process whose ``process_*`` series the parent exports (``registry``)."""
    with _sources_lock:
        _workers.append((name, pid))


class _ProcessLabelled(Collector):
    """The default registry's families, ``worker`` added to the per-process ones, and the
    ``process_*`` of every worker process."""

    def __init__(self, own_name: str) -> None:
        self.own_name = own_name

    def collect(self) -> Iterator[object]:
        with _sources_lock:
            workers = list(_workers)
        extra: dict[str, list[object]] = {}
        for name, pid in workers:
            for fam in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():  # type: ignore[misc]
                extra.setdefault(fam.name, []).extend(
                    s._replace(labels={**s.labels, "worker": name}) for s in fam.samples)
        for fam in REGISTRY.collect():
            if fam.name.startswith(_PER_PROCESS):
                fam = copy.copy(fam)  # a collector may hand out the same family every time (python_info)
                fam.samples = [s._replace(labels={**s.labels, "worker": self.own_name}) for s in fam.samples]
                fam.samples.extend(extra.get(fam.name, ()))  # type: ignore[arg-type]
            yield fam


def registry(own_name: str) -> CollectorRegistry:
    """What ``stund serve --metrics-addr`` serves: every metric of this process, with the
    per-process series labelled ``worker=own_name`` (and those of ``add_worker_process``)."""
    out = CollectorRegistry(auto_describe=False)
    out.register(_ProcessLabelled(own_name))
    return out
