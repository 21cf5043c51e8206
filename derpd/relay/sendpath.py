"""A connection's send path: its queues, its writer, its drop accounting -- and where its reader's
bytes come from.  One interface, ``SendPath``, with two implementations:

``PySendPath``
    Two bounded deques (disco and other) that drop the oldest packet when full, a control list
    that is never dropped from, and a writer task that takes everything queued and writes it with
    one ``send_all`` under the write deadline.  On plain TCP a packet for an idle writer is
    written at once by the sender (write-through).  The reader reads the stream itself.

``EngineSendPath``
    The socket belongs to a slot of the compiled data plane (derpd/_dataplane.c through
    ``relay.dataplane``): the engine queues, writes and reads; Python gets back the bytes the
    engine does not handle.  This class is the only place in ``derpd.relay`` that touches an
    engine slot (add, resume, enqueue, send_control, pending, slot_stats, remove).

``ClosedSendPath``
    What a connection has after its teardown: packets still routed to it are counted as
    dropped (``gone_disconnected``), control frames are ignored.

A connection starts on a ``PySendPath`` (packets may be queued for it from its registration on,
before its ServerInfo is out); when it starts serving it either keeps it, or moves what was
queued onto an ``EngineSendPath`` (``EngineSendPath.attach``) -- once.  It binds the chosen
path's ``enqueue`` and ``send_control`` as its own, so a packet costs no call more than the
path's own method.

Dependencies: this module knows connections only through ``Owner`` and the engine only through
the calls listed above; it imports nothing from ``client_connection`` or ``server``.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any, Protocol

import trio

from ..keys import KEY_LEN
from ..metrics import RelayStats
from ..protocol.frames import FrameDecoder
from ..transport.raw_socket import RawSocketIO
from .diagnostics import QueueDelay

log = logging.getLogger("derpd.relay")

RECV_SIZE = 256 * 1024
RECV_OVERHEAD = 5 + KEY_LEN  # header + source key in front of each queued packet
QD_EVERY = 64  # one packet in 64 has its queue delay measured (derp_queue_delay_seconds)


class Owner(Protocol):
    """The connection a send path serves, as the path sees it."""

    public: Any  # NodePublic, for log lines
    close_reason: str


class SendPath(Protocol):
    """What a connection does with the frames routed to it, and how its reader gets bytes."""

    def enqueue(self, frame: bytes, disco: bool) -> bool:
        """Queue a ready RecvPacket frame; never blocks, drops the oldest when full.  True when
        the queue is now full, so the router can yield to let it drain."""
        ...

    def send_control(self, frame: bytes) -> None:
        """Queue a frame that must not be dropped (PeerGone, PeerPresent, Health...)."""
        ...

    def send_pong(self, frame: bytes) -> None:
        """Queue the answer to a Ping."""
        ...

    def has_pending(self) -> bool:
        """Anything queued or being written right now."""
        ...

    def counters(self) -> dict[str, int]:
        """Queue depths and what this path itself counted: queued, queued_disco, queued_control,
        packets_in, bytes_in, packets_out, bytes_out, drops_queue_full."""
        ...

    async def serve(self, read_loop: Callable[[], Awaitable[None]]) -> None:
        """Run ``read_loop`` (and the writer, if this path has one) until either ends."""
        ...

    async def receive(self, decoder: FrameDecoder) -> bool:
        """Feed the next bytes to ``decoder``; False at EOF (fed as ``b""``)."""
        ...

    def close(self) -> dict[str, int]:
        """Count what is still queued as dropped, release the socket's slot if any; returns
        the final ``counters()``."""
        ...


def _counts(queued: int = 0, queued_disco: int = 0, queued_control: int = 0, packets_in: int = 0,
            bytes_in: int = 0, packets_out: int = 0, bytes_out: int = 0, drops: int = 0) -> dict[str, int]:
    return {"queued": queued, "queued_disco": queued_disco, "queued_control": queued_control,
            "packets_in": packets_in, "bytes_in": bytes_in, "packets_out": packets_out, "bytes_out": bytes_out,
            "drops_queue_full": drops}


# ---------------------------------------------------------------------------------- Python


class PySendPath:
    """Bounded queues and a writer task (see the module docstring)."""

    __slots__ = (
        "_owner", "_stats", "_queue_delay", "_raw", "_stream", "_depth", "_write_timeout", "_queue",
        "_disco_queue", "_control", "_pong", "_lot", "_parked", "_writing", "tx_packets", "tx_bytes",
        "drops_queue", "_qd_tick", "_qd_frame", "_qd_t", "_receive_some",
    )

    def __init__(self, owner: Owner, stats: RelayStats, queue_delay: QueueDelay, stream: trio.abc.Stream,
                 raw: RawSocketIO | None, *, depth: int, write_timeout: float) -> None:
        self._owner = owner
        self._stats = stats
        self._queue_delay = queue_delay
        self._stream = stream
        self._raw = raw  # plain TCP: fewer syscalls and wakeups; None for TLS/WebSocket
        self._receive_some = raw.receive_some if raw is not None else stream.receive_some
        self._depth = depth
        self._write_timeout = write_timeout
        self._queue: deque[bytes] = deque()
        self._disco_queue: deque[bytes] = deque()
        self._control: list[bytes] = []
        self._pong: bytes | None = None
        self._lot = trio.lowlevel.ParkingLot()
        self._parked = False
        self._writing = False
        self.tx_packets = self.tx_bytes = self.drops_queue = 0
        # Queue delay: one packet in QD_EVERY is stamped when queued and observed when written.
        self._qd_tick = 0
        self._qd_frame: bytes | None = None
        self._qd_t = 0.0

    def enqueue(self, frame: bytes, disco: bool) -> bool:
        tick = self._qd_tick  # counts down to 0 (small ints: no allocation per packet)
        if tick:
            self._qd_tick = tick - 1
        else:
            self._qd_tick = QD_EVERY - 1
            if self._qd_frame is None:
                self._qd_frame = frame
                self._qd_t = perf_counter()
        if self._parked and self._raw is not None:
            # The writer is idle, so nothing is queued: write now and save its wakeup.  What
            # the kernel did not take goes first in the writer's never-dropped control queue.
            try:
                n = self._raw.send_now(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                n = 0
            if n:
                stats = self._stats
                stats.packets_sent += 1
                stats.bytes_sent += len(frame) - RECV_OVERHEAD
                self.tx_packets += 1
                self.tx_bytes += len(frame) - RECV_OVERHEAD
                if n == len(frame):
                    if self._qd_frame is frame:  # written at once: it waited for nothing
                        self._qd_frame = None
                        self._queue_delay.observe(0.0)
                    return False
                self._control.append(frame[n:])
                self._parked = False
                self._lot.unpark()
                return False
        q = self._disco_queue if disco else self._queue
        if len(q) >= self._depth:
            old = q.popleft()
            self._stats.drop("queue_head", disco, len(old) - RECV_OVERHEAD)
            self.drops_queue += 1
            if old is self._qd_frame:
                self._qd_frame = None
        q.append(frame)
        if self._parked:
            self._parked = False
            self._lot.unpark()
        return len(q) >= self._depth

    def send_control(self, frame: bytes) -> None:
        self._control.append(frame)
        if self._parked:
            self._parked = False
            self._lot.unpark()

    def send_pong(self, frame: bytes) -> None:
        if self._pong is None:  # one answer pending at a time, as derper
            self._pong = frame
            if self._parked:
                self._parked = False
                self._lot.unpark()

    def has_pending(self) -> bool:
        return bool(self._queue or self._disco_queue or self._control or self._writing)

    def counters(self) -> dict[str, int]:
        return _counts(len(self._queue), len(self._disco_queue), len(self._control) + (self._pong is not None),
                       0, 0, self.tx_packets, self.tx_bytes, self.drops_queue)

    def take_queued(self) -> tuple[list[bytes], list[tuple[bytes, bool]]]:
        """Empty the queues for another path: control frames, then packets in the writer's order."""
        control = list(self._control)
        packets = [(f, False) for f in self._queue] + [(f, True) for f in self._disco_queue]
        self._control.clear()
        self._queue.clear()
        self._disco_queue.clear()
        self._qd_frame = None
        return control, packets

    async def serve(self, read_loop: Callable[[], Awaitable[None]]) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_loop, nursery.cancel_scope)
            await read_loop()
            nursery.cancel_scope.cancel()

    async def receive(self, decoder: FrameDecoder) -> bool:
        data = await self._receive_some(RECV_SIZE)
        decoder.receive_data(data)
        return bool(data)

    def close(self) -> dict[str, int]:
        final = self.counters()
        final["queued"] = final["queued_disco"] = final["queued_control"] = 0
        stats = self._stats
        for q, disco in ((self._queue, False), (self._disco_queue, True)):
            if q:
                stats.drop("gone_disconnected", disco, sum(len(f) for f in q) - RECV_OVERHEAD * len(q), len(q))
                q.clear()
        self._control.clear()
        return final

    async def _write_loop(self, scope: trio.CancelScope) -> None:
        """Take everything queued, write it in one ``send_all`` under the write deadline.

        One cancel scope covers the whole loop; its deadline is set around each write that
        has to wait and lifted after, which is much cheaper than a ``fail_after`` per write.
        """
        stats = self._stats
        queue, disco_queue, control = self._queue, self._disco_queue, self._control
        raw = self._raw
        send_all = raw.send_all if raw is not None else self._stream.send_all
        lot = self._lot
        timeout = self._write_timeout
        inf = float("inf")
        npk = pbytes = 0
        deadline = trio.CancelScope()
        try:
            with deadline:
                while True:
                    if not (queue or disco_queue or control or self._pong is not None):
                        self._parked = True
                        await lot.park()
                    parts: list[bytes] = []
                    if control:
                        parts.extend(control)
                        control.clear()
                    if self._pong is not None:
                        parts.append(self._pong)
                        self._pong = None
                        stats.sent_pong += 1
                    npk = len(queue) + len(disco_queue)
                    qd = self._qd_frame  # a stamped packet is in this write (a drop forgets it)
                    if npk:
                        pbytes = sum(map(len, queue)) + sum(map(len, disco_queue)) - RECV_OVERHEAD * npk
                        parts.extend(queue)
                        queue.clear()
                        parts.extend(disco_queue)
                        disco_queue.clear()
                    else:
                        pbytes = 0
                    if not parts:
                        continue
                    data = b"".join(parts)
                    # On plain TCP most writes go through at once: no deadline to arm then.
                    sent = raw.send_now(data) if raw is not None else 0
                    if sent < len(data):
                        self._writing = True
                        deadline.deadline = trio.current_time() + timeout
                        await send_all(data[sent:] if sent else data)
                        deadline.deadline = inf
                        self._writing = False
                    if npk:
                        stats.packets_sent += npk
                        stats.bytes_sent += pbytes
                        self.tx_packets += npk
                        self.tx_bytes += pbytes
                    if qd is not None:
                        if qd is self._qd_frame:
                            self._qd_frame = None
                        self._queue_delay.observe(perf_counter() - self._qd_t)
            if deadline.cancelled_caught:
                stats.write_timeouts += 1
                stats.drop("write_error", False, pbytes, npk)
                self._owner.close_reason = "write_timeout"
                log.debug("write timeout to %s, closing", self._owner.public.short())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._owner.close_reason = self._owner.close_reason or "write_error"
        finally:
            scope.cancel()


# ---------------------------------------------------------------------------------- engine


class EngineSendPath:
    """A slot of the compiled data plane (see the module docstring).  The engine finds the
    connection's slot through ``conn.engine_slot``, which this class sets and clears."""

    __slots__ = ("_engine", "_conn", "_stats", "slot", "_handoff", "_lot", "_before", "_final")

    def __init__(self, engine: Any, conn: Any, stats: RelayStats, slot: int, before: dict[str, int]) -> None:
        self._engine = engine
        self._conn = conn
        self._stats = stats
        self.slot = slot
        conn.engine_slot = slot
        self._handoff: tuple[bytes, bool] | None = None
        self._lot = trio.lowlevel.ParkingLot()
        self._before = before  # what the Python path counted before the engine took over
        self._final: dict[str, int] | None = None

    @classmethod
    def attach(cls, engine: Any, conn: Any, stats: RelayStats, stream: trio.abc.Stream, raw: RawSocketIO | None,
               queued: PySendPath) -> EngineSendPath | None:
        """Hand the socket (plain TCP, or TLS directly on TCP) to the engine: it reads and writes
        from now on, and what ``queued`` held goes first, in the writer's order.  None if this
        stream stays with Python (the queues are then left as they were).  The engine's
        registration call, in one place."""
        if raw is not None:
            slot = engine.add(stream.socket.fileno(), conn, conn.key, conn.saw_src)  # type: ignore[attr-defined]
        else:
            takeover = getattr(stream, "takeover", None)
            parts = takeover() if takeover is not None else None
            if parts is None:
                return None
            fd, obj, incoming, outgoing = parts
            slot = engine.add(fd, conn, conn.key, conn.saw_src, (obj, incoming, outgoing))
        path = cls(engine, conn, stats, slot, queued.counters())
        control, packets = queued.take_queued()
        for frame in control:
            engine.send_control(slot, frame)
        for frame, disco in packets:
            engine.enqueue(slot, frame, disco)
        return path

    def enqueue(self, frame: bytes, disco: bool) -> bool:
        return self._engine.enqueue(self.slot, frame, disco)

    def send_control(self, frame: bytes) -> None:
        self._engine.send_control(self.slot, frame)

    def send_pong(self, frame: bytes) -> None:
        self._engine.send_control(self.slot, frame)
        self._stats.sent_pong += 1

    def has_pending(self) -> bool:
        return self._final is None and self._engine.pending(self.slot)

    def counters(self) -> dict[str, int]:
        if self._final is not None:
            return dict(self._final)
        c = _counts(*self._engine.slot_stats(self.slot))
        before = self._before
        for k in ("packets_out", "bytes_out", "drops_queue_full"):
            c[k] += before[k]
        return c

    def handoff(self, data: bytes, eof: bool) -> None:
        """The engine handed back bytes it does not handle; it reads no more until ``receive``."""
        self._handoff = (data, eof)
        self._lot.unpark()

    async def serve(self, read_loop: Callable[[], Awaitable[None]]) -> None:
        await read_loop()  # the engine writes

    async def receive(self, decoder: FrameDecoder) -> bool:
        # Give the socket back to the engine with what is left of a frame, and wait for the next
        # bytes it does not handle itself (all of them while the decoder is still discarding an
        # unknown frame).
        self._engine.resume(self.slot, decoder.take_buffered(), decoder.skipping)
        while self._handoff is None:
            await self._lot.park()
        data, eof = self._handoff
        self._handoff = None
        if data:
            decoder.receive_data(data)
        if eof:
            data = b""
            decoder.receive_data(data)
        return bool(data)

    def close(self) -> dict[str, int]:
        if self._final is None:
            final = self.counters()
            final["queued"] = final["queued_disco"] = final["queued_control"] = 0
            self._engine.remove(self.slot)  # counts its queue as dropped
            self._final = final
            self._conn.engine_slot = -1
        return dict(self._final)


# ---------------------------------------------------------------------------------- closed


class ClosedSendPath:
    """After the teardown: what is still routed here is dropped and counted."""

    __slots__ = ("_stats", "_final")

    def __init__(self, stats: RelayStats, final: dict[str, int]) -> None:
        self._stats = stats
        self._final = final

    def enqueue(self, frame: bytes, disco: bool) -> bool:
        self._stats.drop("gone_disconnected", disco, len(frame) - RECV_OVERHEAD)
        return False

    def send_control(self, frame: bytes) -> None:
        pass

    def send_pong(self, frame: bytes) -> None:
        pass

    def has_pending(self) -> bool:
        return False

    def counters(self) -> dict[str, int]:
        return dict(self._final)

    async def serve(self, read_loop: Callable[[], Awaitable[None]]) -> None:
        pass

    async def receive(self, decoder: FrameDecoder) -> bool:
        decoder.receive_data(b"")
        return False

    def close(self) -> dict[str, int]:
        return dict(self._final)


__all__ = ["QD_EVERY", "RECV_OVERHEAD", "RECV_SIZE", "ClosedSendPath", "EngineSendPath", "Owner", "PySendPath",
           "SendPath"]
