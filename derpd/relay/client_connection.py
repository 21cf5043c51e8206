"""One logged-in DERP client: a reader task and a writer task around bounded send queues.

Theory of operation
-------------------
The reader decodes every complete frame in its buffer at once and hands them to the router
(``router.route``): for a SendPacket it looks up the destination in ``Registry.active`` and
appends a ready-made RecvPacket frame to that destination's send path -- synchronously, never
awaiting another client's socket.  The destination's writer wakes, takes *everything* queued,
and writes it with one ``send_all`` under the write deadline.

The queues, the writer and the drop accounting are the connection's *send path*
(``sendpath.SendPath``): Python deques and a writer task (``PySendPath``), or a slot of the
compiled data plane (``EngineSendPath``), chosen once when ``run`` starts.  This class keeps the
reader and the per-client policy (control-frame budget, rate limit, mesh-only frames, NotHere,
Health) and never asks which path it has: ``enqueue`` and ``send_control`` *are* the path's.

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

Dependencies: this module imports ``registry``, ``router`` and ``sendpath`` (below it) and
never ``server``: the relay that owns a connection is reached through the ``ConnectionHost``
interface, which ``server.RelayServer`` implements.
"""

from __future__ import annotations

import logging
import random
from typing import Protocol

import trio

from ..keys import NodePublic
from ..metrics import RelayStats
from ..protocol.errors import RemoteProtocolError
from ..protocol.frames import FrameDecoder, FrameType, PeerGoneReason
from ..protocol.messages import (
    ClosePeer,
    ForwardPacket,
    NotePreferred,
    Ping,
    UnknownFrame,
    WatchConns,
    encode_frame,
    encode_peer_gone,
    parse_client_frame,
)
from ..settings import RelaySettings
from ..transport.raw_socket import raw_io_for
from .dataplane import DataPlane
from .diagnostics import QueueDelay
from .health import HealthBoard
from .registry import Forwarder, Registry, present_flags
from .router import route
from .sendpath import RECV_SIZE, ClosedSendPath, EngineSendPath, PySendPath, SendPath

log = logging.getLogger("derpd.relay")

FRAMES_PER_TURN = 256  # frames one reader handles before it lets every other task run
CONTROL_RATE = 50.0  # frames other than packets a client may send per second, after...
CONTROL_BURST = 200.0  # ...a burst of this many; past it the reader slows down (mesh peers exempt)
MESH_PUSHBACK_TIMEOUT = 5.0  # derper's mesh write timeout
_FRAME_NAMES = {int(t): t.name.lower() for t in FrameType}


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
        "_nothere_tokens", "_nothere_stamp", "_cancel", "saw_src", "rate_limiter", "close_reason",
        "keepalive_interval", "next_keepalive", "congested", "_ctl_tokens", "_ctl_stamp",
        "_ctl_logged", "_raw", "engine_slot", "health", "rx_packets", "rx_bytes", "drops_unknown",
        "_send", "enqueue", "send_control",
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
        self._nothere_tokens = 3.0
        self._nothere_stamp = self.connected_at
        # The caller's scope, already entered, around run() (RelayServer.serve_derp: one scope
        # for the login and the connection); close() cancels it, before run() starts or after.
        self._cancel = scope
        self.saw_src: set[bytes] = set()  # senders whose PeerGone this connection should hear
        self.rate_limiter = None
        self.congested: Forwarder | None = None
        self._ctl_tokens = CONTROL_BURST  # taken per control frame; refilled when it runs out
        self._ctl_stamp = self.connected_at
        self._ctl_logged = False
        # KeepAlive every interval + a per-connection jitter, whatever the traffic (spec 5.6);
        # RelayServer's keepalive ticker queues them.
        self.keepalive_interval = s.keepalive_interval + random.uniform(0, s.keepalive_jitter)
        self.next_keepalive = self.connected_at + self.keepalive_interval
        # The compiled data plane's slot for this socket, or -1 (set by sendpath.EngineSendPath).
        self.engine_slot = -1
        # Health frames (derpd/relay/health.py): None until this client has a problem; False for
        # mesh peers and probers, which get none.
        self.health = False if can_mesh or is_prober else None
        # What the reader and the router counted, for /debug/clients (the send path counts the
        # rest; ``counters()`` adds them up).
        self.rx_packets = self.rx_bytes = self.drops_unknown = 0
        # Packets may be queued from the registration on, before run() chooses the send path:
        # they wait in Python queues until then.
        self._use(PySendPath(
            self, server.stats, server.queue_delay, stream, self._raw, depth=s.queue_depth,
            write_timeout=s.mesh_write_timeout if can_mesh else (s.write_timeout or float("inf")),
        ))

    def _use(self, path: SendPath) -> None:
        """From now on frames for this connection go to ``path``: its ``enqueue`` and
        ``send_control`` become this connection's own (so a packet costs no extra call)."""
        self._send = path
        self.enqueue = path.enqueue
        self.send_control = path.send_control

    # ------------------------------------------------------------------ called by other tasks

    # enqueue(frame, disco) -> bool and send_control(frame) are the send path's own methods,
    # bound by _use() (see sendpath.SendPath and registry.Member).

    def has_pending(self) -> bool:
        """Anything queued or being written right now."""
        return self._send.has_pending()

    def counters(self) -> dict[str, int]:
        """Queue depth and this connection's totals, for /debug/clients and the drop-share
        Health check: what the reader and the router counted plus the send path's part."""
        c = self._send.counters()
        c["packets_in"] += self.rx_packets
        c["bytes_in"] += self.rx_bytes
        c["drops_unknown_dest"] = self.drops_unknown
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
        try:
            engine = self.server.dataplane.engine
            if engine is not None and not self.can_mesh:
                self._start_engine(engine)
            await self._send.serve(lambda: self._read_loop(decoder))
        finally:
            self.teardown()

    def _start_engine(self, engine) -> None:
        """Move to the compiled data plane if it takes this stream (plain TCP, or TLS directly
        on TCP); otherwise the Python send path stays."""
        queued = self._send
        assert isinstance(queued, PySendPath)
        path = EngineSendPath.attach(engine, self, self.server.stats, self.stream, self._raw, queued)
        if path is not None:
            self._use(path)

    def engine_handoff(self, data: bytes, eof: bool) -> None:
        """The data plane handed back bytes it does not handle (``dataplane.EngineConnection``); only
        ever called while this connection's path is an ``EngineSendPath``."""
        self._send.handoff(data, eof)  # type: ignore[attr-defined]

    def teardown(self) -> None:
        """Unregister, count what was still queued as dropped, and mark the connection closing."""
        self.closing = True
        stats = self.server.stats
        self._use(ClosedSendPath(stats, self._send.close()))
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
        receive = self._send.receive
        server = self.server
        try:
            more = True
            frames = decoder.frames(FRAMES_PER_TURN)
            while True:
                done = 0
                while done < len(frames):
                    done = route(server, self, frames, done)
                    if self.congested is not None:
                        # A mesh link is backed up: wait for it (a trusted peer, not a client),
                        # at most as long as derper waits on a mesh write.
                        fwd, self.congested = self.congested, None
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
                if not more:
                    return
                more = await receive(decoder)
                frames = decoder.frames(FRAMES_PER_TURN)
        except RemoteProtocolError as e:
            self.server.stats.connection_errors[e.reason] += 1
            self.close_reason = e.reason
            log.debug("closing %s from %s: %s", self.public.short(), self.remote_ip, e)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.close_reason = "read_error"

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

    def handle_other(self, ftype: int, payload: bytes) -> None:
        """A frame the router does not take (``router.Sender``): everything but packets."""
        self._ctl_tokens -= 1
        stats = self.server.stats
        stats.frames_received[_FRAME_NAMES.get(ftype, "unknown")] += 1
        match parse_client_frame(ftype, payload):
            case Ping(data):
                stats.got_ping += 1
                self._send.send_pong(encode_frame(FrameType.PONG, data))
            case NotePreferred(preferred):
                self._note_preferred(preferred)
            case ForwardPacket():
                # Mesh peers' ForwardPackets go to the router; only others get here.
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


__all__ = ["FRAMES_PER_TURN", "RECV_SIZE", "ClientConnection", "ConnectionClosed", "ConnectionHost"]
