"""``DataPlane``: the Trio side of the compiled packet path for plain-TCP and TLS clients.

With the optional extension ``derpd._dataplane`` (derpd/_dataplane.c, Linux) a logged-in
plain-TCP or TLS-on-TCP client no longer has a reader and a writer task.  Its socket joins one epoll set
owned by the extension; one task here waits until that set has work and calls ``poll()``,
which reads every ready socket once, routes each SendPacket to its destination and writes
each destination's queue with one ``writev`` -- with no Python per packet.  A wakeup that
finds packets from many clients handles them all.

What the extension does not handle it hands back to the connection's own task as raw bytes
(another frame type, a packet for a key with no local connection, EOF, and every byte while a
receive rate limit is configured); that task runs the same Python code as a TLS client's
reader (``ClientConnection``), then gives the socket back.  A socket whose path the extension
closed (read or write error, write timeout) is closed through ``close(reason)``.

Without the extension (no C compiler, not Linux, ``DERPD_PURE=1``) ``DataPlane.engine`` is
None and every connection keeps its Python reader and writer.

Failure policy: an exception raised while the engine serves one connection (a callback, an
``SSLObject`` method, memory) closes that connection alone ("engine_error"), counted in
``derp_internal_errors{where="dataplane"}`` with one warning line; an exception out of ``poll()`` that belongs to
no connection is counted and logged the same way and the loop goes on (the engine keeps the
events it had not returned for the next call).  No failure of the engine ends the relay's
other connections, as none does on the Python path.

The contract between the C and Python (``_dataplane.CONTRACT``, checked by
tests/derpd/test_contract.py): a connection is an opaque token to the engine -- handed to the
callbacks and returned in events, never read or called.  Everything the engine needs comes in
explicitly: at construction the callbacks (the registry's ``watch_peer_gone`` and
``note_activity``; ``enqueue`` for a destination the engine does not own, which keeps that
destination's PeerGone bookkeeping and queues the frame through ``Member.enqueue``; ``count``
and ``drop`` for the counters; ``clock``), at registration (``Engine.add``) the connection's
``key`` and ``saw_src`` set (``EngineConnection``); TLS slots come with a standard
``ssl.SSLObject`` and its BIOs, whose methods are bound once.  Whether a duplicate connection
becomes the active one is read from the registry's ``active`` dict, not from the connection.
Those callbacks never re-enter the engine to add, remove or resume a slot or to poll (the
engine raises there, and the failure policy above closes the connection being served).

Time: the engine reads the relay's clock (``clock``, ``trio.current_time`` by default) once at
the start of ``poll``, ``enqueue``, ``send_control`` and ``expire``; write deadlines and queue
delays are measured on it, so trio's ``MockClock`` drives the write timeout in tests as it
drives the Python writer's.

Dependencies: this module is below ``client_connection`` (which uses it) and knows
connections only through ``EngineConnection`` and the registry's ``Member``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from ..keys import NodePublic

import trio

from ..accel import dataplane
from ..metrics import RelayStats
from ..protocol.messages import DISCO_MAGIC, DISCO_MIN_LEN
from .registry import Member

log = logging.getLogger("derpd.relay")

#: After an exception out of poll() that no connection caused, the loop waits this long.
ERROR_PAUSE = 0.01

KIND_DATA, KIND_EOF, KIND_CLOSED, KIND_FAILED = 0, 1, 2, 3


class EngineConnection(Protocol):
    """A connection the engine serves (``client_connection.ClientConnection``): everything the
    data plane reads or calls on it.  The C itself reads nothing: ``key`` and ``saw_src`` are
    passed to ``Engine.add`` by the caller (``_dataplane.CONTRACT["add"]``); the rest is used
    here, on the engine's events."""

    public: NodePublic
    key: bytes  # the raw 32-byte key (Engine.add)
    saw_src: set[bytes]  # senders whose PeerGone it should hear: the same set for its whole life (Engine.add)

    def engine_handoff(self, data: bytes, eof: bool) -> None:
        """Bytes the engine did not handle; the engine stops reading until ``resume``."""
        ...

    def close(self, reason: str) -> None:
        ...


class DataPlane:
    """One per relay process; ``engine`` is None without the compiled extension."""

    def __init__(
        self,
        active: dict[bytes, Any],
        watch: Callable[[Any, bytes], None],
        note_activity: Callable[[Any], None],
        stats: RelayStats,
        *,
        send_limit: int,
        depth: int,
        recv_size: int,
        write_timeout: float,
        passthrough: Callable[[], bool],
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.stats = stats
        self.write_timeout = write_timeout
        self._passthrough = passthrough
        self._watch = watch
        self.engine: Any = None
        if dataplane is not None:
            self.engine = dataplane.Engine(
                active, **self.callbacks(watch, note_activity, clock), disco_magic=DISCO_MAGIC,
                disco_min_len=DISCO_MIN_LEN, send_limit=send_limit, depth=depth, recv_size=recv_size,
            )

    def callbacks(self, watch: Callable[[Any, bytes], None], note_activity: Callable[[Any], None],
                  clock: Callable[[], float]) -> dict[str, Callable[..., Any]]:
        """The engine's callbacks by name (``_dataplane.CONTRACT["callbacks"]``)."""
        return {"watch": watch, "note_activity": note_activity, "enqueue": self._enqueue_other,
                "count": self._count, "drop": self.stats.drop, "clock": clock}

    def _enqueue_other(self, conn: Member, src: bytes, frame: bytes, disco: bool) -> bool:
        """A packet for a destination the engine does not own (WebSocket, mesh, a TLS stream
        not taken over): its PeerGone bookkeeping, then its own queue; True when now full."""
        if src not in conn.saw_src:
            self._watch(conn, src)
        return conn.enqueue(frame, disco)

    def _count(self, packets_in: int, bytes_in: int, disco_in: int, packets_out: int, bytes_out: int) -> None:
        s = self.stats
        s.packets_received += packets_in
        s.bytes_received += bytes_in
        s.disco_packets_received += disco_in
        s.packets_sent += packets_out
        s.bytes_sent += bytes_out

    async def run(self) -> None:
        """Serve the engine's sockets until cancelled (and expire writes that wait too long)."""
        if self.engine is None:
            return
        async with trio.open_nursery() as nursery:
            if self.write_timeout:
                nursery.start_soon(self._expire_loop)
            await self._poll_loop()

    async def _poll_loop(self) -> None:
        engine = self.engine
        fd = engine.fileno()
        wait_readable = trio.lowlevel.wait_readable
        poll = engine.poll
        passthrough = self._passthrough
        deliver = self._deliver
        backlogged = engine.backlogged
        checkpoint = trio.lowlevel.checkpoint
        while True:
            if backlogged():  # frames wait for a full destination: one round for the others first
                await checkpoint()
            else:
                await wait_readable(fd)
            try:
                events = poll(passthrough())
            except Exception as e:  # no connection to pin it on: count it and go on
                self._failed(None, e)
                await trio.sleep(ERROR_PAUSE)  # a failure that repeats costs no busy loop
                continue
            if events:
                deliver(events)

    async def _expire_loop(self) -> None:
        timeout = self.write_timeout
        tick = min(0.5, timeout / 4)
        while True:
            await trio.sleep(tick)
            try:
                events = self.engine.expire(timeout)
            except Exception as e:
                self._failed(None, e)
                continue
            if events:
                self._deliver(events)

    def _failed(self, conn: EngineConnection | None, exc: object) -> None:
        self.stats.internal_errors["dataplane"] += 1
        who = conn.public.short() if conn is not None else "no connection"
        log.warning("data plane error (%s): %r%s", who, exc, ", closing it" if conn is not None else "")

    def _deliver(self, events: list[tuple[EngineConnection, int, Any]]) -> None:
        for conn, kind, data in events:
            if kind == KIND_CLOSED:
                if data == "write_timeout":
                    self.stats.write_timeouts += 1
                    log.debug("write timeout to %s, closing", conn.public.short())
                elif data == "tls_output_limit":
                    self.stats.connection_errors[data] += 1
                    log.debug("%s asks for TLS answers it does not read, closing", conn.public.short())
                conn.close(data)
            elif kind == KIND_FAILED:
                self._failed(conn, data)
                conn.close("engine_error")
            else:
                conn.engine_handoff(data, kind == KIND_EOF)


__all__ = ["DataPlane", "EngineConnection"]
