"""One logged-in DERP client: a reader task and a writer task around bounded send queues.

Theory of operation
-------------------
The reader decodes every complete frame in its buffer at once.  For a SendPacket it looks up
the destination in ``Registry.active`` and appends a ready-made RecvPacket frame to that
destination's queue -- synchronously, never awaiting another client's socket.  The
destination's writer wakes, takes *everything* queued, and writes it with one ``send_all``
under the write deadline.

Why drop the oldest packet?  A receiver that cannot keep up must not slow down its senders
(that would let one slow phone stall a whole tailnet), and memory must stay bounded.  So each
connection has two queues of ``queue_depth`` packets (disco and other, so a data flood cannot
starve path discovery); when one is full the *oldest* packet goes: WireGuard and TCP inside
the tunnel recover from loss, and the newest data is the most useful.  Every drop is counted
by reason and kind (spec 5.3).

Control frames (Pong, PeerGone, PeerPresent for watchers) have their own small queue that is
never dropped from.  A KeepAlive goes out every ``keepalive_interval`` plus a per-connection
jitter, whatever the traffic (spec 5.6).

Whichever task ends first (EOF, protocol error, write timeout) cancels the other; the
connection then unregisters, counts what was still queued as dropped, and closes.

Dependencies: this module imports ``registry`` (below it) and never ``server``: the relay that
owns a connection is reached through the ``ConnectionHost`` interface, which
``server.RelayServer`` implements.
"""

from __future__ import annotations

import logging
import random
import struct
from collections import deque
from time import perf_counter
from typing import Protocol

import trio

from ..accel import speedups
from ..keys import KEY_LEN, NodePublic
from ..metrics import RelayStats
from ..protocol.errors import RemoteProtocolError
from ..protocol.frames import FrameDecoder, FrameType, PeerGoneReason
from ..protocol.messages import (
    DISCO_MAGIC,
    DISCO_MIN_LEN,
    ClosePeer,
    ForwardPacket,
    NotePreferred,
    Ping,
    UnknownFrame,
    WatchConns,
    encode_frame,
    encode_peer_gone,
    looks_like_disco,
    parse_client_frame,
)
from ..settings import RelaySettings
from ..transport.raw_socket import raw_io_for
from .dataplane import DataPlane
from .diagnostics import QueueDelay
from .health import HealthBoard
from .registry import Forwarder, Registry, present_flags

log = logging.getLogger("derpd.relay")

RECV_SIZE = 256 * 1024
FRAMES_PER_TURN = 256  # frames one reader handles before it lets every other task run
CONTROL_RATE = 50.0  # frames other than packets a client may send per second, after...
CONTROL_BURST = 200.0  # ...a burst of this many; past it the reader slows down (mesh peers exempt)
MESH_PUSHBACK_TIMEOUT = 5.0  # derper's mesh write timeout
_RECV_HEADER = struct.Struct(">BI")
_FRAME_NAMES = {int(t): t.name.lower() for t in FrameType}
_RECV_OVERHEAD = 5 + KEY_LEN  # header + source key in front of each queued packet
QD_EVERY = 64  # one packet in 64 has its queue delay measured (derp_queue_delay_seconds)
# The compiled SendPacket loop (derpd/_speedups.c), or None: the Python loop below does the same.
_route_packets = speedups.route_packets if speedups is not None else None


class ConnectionHost(Protocol):
    """What a connection needs from the relay that owns it (``server.RelayServer``)."""

    settings: RelaySettings
    stats: RelayStats
    registry: Registry
    dataplane: DataPlane
    queue_delay: QueueDelay
    health: HealthBoard

    def route_elsewhere(
        self, sender: ClientConnection, src: bytes, dst: bytes, packet: bytes, disco: bool, *, forwarded: bool
    ) -> Forwarder | None:
        """A packet for a key with no local connection: forward it or drop it; returns a
        congested forwarder the sender should wait for, else None."""
        ...

    def close_peer(self, target: NodePublic) -> None:
        """Close every local connection of ``target`` (a mesh peer's ClosePeer)."""
        ...

    def note_rate_limited(self, conn: ClientConnection) -> None:
        """``conn``'s reader just waited for its receive rate limit (a Health problem)."""
        ...


class ConnectionClosed(Exception):
    """Raised inside a connection's tasks to end it (ClosePeer, shutdown)."""


class ClientConnection:
    __slots__ = (
        "server", "stream", "public", "key", "info", "remote_ip", "remote_port", "can_mesh",
        "not_ideal", "present_flags", "is_dup", "preferred", "connected_at", "closing",
        "_queue", "_disco_queue", "_control", "_pong", "_lot", "_depth", "_write_timeout",
        "_nothere_tokens", "_nothere_stamp", "_cancel", "saw_src", "rate_limiter", "close_reason", "_writing",
        "_parked", "keepalive_interval", "next_keepalive", "_congested", "_ctl_tokens", "_ctl_stamp",
        "_ctl_logged", "_raw", "engine_slot", "_engine", "_handoff", "health", "rx_packets", "rx_bytes",
        "tx_packets", "tx_bytes", "drops_queue", "drops_unknown", "_qd_tick", "_qd_frame", "_qd_t",
    )

    def __init__(
        self,
        server: ConnectionHost,
        stream: trio.abc.Stream,
        public: NodePublic,
        info: object,
        remote: tuple[str, int],
        scope: trio.CancelScope,
        *,
        can_mesh: bool,
        is_prober: bool,
        not_ideal: bool,
    ) -> None:
        self.server = server
        self.stream = stream
        self._raw = raw_io_for(stream)  # plain TCP: fewer syscalls and wakeups; None for TLS/WebSocket
        self.public = public
        self.key = public.raw
        self.info = info
        self.remote_ip, self.remote_port = remote
        self.can_mesh = can_mesh
        self.not_ideal = not_ideal
        self.present_flags = present_flags(can_mesh, is_prober, not_ideal)
        self.is_dup = False
        self.preferred = False
        self.connected_at = trio.current_time()
        self.closing = False
        self.close_reason = ""
        s = server.settings
        self._depth = s.queue_depth
        self._write_timeout = s.mesh_write_timeout if can_mesh else (s.write_timeout or float("inf"))
        self._queue: deque[bytes] = deque()
        self._disco_queue: deque[bytes] = deque()
        self._control: list[bytes] = []
        self._pong: bytes | None = None
        self._lot = trio.lowlevel.ParkingLot()
        self._nothere_tokens = 3.0
        self._nothere_stamp = self.connected_at
        # The caller's scope, already entered, around run() (RelayServer.serve_derp: one scope
        # for the login and the connection); close() cancels it, before run() starts or after.
        self._cancel = scope
        self.saw_src: set[bytes] = set()  # senders whose PeerGone this connection should hear
        self.rate_limiter = None
        self._writing = False
        self._parked = False
        self._congested = None
        self._ctl_tokens = CONTROL_BURST  # taken per control frame; refilled when it runs out
        self._ctl_stamp = self.connected_at
        self._ctl_logged = False
        # KeepAlive every interval + a per-connection jitter, whatever the traffic (spec 5.6);
        # RelayServer's keepalive ticker queues them.
        self.keepalive_interval = s.keepalive_interval + random.uniform(0, s.keepalive_jitter)
        self.next_keepalive = self.connected_at + self.keepalive_interval
        # The compiled data plane (derpd/relay/dataplane.py) once run() hands the socket to it.
        self.engine_slot = -1
        self._engine = None
        self._handoff: tuple[bytes, bool] | None = None
        # Health frames (derpd/relay/health.py): None until this client has a problem; False for
        # mesh peers and probers, which get none.
        self.health = False if can_mesh or is_prober else None
        # This connection's own counters for /debug/clients (the compiled data plane keeps its
        # part in its slot; ``counters()`` adds them up).
        self.rx_packets = self.rx_bytes = self.tx_packets = self.tx_bytes = 0
        self.drops_queue = self.drops_unknown = 0
        # Queue delay: one packet in QD_EVERY is stamped when queued and observed when written.
        self._qd_tick = 0
        self._qd_frame: bytes | None = None
        self._qd_t = 0.0

    # ------------------------------------------------------------------ called by other tasks

    def enqueue(self, frame: bytes, disco: bool) -> bool:
        """Queue a ready RecvPacket frame; never blocks, drops the oldest when full.

        Returns True when the queue is now full, so the caller can yield to let this
        connection's writer drain it before more packets arrive in the same read.
        """
        if self.closing:
            self.server.stats.drop("gone_disconnected", disco, len(frame) - _RECV_OVERHEAD)
            return False
        engine = self._engine
        if engine is not None:
            return engine.enqueue(self.engine_slot, frame, disco)
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
                stats = self.server.stats
                stats.packets_sent += 1
                stats.bytes_sent += len(frame) - _RECV_OVERHEAD
                self.tx_packets += 1
                self.tx_bytes += len(frame) - _RECV_OVERHEAD
                if n == len(frame):
                    if self._qd_frame is frame:  # written at once: it waited for nothing
                        self._qd_frame = None
                        self.server.queue_delay.observe(0.0)
                    return False
                self._control.append(frame[n:])
                self._parked = False
                self._lot.unpark()
                return False
        q = self._disco_queue if disco else self._queue
        if len(q) >= self._depth:
            old = q.popleft()
            self.server.stats.drop("queue_head", disco, len(old) - _RECV_OVERHEAD)
            self.drops_queue += 1
            if old is self._qd_frame:
                self._qd_frame = None
        q.append(frame)
        if self._parked:
            self._parked = False
            self._lot.unpark()
        return len(q) >= self._depth

    def send_control(self, frame: bytes) -> None:
        """Queue a frame that must not be dropped (PeerGone, PeerPresent)."""
        if self.closing:
            return
        if self._engine is not None:
            self._engine.send_control(self.engine_slot, frame)
            return
        self._control.append(frame)
        if self._parked:
            self._parked = False
            self._lot.unpark()

    def has_pending(self) -> bool:
        """Anything queued or being written right now."""
        if self._engine is not None:
            return self._engine.pending(self.engine_slot)
        return bool(self._queue or self._disco_queue or self._control or self._writing)

    def counters(self) -> dict[str, int]:
        """Queue depth and this connection's totals, for /debug/clients and the drop-share
        Health check: what the Python reader and writer counted plus the data plane's part."""
        c = {
            "queued": len(self._queue), "queued_disco": len(self._disco_queue),
            "queued_control": len(self._control) + (self._pong is not None),
            "packets_in": self.rx_packets, "bytes_in": self.rx_bytes,
            "packets_out": self.tx_packets, "bytes_out": self.tx_bytes,
            "drops_queue_full": self.drops_queue, "drops_unknown_dest": self.drops_unknown,
        }
        if self._engine is not None:
            (c["queued"], c["queued_disco"], c["queued_control"], rx_pk, rx_by, tx_pk, tx_by,
             drops) = self._engine.slot_stats(self.engine_slot)
            c["packets_in"] += rx_pk
            c["bytes_in"] += rx_by
            c["packets_out"] += tx_pk
            c["bytes_out"] += tx_by
            c["drops_queue_full"] += drops
        return c

    def tcp_socket(self):  # noqa: ANN201
        """The TCP socket under this connection (TLS and WebSocket included), or None."""
        stream = self.stream
        for _ in range(4):  # WebSocket over TLS over TCP at most
            sock = getattr(stream, "socket", None)
            if sock is not None:
                return sock
            stream = getattr(stream, "transport_stream", None) or getattr(stream, "ssl", None)
            if stream is None:
                return None
        return None

    def close(self, reason: str) -> None:
        """End this connection from outside (ClosePeer, shutdown).  Takes effect whenever it
        comes after the registration: the scope is the login's, so a ServerInfo still being
        written is abandoned, and ``run`` ends at its first checkpoint."""
        self.close_reason = reason
        self._cancel.cancel()

    # ------------------------------------------------------------------ lifetime

    async def run(self, decoder: FrameDecoder) -> None:
        """Serve until EOF, a protocol error, a write failure or ``close()``."""
        engine = self.server.dataplane.engine
        try:
            if engine is not None and not self.can_mesh and self._start_engine(engine):
                await self._read_loop(decoder)
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_loop, nursery.cancel_scope)
                    await self._read_loop(decoder)
                    nursery.cancel_scope.cancel()
        finally:
            self.teardown()

    def _start_engine(self, engine) -> bool:
        """Hand the socket (plain TCP, or TLS directly on TCP) to the compiled data plane: it
        reads and writes from now on, and what was queued since the registration goes first, in
        the writer's order.  False if this stream stays with the Python reader and writer."""
        if self._raw is not None:
            self.engine_slot = engine.add(self.stream.socket.fileno(), self, self.key, self.saw_src)
        else:
            takeover = getattr(self.stream, "takeover", None)
            parts = takeover() if takeover is not None else None
            if parts is None:
                return False
            fd, obj, incoming, outgoing = parts
            self.engine_slot = engine.add(fd, self, self.key, self.saw_src, (obj, incoming, outgoing))
        self._engine = engine
        self._qd_frame = None
        for frame in self._control:
            engine.send_control(self.engine_slot, frame)
        self._control.clear()
        for q, disco in ((self._queue, False), (self._disco_queue, True)):
            for frame in q:
                engine.enqueue(self.engine_slot, frame, disco)
            q.clear()
        return True

    def engine_handoff(self, data: bytes, eof: bool) -> None:
        """The data plane handed back bytes it does not handle (see ``_read_loop``)."""
        self._handoff = (data, eof)
        self._lot.unpark()

    def teardown(self) -> None:
        """Unregister, count what was still queued as dropped, and mark the connection closing."""
        self.closing = True
        if self._engine is not None:
            self._engine.remove(self.engine_slot)  # counts its queue as dropped
            self._engine = None
            self.engine_slot = -1
        stats = self.server.stats
        for q, disco in ((self._queue, False), (self._disco_queue, True)):
            if q:
                stats.drop("gone_disconnected", disco, sum(len(f) for f in q) - _RECV_OVERHEAD * len(q), len(q))
                q.clear()
        self._control.clear()
        self.server.registry.forget_receiver(self)
        self.server.health.left(self)
        if self.preferred:
            stats.current_home_connections -= 1
        if self.not_ideal:
            stats.current_notideal_connections -= 1
        self.server.registry.unregister(self)

    # ------------------------------------------------------------------ reader

    async def _read_loop(self, decoder: FrameDecoder) -> None:
        """Read, split and route.  A turn handles at most ``FRAMES_PER_TURN`` frames and then
        checkpoints, so a client that sends a flood of tiny frames gets its share of the loop
        and no more; frames other than packets also draw on a budget (``_slow_down``)."""
        raw = self._raw
        receive_some = raw.receive_some if raw is not None else self.stream.receive_some
        engine = self._engine
        try:
            data = b"x"
            frames = decoder.frames(FRAMES_PER_TURN)
            while True:
                done = 0
                while done < len(frames):
                    done = self._handle_frames(frames, done)
                    if self._congested is not None:
                        # A mesh link is backed up: wait for it (a trusted peer, not a client),
                        # at most as long as derper waits on a mesh write.
                        fwd, self._congested = self._congested, None
                        with trio.move_on_after(MESH_PUSHBACK_TIMEOUT):
                            await fwd.wait_drained()
                    elif done < len(frames):
                        # A destination queue filled up: let its writer drain it first.
                        await trio.lowlevel.checkpoint()
                if frames and self.rate_limiter is not None:
                    if await self.rate_limiter.wait(sum(len(p) for _, p in frames)):
                        self.server.note_rate_limited(self)
                if decoder.skipped_frames:  # unknown frame types, discarded by the decoder
                    self.server.stats.unknown_frames += decoder.skipped_frames
                    self._ctl_tokens -= decoder.skipped_frames
                    decoder.skipped_frames = 0
                if self._ctl_tokens < 0 and not self.can_mesh:
                    await self._slow_down()
                if len(frames) == FRAMES_PER_TURN:  # the turn is over, maybe not the buffer
                    await trio.lowlevel.checkpoint()
                    frames = decoder.frames(FRAMES_PER_TURN)
                    continue
                if not data:
                    return
                if engine is not None:
                    # Give the socket back to the data plane with what is left of a frame, and
                    # wait for the next bytes it does not handle itself (all of them while
                    # the decoder is still discarding an unknown frame).
                    engine.resume(self.engine_slot, decoder.take_buffered(), decoder.skipping)
                    while self._handoff is None:
                        await self._lot.park()
                    data, eof = self._handoff
                    self._handoff = None
                    if data:
                        decoder.receive_data(data)
                    if eof:
                        data = b""
                        decoder.receive_data(data)
                else:
                    data = await receive_some(RECV_SIZE)
                    decoder.receive_data(data)
                frames = decoder.frames(FRAMES_PER_TURN)
        except RemoteProtocolError as e:
            self.server.stats.connection_errors[e.reason] += 1
            self.close_reason = e.reason
            log.debug("closing %s from %s: %s", self.public.short(), self.remote_ip, e)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.close_reason = "read_error"

    def _handle_frames(self, frames: list[tuple[int, bytes]], start: int) -> int:
        """The hot path: route every SendPacket from ``frames[start:]``; hand anything else to
        ``_handle_other``.  Returns the index to resume at (``len(frames)`` when done)."""
        server = self.server
        active = server.registry.active
        src = self.key
        registry = server.registry
        pack = _RECV_HEADER.pack
        npk = nbytes = ndisco = nfwd = nfwd_bytes = 0
        i = start
        end = len(frames)
        route = _route_packets
        try:
            while i < end:
                if route is not None:
                    # Every SendPacket to a local client, in C; it stops at anything else.
                    i, n, nb, nd, full = route(frames, i, active, src, registry.watch_peer_gone, DISCO_MAGIC,
                                               DISCO_MIN_LEN)
                    npk += n
                    nbytes += nb
                    ndisco += nd
                    if full or i >= end:
                        break
                ftype, payload = frames[i]
                i += 1
                if ftype == 4:  # SendPacket: dst(32) || packet
                    n = len(payload)
                    if n < KEY_LEN:
                        raise RemoteProtocolError(f"SendPacket of {n} bytes", "bad_send_packet")
                    dst = payload[:KEY_LEN]
                    npk += 1
                    nbytes += n - KEY_LEN
                    disco = n >= KEY_LEN + DISCO_MIN_LEN and payload.startswith(DISCO_MAGIC, KEY_LEN)
                    if disco:
                        ndisco += 1
                    conn = active.get(dst)
                    if conn is not None:
                        if src not in conn.saw_src:
                            registry.watch_peer_gone(conn, src)
                        if conn.enqueue(pack(5, n) + src + payload[KEY_LEN:], disco):
                            break
                    else:
                        congested = server.route_elsewhere(self, src, dst, payload[KEY_LEN:], disco, forwarded=False)
                        if congested is not None:
                            self._congested = congested
                            break
                elif ftype == 0x0A and self.can_mesh:  # ForwardPacket from a mesh peer: src(32) || dst(32) || packet
                    n = len(payload)
                    if n < 2 * KEY_LEN:
                        raise RemoteProtocolError(f"ForwardPacket of {n} bytes", "bad_forward_packet")
                    fsrc = payload[:KEY_LEN]
                    dst = payload[KEY_LEN : 2 * KEY_LEN]
                    conn = active.get(dst)
                    nfwd += 1
                    nfwd_bytes += n - 2 * KEY_LEN
                    if conn is not None:
                        disco = n >= 2 * KEY_LEN + DISCO_MIN_LEN and payload.startswith(DISCO_MAGIC, 2 * KEY_LEN)
                        if fsrc not in conn.saw_src:
                            registry.watch_peer_gone(conn, fsrc)
                        if conn.enqueue(pack(5, n - KEY_LEN) + fsrc + payload[2 * KEY_LEN :], disco):
                            break
                    else:
                        packet = payload[2 * KEY_LEN :]
                        server.route_elsewhere(self, fsrc, dst, packet, looks_like_disco(packet), forwarded=True)
                else:
                    self._handle_other(ftype, payload)
        finally:
            stats = server.stats
            stats.packets_received += npk
            stats.bytes_received += nbytes
            stats.disco_packets_received += ndisco
            if nfwd:
                stats.packets_forwarded_in += nfwd
                stats.bytes_forwarded_in += nfwd_bytes
            self.rx_packets += npk + nfwd
            self.rx_bytes += nbytes + nfwd_bytes
            if self.is_dup:
                server.registry.note_activity(self)
        return i

    async def _slow_down(self) -> None:
        """The control-frame budget is spent: refill it for the time passed; if that is not
        enough, stop reading until it is (TCP back-pressure, nothing dropped), and if the client
        is more than a whole burst over, close it: that is a flood, and slowing it would only
        keep its backlog (and its descriptor) around for hours."""
        now = trio.current_time()
        tokens = min(CONTROL_BURST, self._ctl_tokens + (now - self._ctl_stamp) * CONTROL_RATE)
        self._ctl_stamp = now
        if tokens < -CONTROL_BURST:
            raise RemoteProtocolError(f"over {CONTROL_RATE:.0f} control frames/s (burst {CONTROL_BURST:.0f})",
                                      "control_flood")
        if tokens < 0:
            self.server.stats.throttled["control_frames"] += 1
            if not self._ctl_logged:
                self._ctl_logged = True
                log.debug("slowing %s from %s: over %d control frames/s", self.public.short(), self.remote_ip,
                          CONTROL_RATE)
            await trio.sleep(-tokens / CONTROL_RATE)
            self._ctl_stamp = trio.current_time()
            tokens = 0.0
        self._ctl_tokens = tokens

    def _handle_other(self, ftype: int, payload: bytes) -> None:
        self._ctl_tokens -= 1
        stats = self.server.stats
        stats.frames_received[_FRAME_NAMES.get(ftype, "unknown")] += 1
        match parse_client_frame(ftype, payload):
            case Ping(data):
                stats.got_ping += 1
                if self._engine is not None:
                    self._engine.send_control(self.engine_slot, encode_frame(FrameType.PONG, data))
                    stats.sent_pong += 1
                elif self._pong is None:
                    self._pong = encode_frame(FrameType.PONG, data)
                    if self._parked:
                        self._parked = False
                        self._lot.unpark()
            case NotePreferred(preferred):
                self._note_preferred(preferred)
            case ForwardPacket():
                # Mesh peers' ForwardPackets take the fast path in _handle_frames; only others get here.
                self._require_mesh("ForwardPacket")
            case WatchConns():
                self._require_mesh("WatchConns")
                self.server.registry.add_watcher(self)
            case ClosePeer(target):
                self._require_mesh("ClosePeer")
                self.server.close_peer(target)
            case UnknownFrame():
                stats.unknown_frames += 1

    def _require_mesh(self, what: str) -> None:
        if not self.can_mesh:
            raise RemoteProtocolError(f"{what} from a client without the mesh key", "mesh_only_frame")

    def _note_preferred(self, preferred: bool) -> None:
        if preferred == self.preferred:
            return
        stats = self.server.stats
        self.preferred = preferred
        stats.current_home_connections += 1 if preferred else -1
        if trio.current_time() - self.connected_at > 5:
            if preferred:
                stats.home_moves_in += 1
            else:
                stats.home_moves_out += 1

    def not_here(self, dst: bytes) -> None:
        """PeerGone(NotHere) for a disco packet to an unknown key: 1/s, burst 3 (spec 5.5)."""
        now = trio.current_time()
        self._nothere_tokens = min(3.0, self._nothere_tokens + (now - self._nothere_stamp))
        self._nothere_stamp = now
        if self._nothere_tokens >= 1.0:
            self._nothere_tokens -= 1.0
            self.send_control(encode_peer_gone(dst, PeerGoneReason.NOT_HERE))
            self.server.stats.peer_gone_sent["not_here"] += 1

    # ------------------------------------------------------------------ writer

    async def _write_loop(self, scope: trio.CancelScope) -> None:
        """Take everything queued, write it in one ``send_all`` under the write deadline.

        One cancel scope covers the whole loop; its deadline is set around each write that
        has to wait and lifted after, which is much cheaper than a ``fail_after`` per write.
        """
        stats = self.server.stats
        queue, disco_queue, control = self._queue, self._disco_queue, self._control
        raw = self._raw
        send_all = raw.send_all if raw is not None else self.stream.send_all
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
                        pbytes = sum(map(len, queue)) + sum(map(len, disco_queue)) - _RECV_OVERHEAD * npk
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
                        self.server.queue_delay.observe(perf_counter() - self._qd_t)
            if deadline.cancelled_caught:
                stats.write_timeouts += 1
                stats.drop("write_error", False, pbytes, npk)
                self.close_reason = "write_timeout"
                log.debug("write timeout to %s, closing", self.public.short())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.close_reason = self.close_reason or "write_error"
        finally:
            scope.cancel()
