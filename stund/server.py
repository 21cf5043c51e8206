"""Trio UDP loop for the STUN server; it only moves bytes (decisions are in stund.binding).

Each listening socket gets one task that waits until the socket is readable, then answers
every datagram the socket holds (non-blocking ``recvfrom`` until EAGAIN, one non-blocking
``sendto`` per reply) before it goes back to epoll; after :data:`BATCH` datagrams it lets the
other tasks run and carries on without waiting.  Per datagram the work is: one address lookup
in a small cache, :func:`stund.binding.answer`, one counter increment and one send.  A full
send buffer drops the reply (counted as a write error): UDP callers retransmit.

With the optional compiled helper ``stund._mmsg`` (built by setup.py; ``DERPD_PURE=1`` or
``STUND_PURE=1`` disable it, see stund/accel.py) one ``recvmmsg`` takes up to 64 datagrams
and one ``sendmmsg`` sends their replies, and the sender's address arrives packed (no text
round trip).

The answering thread: with the helper, every socket outside an RFC 5780 grid is served by a
dedicated OS thread running ``stund._mmsg.FastStun.run``, which never takes the GIL for a
plain Binding request: it waits in ``poll()`` (the socket and a wake-up eventfd), takes up
to 64 datagrams with ``recvmmsg``, builds the replies :func:`stund.binding.answer` would
build, byte for byte, and sends them with one ``sendmmsg``; so a request costs no trip
through trio's run loop.  After a batch it keeps reading for up to 100 us before it sleeps
again (adaptive; see ``SPIN_NS`` in stund/_mmsg.c).  Anything else in the batch (CHANGE-REQUEST, RESPONSE-PORT,
unknown attributes, malformed input, responses, other methods) is handed, with the GIL, to
the same Python code the trio path runs, before the batch's replies are sent.  The trio
task that owns the socket starts the thread and, when cancelled, signals the eventfd and
joins it; the thread is gone before the socket is closed.  The grid sockets stay on the trio
path.

Dual-stack: ``"::"`` binds one IPv6 socket with IPV6_V6ONLY off.  IPv4 clients then appear as
``::ffff:a.b.c.d``; we un-map them so they get a family-1 (IPv4) XOR-MAPPED-ADDRESS (P-26).

RFC 5780: with an alternate IP, the first address of ``addrs`` is the primary and stund binds
the four combinations {primary, alternate IP} x {primary, alternate port}.  A reply to a
CHANGE-REQUEST leaves from the socket the request asked for.

``--workers N`` (see :func:`run_workers`) starts N processes that bind the same ports with
SO_REUSEPORT; the kernel spreads clients across them.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing
import signal
import socket
import sys
import threading
from collections.abc import Callable, MutableSequence, Sequence
from functools import partial
from typing import Any

import trio

from . import accel
from .binding import Grid, Ignore, answer
from .message import StunError
from .metrics import PROCESS_STATS, StunStats, add_source, add_worker_process, slot_count

__all__ = ["BATCH", "RCVBUF", "StunConfigError", "serve_stun", "run_workers", "parse_hostport"]

log = logging.getLogger("stund")

# Optional compiled helper (setup.py builds it when a C compiler is there): recvmmsg/sendmmsg.
# stund.accel chooses (STUND_PURE=1 or DERPD_PURE=1 force the pure-Python path, which behaves the same).
_mmsg: Any = accel.mmsg

#: Datagrams handled per wakeup before yielding to other tasks.
BATCH = 256
#: Requested socket buffer sizes (the kernel caps them at net.core.[rw]mem_max).
RCVBUF = 8 << 20
SNDBUF = 4 << 20
#: Largest datagram we read; longer ones are truncated and then fail the length check.
MAX_DATAGRAM = 2048


class StunConfigError(StunError, ValueError):
    """The server was configured with addresses it cannot use."""


def parse_hostport(text: str, default_port: int = 3478) -> tuple[str, int]:
    """Parses ``IP``, ``IP:PORT``, ``[IPv6]:PORT``, ``:PORT`` (all addresses, dual-stack).

    Raises:
        StunConfigError: with a hint on the accepted forms.
    """
    host, port_text = text, ""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise StunConfigError(f"{text!r}: missing ']'; write IPv6 addresses as [::1]:3478")
        host, rest = text[1:close], text[close + 1 :]
        if rest and not rest.startswith(":"):
            raise StunConfigError(f"{text!r}: expected ':PORT' after ']'")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if host == "":
        host = "::"
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise StunConfigError(f"{text!r}: port must be a number, e.g. 0.0.0.0:3478") from None
    if not 0 <= port <= 65535:
        raise StunConfigError(f"{text!r}: port must be 0-65535")
    return host, port


def _family(host: str) -> socket.AddressFamily:
    try:
        socket.inet_pton(socket.AF_INET, host)
        return socket.AF_INET
    except OSError:
        pass
    try:
        socket.inet_pton(socket.AF_INET6, host.split("%")[0])
        return socket.AF_INET6
    except OSError:
        raise StunConfigError(
            f"{host!r} is not an IP address; give a literal such as 0.0.0.0, :: or 127.0.0.1"
        ) from None


def _open_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    fam = _family(host)
    sock = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        if fam == socket.AF_INET6 and host in ("::", "::0"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        for opt, size in ((socket.SO_RCVBUF, RCVBUF), (socket.SO_SNDBUF, SNDBUF)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, size)
            except OSError:  # pragma: no cover - platform limits
                pass
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Peer:
    """Packed-address cache: recvfrom gives text addresses; the codec wants bytes."""

    __slots__ = ("cache",)

    def __init__(self) -> None:
        self.cache: dict[str, bytes] = {}

    def packed(self, host: str) -> bytes:
        ip = self.cache.get(host)
        if ip is None:
            if len(self.cache) > 4096:
                self.cache.clear()
            if ":" not in host:
                ip = socket.inet_pton(socket.AF_INET, host)
            elif host.startswith("::ffff:") and "." in host:
                ip = socket.inet_pton(socket.AF_INET, host[7:])
            else:
                ip = socket.inet_pton(socket.AF_INET6, host.split("%")[0])
            self.cache[host] = ip
        return ip


def _answers_in_thread(sock: socket.socket, grid_socks: dict[tuple[int, int], socket.socket] | None) -> bool:
    return (
        _mmsg is not None
        and hasattr(_mmsg, "FastStun")
        and grid_socks is None
        and sock.family in (socket.AF_INET, socket.AF_INET6)
    )


async def _serve_socket(
    sock: socket.socket,
    stats: StunStats,
    decide: Callable[..., Any],
    grid_socks: dict[tuple[int, int], socket.socket] | None,
    tailscale_only: bool = False,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    if _answers_in_thread(sock, grid_socks):
        await _serve_socket_in_thread(sock, stats, decide, tailscale_only, task_status)
        return
    task_status.started()
    answerer = _Answerer(sock, stats, decide, grid_socks)
    batched = _mmsg is not None and sock.family in (socket.AF_INET, socket.AF_INET6)
    drain = answerer.drain_batched if batched else answerer.drain
    wait_readable = trio.lowlevel.wait_readable
    checkpoint = trio.lowlevel.checkpoint
    drained = True
    while True:
        # Back to epoll only once the socket is empty; after a full batch, just let the
        # other tasks run and carry on reading.
        if drained:
            await wait_readable(sock)
        else:
            await checkpoint()
        drained = drain(log.isEnabledFor(logging.DEBUG))


async def _serve_socket_in_thread(
    sock: socket.socket,
    stats: StunStats,
    decide: Callable[..., Any],
    tailscale_only: bool,
    task_status: trio.TaskStatus[None],
) -> None:
    """Serves ``sock`` from an answering thread (module docstring) until cancelled."""
    # What the thread hands over is answered by the trio path's code, counting into a list of
    # its own that the thread folds into ``stats.shared`` (atomically) after each batch.
    answerer = _Answerer(sock, StunStats(), decide, None)
    slots = answerer.request_slots
    fast = _mmsg.FastStun(
        sock.fileno(),
        stats.shared,
        [slots[(v6, kind)] for v6 in (False, True) for kind in ("tailscale", "rfc5389", "rfc3489")],
        answerer.ok_slot,
        StunStats.READ_ERROR,
        StunStats.WRITE_ERROR,
        tailscale_only,
        lambda batch: answerer.answer_batch(batch, log.isEnabledFor(logging.DEBUG)),
        answerer.counts,
    )
    token = trio.lowlevel.current_trio_token()
    finished = trio.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            fast.run()
        except BaseException as exc:  # handed to the trio task below
            failure.append(exc)
        finally:
            try:
                token.run_sync_soon(finished.set)
            except trio.RunFinishedError:
                pass

    thread = threading.Thread(target=run, name=f"stun {_fmt(*sock.getsockname()[:2])}", daemon=True)
    thread.start()
    try:
        task_status.started()
        await finished.wait()
    finally:
        # Prompt: the thread checks the stop flag before every batch and spin step, and
        # poll() watches the eventfd; join() releases the GIL, so a thread waiting for it to
        # run the callback finishes that batch and then stops.
        fast.stop()
        thread.join()
    if failure:
        raise failure[0]


class _Answerer:
    """Answers what one socket holds; ``drain*`` return True once the socket is empty."""

    def __init__(
        self,
        sock: socket.socket,
        stats: StunStats,
        decide: Callable[..., Any],
        grid_socks: dict[tuple[int, int], socket.socket] | None,
    ) -> None:
        self.sock, self.decide, self.grid_socks = sock, decide, grid_socks
        self.counts = stats.counts
        self.request_slots = {
            (v6, kind): StunStats.request_slot(v6, kind)
            for v6 in (False, True)
            for kind in ("tailscale", "rfc5389", "rfc3489")
        }
        self.ok_slot, self.err_slot = StunStats.response_slot(False), StunStats.response_slot(True)
        self.ignored_slots: dict[str, int] = {}
        self.packed = _Peer().packed

    def _ignored(self, result: Ignore, ip: bytes, size: int, who: str, debug: bool) -> None:
        slot = self.ignored_slots.get(result.reason)
        if slot is None:
            slot = self.ignored_slots[result.reason] = StunStats.ignored_slot(result.reason)
        self.counts[slot] += 1
        if result.kind is not None:
            self.counts[self.request_slots[(len(ip) == 16, result.kind)]] += 1
        if debug:
            log.debug("stun: ignored %d bytes from %s: %s", size, who, result.reason)

    def drain(self, debug: bool) -> bool:
        """recvfrom/sendto, one datagram at a time, at most BATCH."""
        sock, decide, grid_socks, counts = self.sock, self.decide, self.grid_socks, self.counts
        request_slots, ok_slot, err_slot, packed = self.request_slots, self.ok_slot, self.err_slot, self.packed
        recvfrom, sendto = sock.recvfrom, sock.sendto
        for _ in range(BATCH):
            try:
                data, addr = recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as exc:
                counts[StunStats.READ_ERROR] += 1
                log.debug("stun: receive error on %s: %s", sock.getsockname(), exc)
                return True
            ip = packed(addr[0])
            result = decide(data, ip, addr[1])
            if type(result) is Ignore:
                self._ignored(result, ip, len(data), addr[0], debug)
                continue
            counts[request_slots[(len(ip) == 16, result.kind)]] += 1
            dest = addr if result.port == addr[1] else (addr[0], result.port, *addr[2:])
            out = sock if result.via is None or grid_socks is None else grid_socks[result.via]
            try:
                if out is sock:
                    sendto(result.data, dest)
                else:
                    out.sendto(result.data, (addr[0], result.port))
            except OSError as exc:
                counts[StunStats.WRITE_ERROR] += 1
                if debug:
                    log.debug("stun: send to %s failed: %s", addr[0], exc)
                continue
            counts[err_slot if result.error else ok_slot] += 1
        return False

    def drain_batched(self, debug: bool) -> bool:
        """``drain`` with one recvmmsg per batch of requests and one sendmmsg per batch of
        replies (stund._mmsg).  Replies to another port or from another grid socket take
        ``sendto``."""
        sock, counts = self.sock, self.counts
        fd = sock.fileno()
        recv_batch, most = _mmsg.recv_batch, _mmsg.MAX_BATCH
        handled = 0
        while handled < BATCH:
            try:
                got = recv_batch(fd, most)
            except OSError as exc:
                counts[StunStats.READ_ERROR] += 1
                log.debug("stun: receive error on %s: %s", sock.getsockname(), exc)
                return True
            if not got:
                # Empty only now, after answering the last batch: requests that arrived
                # meanwhile were taken without a trip through epoll.
                return True
            handled += len(got)
            self.answer_batch(got, debug)
        return False

    def answer_batch(self, got: list[tuple[bytes, bytes, int, bytes]], debug: bool) -> None:
        """Answers ``(data, ip, port, sockaddr)`` datagrams as ``stund._mmsg.recv_batch``
        returns them: one ``sendmmsg`` for the replies to their source, ``sendto`` for the
        others."""
        sock, decide, grid_socks, counts = self.sock, self.decide, self.grid_socks, self.counts
        request_slots, ok_slot, err_slot = self.request_slots, self.ok_slot, self.err_slot
        replies = []
        nok = nerr = 0
        for data, ip, port, name in got:
            result = decide(data, ip, port)
            if type(result) is Ignore:
                self._ignored(result, ip, len(data), ip.hex(), debug)
                continue
            counts[request_slots[(len(ip) == 16, result.kind)]] += 1
            out = sock if result.via is None or grid_socks is None else grid_socks[result.via]
            if result.port == port and out is sock:
                replies.append((result.data, name))
                if result.error:
                    nerr += 1
                else:
                    nok += 1
                continue
            try:
                out.sendto(result.data, _text_address(out, ip, result.port, name))
            except OSError as exc:
                counts[StunStats.WRITE_ERROR] += 1
                if debug:
                    log.debug("stun: send to %s failed: %s", ip.hex(), exc)
                continue
            counts[err_slot if result.error else ok_slot] += 1
        if replies:
            failed = _mmsg.send_batch(sock.fileno(), replies)
            if failed:
                # Which ones failed is not known; count them against the answers.
                counts[StunStats.WRITE_ERROR] += failed
                nok -= min(failed, nok)
            counts[ok_slot] += nok
            counts[err_slot] += nerr


def _text_address(sock: socket.socket, ip: bytes, port: int, name: bytes) -> tuple[Any, ...]:
    """The ``sendto`` address for a packed sender IP on ``sock`` (the batched path's slow lane)."""
    if sock.family == socket.AF_INET:
        return (socket.inet_ntop(socket.AF_INET, ip), port)
    if len(ip) == 4:
        return ("::ffff:" + socket.inet_ntop(socket.AF_INET, ip), port)
    scope = int.from_bytes(name[24:28], sys.byteorder) if len(name) >= 28 else 0
    return (socket.inet_ntop(socket.AF_INET6, ip), port, 0, scope)


async def serve_stun(
    addrs: list[tuple[str, int]],
    *,
    alternate_ip: str | None = None,
    alternate_port: int | None = None,
    tailscale_only: bool = False,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serves STUN on every ``(host, port)`` until cancelled.

    ``"::"`` is dual-stack; port 0 picks a free port.  With ``alternate_ip`` the first
    address is the RFC 5780 primary and must be a specific IP of the same family;
    ``alternate_port`` defaults to a free port.

    ``task_status.started`` receives the bound ``(host, port)`` of every address in
    ``addrs`` order, followed in RFC 5780 mode by (primary IP, alternate port),
    (alternate IP, primary port) and (alternate IP, alternate port).

    Raises:
        StunConfigError: unusable addresses (before ``started``).
        OSError: a bind failed (before ``started``).
    """
    await _serve(
        addrs,
        alternate_ip=alternate_ip,
        alternate_port=alternate_port,
        tailscale_only=tailscale_only,
        reuse_port=False,
        stats=PROCESS_STATS,
        task_status=task_status,
    )


def _bind_grid(
    primary: tuple[str, int], alternate_ip: str, alternate_port: int | None, reuse_port: bool
) -> dict[tuple[int, int], socket.socket]:
    """Binds the 2x2 RFC 5780 grid; ports chosen by the kernel when 0 (retrying collisions)."""
    p_ip, p_port = primary
    if _family(p_ip) != _family(alternate_ip):
        raise StunConfigError(
            f"alternate address {alternate_ip} and primary {p_ip} must be the same IP family"
        )
    if p_ip in ("0.0.0.0", "::", "::0") or alternate_ip in ("0.0.0.0", "::", "::0"):
        raise StunConfigError(
            "RFC 5780 needs specific addresses: give -a PRIMARY_IP:PORT first and "
            "--alternate-addr ALT_IP[:PORT], not a wildcard"
        )
    if p_ip == alternate_ip:
        raise StunConfigError("the alternate IP must differ from the primary IP")
    for _attempt in range(20):
        socks: dict[tuple[int, int], socket.socket] = {}
        try:
            socks[(0, 0)] = _open_socket(p_ip, p_port, reuse_port)
            port0 = socks[(0, 0)].getsockname()[1]
            socks[(1, 0)] = _open_socket(alternate_ip, port0, reuse_port)
            socks[(0, 1)] = _open_socket(p_ip, alternate_port or 0, reuse_port)
            port1 = socks[(0, 1)].getsockname()[1]
            if port1 == port0:
                raise StunConfigError("the alternate port must differ from the primary port")
            socks[(1, 1)] = _open_socket(alternate_ip, port1, reuse_port)
            return socks
        except OSError as exc:
            for s in socks.values():
                s.close()
            # Only a kernel-chosen port may collide on the other IP: retry those.
            if exc.errno != errno.EADDRINUSE or (p_port and alternate_port):
                raise
        except BaseException:
            for s in socks.values():
                s.close()
            raise
    raise OSError(errno.EADDRINUSE, "could not find a port free on both RFC 5780 addresses")


async def _serve(
    addrs: Sequence[tuple[str, int]],
    *,
    alternate_ip: str | None,
    alternate_port: int | None,
    tailscale_only: bool,
    reuse_port: bool,
    stats: StunStats,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    if not addrs:
        raise StunConfigError("no address to listen on; give at least one, e.g. -a :3478")
    socks: list[tuple[socket.socket, Callable[..., Any], dict[tuple[int, int], socket.socket] | None]] = []
    bound: list[tuple[str, int]] = []
    try:
        plain = partial(answer, tailscale_only=tailscale_only)
        rest = list(addrs)
        grid_socks: dict[tuple[int, int], socket.socket] | None = None
        if alternate_ip is not None:
            grid_socks = _bind_grid(rest.pop(0), alternate_ip, alternate_port, reuse_port)
            ips = (
                socket.inet_pton(_family(addrs[0][0]), addrs[0][0]),
                socket.inet_pton(_family(alternate_ip), alternate_ip),
            )
            grid = Grid(ips, (grid_socks[(0, 0)].getsockname()[1], grid_socks[(0, 1)].getsockname()[1]))
            for at in ((0, 0), (0, 1), (1, 0), (1, 1)):
                decide = partial(answer, tailscale_only=tailscale_only, grid=grid, at=at)
                socks.append((grid_socks[at], decide, grid_socks))
        for host, port in rest:
            socks.append((_open_socket(host, port, reuse_port), plain, None))
        if grid_socks is not None:
            order = [socks[0], *socks[4:], socks[1], socks[2], socks[3]]
        else:
            order = socks
        hosts = [h for h, _ in addrs]
        if grid_socks is not None:
            hosts += [addrs[0][0], alternate_ip, alternate_ip]
        for (sock, _, _), host in zip(order, hosts, strict=True):
            bound.append((host, sock.getsockname()[1]))
        async with trio.open_nursery() as nursery:
            for sock, decide, table in socks:
                await nursery.start(_serve_socket, sock, stats, decide, table, tailscale_only)
            log.info("stun: listening on %s", " ".join(_fmt(h, p) for h, p in bound))
            task_status.started(bound)
    finally:
        for sock, _, _ in socks:
            sock.close()


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- --workers N ----------------------------------------------------------------------------


def _worker_main(
    addrs: list[tuple[str, int]],
    options: dict[str, Any],
    counts: MutableSequence[int],
    shared: MutableSequence[int],
    conn: Any,
    log_level: int,
) -> None:
    logging.basicConfig(level=log_level, format="%(message)s", stream=sys.stderr)

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(
                    partial(_serve, addrs, reuse_port=True, stats=StunStats(counts, shared), **options)
                )
                conn.send(bound)
                conn.close()
                async for _ in signals:
                    nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseException as exc:  # report bind errors to the parent
        try:
            conn.send(exc)
        except Exception:
            pass
        if not isinstance(exc, Exception):
            raise


def run_workers(
    addrs: list[tuple[str, int]],
    workers: int,
    *,
    alternate_ip: str | None = None,
    alternate_port: int | None = None,
    tailscale_only: bool = False,
    on_started: Callable[[list[tuple[str, int]]], None] | None = None,
) -> str | None:
    """Runs ``workers`` processes serving the same ports with SO_REUSEPORT; blocks until they
    exit or this process gets SIGINT/SIGTERM.  Their counters are added to this process's
    metrics.  Worker 0 binds first so port 0 resolves to one port shared by all.

    Returns the name of the signal that stopped it ("SIGTERM", "SIGINT"), or None when
    the workers ended on their own.

    Raises:
        StunConfigError / OSError: worker 0 could not bind.
    """
    ctx = multiprocessing.get_context("spawn")
    options: dict[str, Any] = {
        "alternate_ip": alternate_ip,
        "alternate_port": alternate_port,
        "tailscale_only": tailscale_only,
    }
    procs: list[Any] = []
    level = logging.getLogger().getEffectiveLevel()

    def start(worker_addrs: list[tuple[str, int]]) -> list[tuple[str, int]]:
        counts, shared = ctx.RawArray("Q", slot_count()), ctx.RawArray("Q", slot_count())
        add_source(counts)
        add_source(shared)
        parent_end, child_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_worker_main, args=(worker_addrs, options, counts, shared, child_end, level), daemon=True
        )
        proc.start()
        child_end.close()
        add_worker_process(str(len(procs)), proc.pid)
        procs.append(proc)
        try:
            result = parent_end.recv()
        except EOFError:
            raise StunConfigError("a STUN worker exited before binding; see its error above") from None
        finally:
            parent_end.close()
        if isinstance(result, BaseException):
            raise result
        return result

    def stop(*_: Any) -> None:
        for p in procs:
            if p.is_alive():
                p.terminate()

    stopped_by: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopped_by.append(signal.Signals(signum).name)
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_signal)
    old_int = signal.signal(signal.SIGINT, on_signal)
    try:
        bound = start(list(addrs))
        concrete = bound[: len(addrs)]
        if alternate_ip is not None:
            options["alternate_port"] = bound[len(addrs)][1]
        for _ in range(workers - 1):
            start(concrete)
        if on_started is not None:
            on_started(bound)
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        stopped_by.append("SIGINT")
    finally:
        stop()
        for p in procs:
            p.join(timeout=5)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
    return stopped_by[0] if stopped_by else None
