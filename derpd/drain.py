"""Maintenance without an outage: a relay's drain before it stops (SIGTERM) or while it keeps
running (SIGUSR1, ``derpd drain``).

A drain

1. announces ``Draining`` to every coordinator the relay registers with
   (:meth:`derpd.coordinator.announce.Announcer.drain`): each takes the node out of its map
   at once, or, when it is the last healthy node of its region, publishes the region with
   ``NoMeasureNoHome`` so clients pick another home but still reach peers homed here;
2. keeps relaying while the clients move (headscale sends them the new map; Tailscale
   clients reconnect to the region's other node, or pick another home region), for at most
   ``--drain-grace``, and ends once no client has been connected for QUIET seconds (mesh
   peers and probers are not clients here).  The clients still here HEALTH_AFTER seconds
   into the drain are told in a Health frame (not earlier: any frame holds a home).  A client that moved away comes back for a
   moment to reach a peer that is still here, or whose home it still believes this is, until
   control tells it where the peer went; the quiet period covers that;
3. then, for SIGTERM, the usual shutdown follows: Restarting to whoever is left, queues
   drain for ``--shutdown-grace``, exit 0.

SIGUSR2 (``derpd drain --undo``) ends a drain that has not become a stop: the next
registration goes out without ``Draining`` and the coordinator publishes the node again once
its probes pass.  Without ``--coordinator`` nothing moves clients away: SIGTERM stops at once as
before, and SIGUSR1 says so in one line and only waits for clients to leave.

Dependencies: ``derpd.node`` and ``derpd.workers`` use this module; it uses
``derpd.relay`` (the server and its shutdown) and, for types only, the coordinator announcer.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import trio

from .relay.listener import RunningRelay
from .settings import RelaySettings

if TYPE_CHECKING:
    from .coordinator.announce import Announcer

log = logging.getLogger("derpd.drain")  # progress (-v)
startup = logging.getLogger("derpd.startup")  # what the operator asked for, and how it ended (always)

#: How long a drain waits for the coordinators to answer its announcement before it goes on.
ANNOUNCE_TIMEOUT = 5.0
#: How often a drain looks at the number of clients left.
POLL_INTERVAL = 0.1
#: A drain ends once no client has been connected for this long.
QUIET = 5.0
#: The Health text about the drain goes to the clients still here this long into it, not at its
#: start.  Any frame from a region keeps it a Tailscale client's home for 8 s when the region has
#: no measured latency (netcheck's PreferredDERPFrameTime, and a NoMeasureNoHome region never
#: has one): a text at once would make the idle clients of a region's last node keep their home
#: at the netcheck that follows the new map, and move only at their next periodic one (20-26 s
#: later).  Clients that are still here by then are busy, and hear frames from the relay anyway.
HEALTH_AFTER = 15.0

#: The signals a relay process handles.
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


async def announce_drain(announcer: Announcer | None, draining: bool = True) -> None:
    """Sends the drain (or its end) to every coordinator and logs, one line each, those that did
    not take it.  Returns after every coordinator answered, or ANNOUNCE_TIMEOUT."""
    if announcer is None:
        return
    announcer.drain(draining)
    what = "the drain" if draining else "the end of the drain"
    with trio.move_on_after(ANNOUNCE_TIMEOUT):
        for url, why in await announcer.wait_drain_announced():
            startup.warning("drain: coordinator %s did not take %s (%s); its map may still send clients here",
                            url, what, why)
        if draining:
            log.info("drain: every coordinator took this node out of its map")
        return
    for url in announcer.drain_pending():
        startup.warning("drain: coordinator %s did not answer within %.0f s; it keeps trying in the background",
                    url, ANNOUNCE_TIMEOUT)


async def wait_for_clients_to_leave(running: RunningRelay, grace: float, start: float | None = None,
                                    quiet: float = QUIET) -> int:
    """Waits until no client has been connected for ``quiet`` seconds, at most until ``grace``
    seconds after ``start`` (trio's clock; default now).  Returns the client connections left."""
    server = running.server
    if start is None:
        start = trio.current_time()
    quiet_since = trio.current_time()
    done = False
    with trio.move_on_at(start + grace):
        while True:
            now = trio.current_time()
            if server.client_count():
                quiet_since = now
            elif now - quiet_since >= quiet:
                done = True
                break
            await trio.sleep(POLL_INTERVAL)
    left = server.client_count()
    took = trio.current_time() - start
    if done:
        log.info("drain: done after %.1f s: no client connected for %.0f s", took, quiet)
    else:
        log.info("drain: %d client connection(s) still here after %.1f s (--drain-grace)", left, took)
    return left


class Maintenance:
    """The signal handling of one relay process: SIGHUP reloads; SIGTERM/SIGINT drain (with a
    coordinator and ``--drain-grace`` > 0), then shut down; a second one stops at once; SIGUSR1
    drains and keeps running; SIGUSR2 ends that drain.

    ``announcer`` is this process's registration (None in a ``--workers`` worker, whose parent
    announces, and without ``--coordinator``); ``registered`` says whether some process of this
    relay registers with a coordinator at all.
    """

    def __init__(self, running: RunningRelay, settings: RelaySettings, scope: trio.CancelScope,
                 announcer: Announcer | None = None, *, registered: bool = False,
                 health_after: float = HEALTH_AFTER) -> None:
        self.running = running
        self.health_after = health_after
        self.settings = settings
        self.scope = scope
        self.announcer = announcer
        self.registered = registered
        self.stopping_since: float | None = None
        self._drain: trio.CancelScope | None = None  # the drain under way, if any
        self._drained = False  # a SIGUSR1 drain has ended: clients are gone or the grace is over
        self._stop_after_drain = False

    async def handle(self, signals: AsyncIterator[int]) -> None:
        async with trio.open_nursery() as nursery:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    startup.info("received SIGHUP, reloading")
                    self.running.server.reload()
                elif signum == signal.SIGUSR1:
                    self._start_drain(nursery)
                elif signum == signal.SIGUSR2:
                    self._end_drain(nursery)
                elif self.stopping_since is None or trio.current_time() - self.stopping_since < 1.0:
                    # A repeat within a second is the same stop reaching us twice (a process group
                    # signal plus the --workers parent forwarding it), not an operator's second one.
                    if self.stopping_since is None:
                        self.stopping_since = trio.current_time()
                        self._stop(nursery, signal.Signals(signum).name)
                else:
                    startup.info("received %s again, stopping now", signal.Signals(signum).name)
                    self.scope.cancel()
                    return

    def _shutdown(self) -> None:
        log.info("drain over: telling clients to reconnect, draining queues for up to %.1fs",
                 self.settings.shutdown_grace)
        self.running.shutdown(self.settings.shutdown_grace)

    def _stop(self, nursery: trio.Nursery, name: str) -> None:
        grace = self.settings.drain_grace
        if self._drain is not None:
            startup.info("received %s: stopping once the drain under way ends (send it again to stop at once)",
                         name)
            self._stop_after_drain = True
        elif grace > 0 and self.registered and not self._drained:
            startup.info("received %s: draining for up to %.1fs (--drain-grace) while clients move to other "
                         "nodes, then telling the rest to reconnect (send it again to stop at once)", name, grace)
            self._stop_after_drain = True
            self._begin(nursery)
        else:
            startup.info("received %s: telling clients to reconnect, draining queues for up to %.1fs "
                         "(send it again to stop at once)", name, self.settings.shutdown_grace)
            self.running.shutdown(self.settings.shutdown_grace)

    def _start_drain(self, nursery: trio.Nursery) -> None:
        if self._drain is not None or self._drained or self.stopping_since is not None:
            startup.info("received SIGUSR1: already draining or stopping")
            return
        if not self.registered:
            startup.warning("drain: this relay registers with no coordinator (--coordinator), so no map moves its "
                        "clients away; waiting up to %.1fs for them to leave anyway", self.settings.drain_grace)
        else:
            startup.info("received SIGUSR1: draining for up to %.1fs (--drain-grace); the relay keeps running "
                         "(SIGUSR2 ends the drain)", self.settings.drain_grace)
        self._begin(nursery)

    def _begin(self, nursery: trio.Nursery) -> None:
        self._drain = trio.CancelScope()
        self.running.server.draining = True  # derp_draining; the Health text follows (HEALTH_AFTER)
        nursery.start_soon(self._run_drain, self._drain)

    async def _tell_clients(self, at: float) -> None:
        await trio.sleep_until(at)
        self.running.server.set_draining(True)

    async def _run_drain(self, scope: trio.CancelScope) -> None:
        with scope:
            start = trio.current_time()  # the grace counts from here, the announcement included
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._tell_clients, start + self.health_after)
                with trio.move_on_at(start + self.settings.drain_grace):
                    await announce_drain(self.announcer)
                await wait_for_clients_to_leave(self.running, self.settings.drain_grace, start)
                nursery.cancel_scope.cancel()
        if scope.cancelled_caught:
            return
        self._drain = None
        self._drained = True
        if self._stop_after_drain:
            self._shutdown()
        else:
            self.running.server.set_draining(True)  # a client that comes now is told
            startup.info("drain: done (%d clients left); stop the relay now (SIGTERM), or end the drain with "
                         "SIGUSR2", self.running.server.client_count())

    def _end_drain(self, nursery: trio.Nursery) -> None:
        if self.stopping_since is not None or not self.running.server.draining:
            startup.info("received SIGUSR2: %s", "stopping already" if self.stopping_since is not None
                     else "not draining, nothing to end")
            return
        if self._drain is not None:
            self._drain.cancel()
        self._drain = None
        self._drained = False
        self.running.server.set_draining(False)
        startup.info("received SIGUSR2: drain ended; the coordinator publishes this node again once its probes "
                     "pass")
        nursery.start_soon(announce_drain, self.announcer, False)


class DrainError(Exception):
    """``derpd drain`` cannot signal the relay; the message is one line, ``code`` the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def signal_relay(relay: str, *, undo: bool = False) -> int:
    """``derpd drain PID|PIDFILE``: sends SIGUSR1 (``undo``: SIGUSR2) to the ``derpd serve``
    process named.  Returns its PID.

    Raises:
        DrainError: not a PID or a readable PID file (exit 2), no such process, or not a
            ``derpd serve`` process (exit 1).
    """
    import os
    from pathlib import Path

    text = relay.strip()
    if not text.isdigit():
        try:
            text = Path(relay).read_text().strip()
        except OSError as e:
            raise DrainError(f"{relay}: not a PID, and cannot read it as a PID file ({e.strerror}); give the "
                             "relay's PID (systemctl show -p MainPID --value derpd)", 2) from None
        if not text.isdigit():
            raise DrainError(f"{relay} does not hold a PID (got {text[:20]!r})", 2)
    pid = int(text)
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        raise DrainError(f"no process with PID {pid}; is the relay running?") from None
    except OSError:
        cmdline = []  # no /proc here: trust the operator
    if cmdline and not (any(b"derpd" in part for part in cmdline) and b"serve" in cmdline):
        shown = b" ".join(cmdline).decode(errors="replace")[:80]
        raise DrainError(f"PID {pid} is not a derpd serve process ({shown}); give the relay's PID")
    try:
        os.kill(pid, signal.SIGUSR2 if undo else signal.SIGUSR1)
    except ProcessLookupError:
        raise DrainError(f"no process with PID {pid}; is the relay running?") from None
    except PermissionError:
        raise DrainError(f"not allowed to signal PID {pid}; run derpd drain as the relay's user or root") from None
    return pid


__all__ = ["HANDLED_SIGNALS", "DrainError", "Maintenance", "announce_drain", "signal_relay",
           "wait_for_clients_to_leave"]
