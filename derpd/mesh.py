"""Regional mesh: several relays act as one region (spec section 6).

Every node holds one outgoing DERP connection to each peer, authenticated with the shared
mesh key, and sends WatchConns on it.  The peer answers with PeerPresent for every client it
holds (the flood), then streams PeerPresent/PeerGone as clients come and go.  From that
stream we learn "key K is reachable through peer P" (``Registry.add_forwarder``).  A packet
for a key with no local connection then goes to P as a ForwardPacket, exactly one hop: a
forwarded packet is never forwarded again (P-17).

When a mesh link breaks, every key it reported is withdrawn (PeerGone follows where a key
left the region), and the link reconnects with backoff; the new flood re-adds the keys.

``forward()`` is called synchronously from other clients' readers: it only appends to a
bounded queue that the link's writer sends in batches, so a slow peer never stalls readers.
"""

from __future__ import annotations

import logging
import random
import re
import ssl
from collections import deque
from dataclasses import dataclass

import trio

from . import client as derp_client
from .keys import NodePrivate, NodePublic
from .protocol.errors import RemoteProtocolError
from .protocol.messages import PeerGone, PeerPresent, encode_forward_packet
from .relay.server import RelayServer
from .settings import SettingsError, is_ip, split_host_port

log = logging.getLogger("derpd.mesh")

FORWARD_QUEUE = 4096  # packets queued per mesh link before the oldest is dropped
FORWARD_HIGH_WATER = 512  # past this, senders' readers wait for the link to drain (push back)
FORWARD_WRITE_TIMEOUT = 5.0
BACKOFF_START = 0.1
BACKOFF_MAX = 5.0


@dataclass(frozen=True, slots=True)
class MeshTarget:
    """One ``--mesh-with`` entry: ``host[:port]`` or ``host[:port]/dialhost``.

    As in derper, the URL is ``https://host[:port]/derp`` (TLS and SNI use ``host``); a
    ``dialhost`` only changes the address dialled, on the URL's port."""

    host: str  # as it appears in the URL (and SNI)
    dial: str | None = None  # another address to dial, same port unless given

    @property
    def name(self) -> str:
        return self.host


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$")


def _check_host(entry: str, host: str, what: str) -> None:
    if not (is_ip(host) or _HOSTNAME.match(host)):
        raise SettingsError(f"--mesh-with entry {entry!r}: {what} {host!r} is neither a hostname nor an IP address")


def parse_mesh_with(text: str) -> list[MeshTarget]:
    """Parse derper's comma-separated ``--mesh-with`` list: ``host[:port][/dialhost]`` entries.

    Raises:
        SettingsError: an entry that is a URL, has no host, a bad host or a bad port (the
            message names the entry and says how to write it).
    """
    out = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        if "://" in entry:
            raise SettingsError(f"--mesh-with entry {entry!r} is a URL; give host[:port] (the URL is always "
                                "https://host[:port]/derp), e.g. derp2.example.com or 10.0.0.2:8443")
        host, _, dial = entry.partition("/")
        if not host:
            raise SettingsError(f"--mesh-with entry {entry!r} has no host; write host[:port][/dialhost]")
        if dial and (dial.count(":") == 1 or "]:" in dial):
            raise SettingsError(f"--mesh-with entry {entry!r}: put the port on the host, not the dial address "
                                "(host:port/dialhost)")
        try:
            name, _port = split_host_port(host)
        except SettingsError as e:
            raise SettingsError(f"--mesh-with entry {entry!r}: {e}") from None
        if _port == 0:
            raise SettingsError(f"--mesh-with entry {entry!r}: port 0 cannot be dialled; give the peer's port")
        _check_host(entry, name, "host")
        if dial:
            _check_host(entry, dial.strip("[]"), "dial address")
        out.append(MeshTarget(host, dial or None))
    return out


def _split_port(hostport: str, default: int) -> tuple[str, int]:
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default
    if hostport.count(":") == 1:
        host, port = hostport.split(":")
        return host, int(port)
    return hostport, default


class MeshPeer:
    """The link to one peer relay: a watcher client plus a forwarding queue."""

    def __init__(
        self,
        server: RelayServer,
        target: MeshTarget,
        mesh_key: bytes,
        *,
        scheme: str,
        client_key: NodePrivate | None = None,
        ssl_context: ssl.SSLContext | None = None,
        skip_self_check: bool = False,
        internal: bool = False,
    ) -> None:
        self.server = server
        self.target = target
        self.mesh_key = mesh_key
        self.scheme = scheme
        self.client_key = client_key or server.settings.private_key
        self.ssl_context = ssl_context
        self.skip_self_check = skip_self_check
        self.internal = internal  # a link between --workers: not a mesh peer in the metrics
        self.keys: set[bytes] = set()
        self.connected = False
        self.reconnects = 0
        self.forward_drops = 0
        self._queue: deque[bytes] = deque()
        self._lot = trio.lowlevel.ParkingLot()
        self._drained = trio.lowlevel.ParkingLot()  # readers waiting for the queue to drain

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.target.host}/derp"

    def __repr__(self) -> str:
        return f"MeshPeer({self.target.host})"

    # ------------------------------------------------------------------ Forwarder

    @property
    def congested(self) -> bool:
        return len(self._queue) >= FORWARD_HIGH_WATER

    def forward(self, src: bytes, dst: bytes, packet: bytes) -> bool:
        if not self.connected:
            return False
        if len(self._queue) >= FORWARD_QUEUE:
            self._queue.popleft()
            self.forward_drops += 1
            self.server.stats.drop("queue_head", False, len(packet))
        self._queue.append(encode_forward_packet(src, dst, packet))
        if self._lot.statistics().tasks_waiting:
            self._lot.unpark()
        return True

    async def wait_drained(self) -> None:
        while self.connected and len(self._queue) >= FORWARD_HIGH_WATER:
            await self._drained.park()

    # ------------------------------------------------------------------ lifetime

    async def run(self) -> None:
        """Connect, watch and forward; reconnect with backoff, forever."""
        backoff = BACKOFF_START
        connect_host = _split_port(self.target.dial, 0)[0] if self.target.dial else None
        while True:
            try:
                async with derp_client.connect(
                    self.url, self.client_key, mesh_key=self.mesh_key, can_ack_pings=True,
                    ssl_context=self.ssl_context, connect_host=connect_host, timeout=10.0,
                ) as c:
                    if c.server_key == self.server.public_key and not self.skip_self_check:
                        log.info("mesh %s is this relay itself; not meshing with it", self.target.host)
                        return
                    backoff = BACKOFF_START
                    await self._serve(c)
            except* (OSError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                     derp_client.DerpClientError, RemoteProtocolError) as group:
                e = group.exceptions[0]
                log.info("mesh %s: %s; retrying in %.1fs", self.target.host, e or type(e).__name__, backoff)
            finally:
                self._disconnected()
            await trio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(BACKOFF_MAX, backoff * 2)
            self.reconnects += 1

    async def _serve(self, c: derp_client.DerpClient) -> None:
        await c.watch_conns()
        self.connected = True
        if not self.internal:
            self.server.mesh_peers_connected += 1
        log.info("mesh %s connected (%s)", self.target.host, c.server_key.short())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer, c, nursery.cancel_scope)
            nursery.start_soon(self._reader, c, nursery.cancel_scope)
        log.info("mesh %s disconnected", self.target.host)

    async def _reader(self, c: derp_client.DerpClient, scope: trio.CancelScope) -> None:
        registry = self.server.registry
        try:
            async for ev in c:
                match ev:
                    case PeerPresent(peer=peer):
                        self.keys.add(peer.raw)
                        registry.add_forwarder(peer.raw, self)
                    case PeerGone(peer=peer):
                        self.keys.discard(peer.raw)
                        registry.remove_forwarder(peer.raw, self)
        except (trio.BrokenResourceError, RemoteProtocolError) as e:
            log.info("mesh %s: %s", self.target.host, e)
        finally:
            scope.cancel()

    async def _writer(self, c: derp_client.DerpClient, scope: trio.CancelScope) -> None:
        q = self._queue
        try:
            while True:
                if not q:
                    await self._lot.park()
                batch = list(q)
                q.clear()
                self._drained.unpark_all()
                with trio.fail_after(FORWARD_WRITE_TIMEOUT):
                    await c.send_raw(b"".join(batch))
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            log.info("mesh %s: forwarding failed (%s); reconnecting", self.target.host, type(e).__name__)
        finally:
            scope.cancel()

    def _disconnected(self) -> None:
        if self.connected and not self.internal:
            self.server.mesh_peers_connected -= 1
        self.connected = False
        self._drained.unpark_all()
        if self._queue:
            self.server.stats.drop("write_error", False, 0, len(self._queue))
            self._queue.clear()
        registry = self.server.registry
        for key in list(self.keys):
            registry.remove_forwarder(key, self)
        self.keys.clear()


async def run_mesh(
    server: RelayServer,
    targets: list[MeshTarget],
    mesh_key: bytes,
    *,
    own_hostname: str | None = None,
    client_key: NodePrivate | None = None,
    ssl_context: ssl.SSLContext | None = None,
    skip_self_check: bool = False,
    scheme: str | None = None,
    internal: bool = False,
    task_status: trio.TaskStatus[list[MeshPeer]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hold a mesh link to every target (except our own hostname) until cancelled.

    ``scheme`` defaults to ``https`` when this relay serves TLS (the region's nodes are alike),
    else ``http``.  ``internal`` links (between ``--workers`` of one node) are not mesh peers:
    they stay out of ``mesh_peers_*`` and the per-peer metrics."""
    scheme = scheme or ("https" if server.settings.tls else "http")
    peers = [
        MeshPeer(server, t, mesh_key, scheme=scheme, client_key=client_key, ssl_context=ssl_context,
                 skip_self_check=skip_self_check, internal=internal)
        for t in targets
        if t.host != own_hostname
    ]
    if not internal:
        server.mesh_peers_configured = len(peers)
        server.mesh_links = peers
    async with trio.open_nursery() as nursery:
        for p in peers:
            nursery.start_soon(p.run)
        task_status.started(peers)


class MeshKeyRefused(derp_client.DerpClientError):
    """The relay closed the connection at our ClosePeer: it does not take our mesh key."""


async def close_peer(url: str, target: NodePublic, mesh_key: bytes, **connect_options: object) -> None:
    """Ask the relay at ``url`` (as a mesh peer) to close every connection of ``target``.

    Raises:
        MeshKeyRefused: the relay logged us in as an ordinary client (a wrong mesh key) and
            closed the connection at the ClosePeer.
        derpd.client.LoginRefused: the relay refused the login (a wrong mesh key, and its
            admission does not admit the key either).
    """
    refused = False
    async with derp_client.connect(url, NodePrivate.generate(), mesh_key=mesh_key, **connect_options) as c:  # type: ignore[arg-type]
        await c.close_peer(target)
        async with trio.open_nursery() as nursery:

            async def watch_for_close() -> None:
                nonlocal refused
                try:
                    async for _event in c:
                        pass
                except (RemoteProtocolError, trio.BrokenResourceError):
                    pass
                refused = True  # closed before the Pong: the ClosePeer was refused
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_for_close)
            await c.ping()  # the ClosePeer was read before the Pong was written
            nursery.cancel_scope.cancel()
    if refused:
        raise MeshKeyRefused("the relay closed the connection at our ClosePeer: it does not take this mesh key "
                             "(use the region's --mesh-psk-file)")
