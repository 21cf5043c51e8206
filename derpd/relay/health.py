"""Health frames (0x14): telling a client's user what is wrong with the relay, and when it is
fine again.

Tailscale clients show a non-empty Health frame as a "Relay server error" warning for the
region (``tailscale status``) and clear it on an empty one, or when the connection ends.  This
module decides the text: a small model that takes the time as an argument and returns the frame
to send (no I/O); ``RelayServer.run_health`` drives it once a second and queues the frames.

Problems are either relay-wide (``set_relay``: the relay is restarting, admission is failing
open; the same for every client) or one client's (``set_client``: cloned node key, receive rate
limit, most packets for it dropped).  A client problem may expire on its own (``until``): the
rate-limit one lasts ``hold`` seconds after the reader last waited.  The text a client sees is
every current problem, relay-wide first, joined with "; ".

Hysteresis: a client's text changes at most once per ``hold`` seconds (10 s).  A problem that
comes and goes faster is seen as one long problem, never as flapping warnings.  The first
problem goes out at once.

Who gets Health frames: regular clients only.  Mesh peers (derper's mesh client and ours ignore
the frame, and nobody would see it) and probers (derpprobe logs "ignoring Recv frame type" for
every one) get none.  Every text names no other client, only this one and the relay.

Dependencies: none inside ``derpd.relay`` (connections are plain objects with a ``health``
attribute and ``send_control``); imports ``derpd.protocol`` only.
"""

from __future__ import annotations

import math
from typing import Any

from ..protocol.frames import FrameType, encode_frame

HOLD = 10.0  # seconds between two changes of one client's text; also how long a rate limit is reported
MAX_TEXT = 512  # bytes of UTF-8 in one Health frame (Go clients accept up to 1 MiB)

# Where each problem's text goes in the joined text (relay-wide first).
ORDER = ("restarting", "operator", "admission", "cloned_key", "rate_limited", "dropping")

DROP_WINDOW = 10.0  # seconds over which a client's drop share is measured
DROP_MIN = 50  # packets dropped in a window before the share counts
DROP_SET = 0.10  # share of a client's packets dropped (queue full) that raises the problem...
DROP_CLEAR = 0.05  # ...and below which it ends


def text_restarting() -> str:
    return "this relay is restarting; your device will reconnect to it or use another relay shortly"


def text_draining() -> str:
    return ("this relay is being drained for maintenance; your device moves to another relay of this "
            "network shortly, and nothing is lost meanwhile")


def text_admission() -> str:
    return ("this relay cannot reach its admission check and admits devices unchecked; "
            "its operator should check --verify-client-url")


def text_cloned_key() -> str:
    return ("another device is logged in with this device's node key (copied Tailscale state), so only one "
            "of them gets packets at a time; log one of them out and back in (tailscale logout, tailscale up)")


def text_rate_limited(bytes_per_sec: int, burst: int) -> str:
    return (f"this relay limits each device to {_rate(bytes_per_sec)} (burst {_size(burst)}) and is slowing "
            "this device down; send less through it, or ask its operator to raise --rate-config")


def text_dropping(share: float) -> str:
    return (f"this relay recently dropped {share:.0%} of the packets for this device because they came "
            "faster than the device read them; check this device's network")


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _rate(n: float) -> str:
    return f"{_size(n)}/s ({n * 8 / 1e6:.3g} Mbit/s)"


def encode_health(text: str) -> bytes:
    """The Health frame for ``text`` ("" = healthy again), cut to ``MAX_TEXT`` bytes."""
    raw = text.encode()
    if len(raw) > MAX_TEXT:
        raw = raw[: MAX_TEXT - 3].decode("utf-8", "ignore").encode() + b"..."
    return encode_frame(FrameType.HEALTH, raw)


class ClientHealth:
    """One client's problems and what it was last told."""

    __slots__ = ("problems", "sent", "changed_at", "drop_mark", "dropping")

    def __init__(self) -> None:
        self.problems: dict[str, tuple[str, float]] = {}  # name -> (text, until)
        self.sent = ""  # the text the client has now (the last frame queued)
        self.changed_at = -math.inf
        self.drop_mark: tuple[int, int] | None = None  # (dropped, sent) at the last window
        self.dropping = False


class HealthBoard:
    """The relay's Health model: relay-wide problems, and the clients whose text may change.

    ``watch`` holds every client that has a problem or was told one; only those are visited
    each tick.  A connection takes part if it has a ``health`` attribute that is not False
    (``ClientConnection`` sets it to None for regular clients, False for mesh peers and
    probers)."""

    def __init__(self, hold: float = HOLD, period: float = 1.0) -> None:
        self.hold = hold
        self.period = period  # how often the relay calls ``tick``
        self.relay: dict[str, str] = {}
        self.watch: set[Any] = set()
        self.frames_sent = 0  # Health frames queued, for metrics
        self._drop_window_at = -math.inf

    # ------------------------------------------------------------------ problems

    def set_relay(self, name: str, text: str | None, conns: Any = ()) -> bool:
        """Set (text) or clear (None) a relay-wide problem; ``conns``: every connection, whose
        text then changes at their next ``due``.  Returns True if anything changed."""
        if text:
            if self.relay.get(name) == text:
                return False
            self.relay[name] = text
        elif self.relay.pop(name, None) is None:
            return False
        for c in conns:
            self._track(c)
        return True

    def linger(self, now: float) -> float:
        """When a problem noted now should end if nothing renews it: ``hold`` seconds, and at
        least two ticks, so that a tick sees it."""
        return now + max(self.hold, 2 * self.period)

    def set_client(self, conn: Any, name: str, text: str | None, until: float = math.inf) -> None:
        """Set (text, lasting until ``until``) or clear (None) one client's problem."""
        if conn.health is False:
            return
        if text:
            h = self._track(conn)
            if h is not None:
                h.problems[name] = (text, until)
        elif conn.health is not None:
            if conn.health.problems.pop(name, None) is not None:
                self.watch.add(conn)

    def joined(self, conn: Any) -> None:
        """A client logged in: it learns the relay-wide problems at the next tick."""
        if self.relay:
            self._track(conn)

    def left(self, conn: Any) -> None:
        self.watch.discard(conn)

    def _track(self, conn: Any) -> ClientHealth | None:
        h = conn.health
        if h is False:
            return None
        if h is None:
            h = conn.health = ClientHealth()
        self.watch.add(conn)
        return h

    # ------------------------------------------------------------------ decisions

    def text_for(self, h: ClientHealth, now: float) -> str:
        """What ``h``'s client should see now (expired problems are forgotten here)."""
        gone = [name for name, (_, until) in h.problems.items() if until <= now]
        for name in gone:
            del h.problems[name]
        if not self.relay and not h.problems:
            return ""
        texts = {**self.relay, **{name: text for name, (text, _) in h.problems.items()}}
        return "; ".join(texts[name] for name in sorted(texts, key=_rank))

    def due(self, conn: Any, now: float) -> bytes | None:
        """The Health frame ``conn`` should get now, or None (no change, or too soon after the
        last one); forgets the client once it has nothing left to say."""
        h = conn.health
        if not h:
            self.watch.discard(conn)
            return None
        text = self.text_for(h, now)
        if text == h.sent:
            if not text and not h.problems and not h.dropping:
                self.watch.discard(conn)
            return None
        if now < h.changed_at + self.hold:
            return None
        h.sent = text
        h.changed_at = now
        self.frames_sent += 1
        if not text and not h.problems and not h.dropping:
            self.watch.discard(conn)  # said all it had to say
        return encode_health(text)

    def tick(self, now: float) -> list[tuple[Any, bytes]]:
        """Every frame due now, as (connection, frame)."""
        out = []
        for conn in list(self.watch):
            if getattr(conn, "closing", False):
                self.watch.discard(conn)
                continue
            frame = self.due(conn, now)
            if frame is not None:
                out.append((conn, frame))
        return out

    # ------------------------------------------------------------------ drop share

    def drop_window_due(self, now: float) -> bool:
        if now < self._drop_window_at + DROP_WINDOW:
            return False
        self._drop_window_at = now
        return True

    def note_drops(self, conn: Any, dropped: int, sent: int, now: float) -> None:
        """A window's end: ``dropped`` (queue full) and ``sent`` are the client's running totals."""
        h = conn.health
        if h is False:
            return
        if h is None:
            h = conn.health = ClientHealth()
        mark = h.drop_mark or (0, 0)  # the first window counts from the login
        h.drop_mark = (dropped, sent)
        d, s = dropped - mark[0], sent - mark[1]
        share = d / (d + s) if d + s else 0.0
        if d >= DROP_MIN and share >= DROP_SET:
            h.dropping = True
            self.set_client(conn, "dropping", text_dropping(share))
        elif h.dropping and (d < DROP_MIN or share < DROP_CLEAR):
            h.dropping = False
            self.set_client(conn, "dropping", None)


def _rank(name: str) -> int:
    return ORDER.index(name) if name in ORDER else len(ORDER)


__all__ = ["HOLD", "ClientHealth", "HealthBoard", "encode_health"]
