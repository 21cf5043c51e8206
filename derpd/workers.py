"""``derpd serve --workers N``: N relay processes on one port, meshed over loopback, supervised.

The parent process:

* loads the TLS certificate once, before any worker starts (an IP ``--hostname`` with an
  empty ``--certdir`` gets ONE self-signed certificate, which every worker then loads);
* binds STUN, ``--metrics-addr`` and one private loopback port per worker (its mesh port);
* starts each worker with ``spawn`` (a fresh interpreter that inherits only the sockets it is
  given) and a socket of its own on the relay port (SO_REUSEPORT): when a worker dies, its
  socket dies with it and the kernel stops handing it connections;
* prints the start-up lines a single process prints (relay, pin and DERP-map node, STUN) and
  registers with the coordinators (``--coordinator``);
* restarts a worker that dies, with backoff, logging its exit status, and gives up (exit 1)
  when one dies ``GIVE_UP_AFTER`` times within ``GIVE_UP_WINDOW`` seconds;
* forwards SIGTERM/SIGINT/SIGHUP, and serves every worker's metrics merged
  (``aggregate_metrics``).

Every worker is a complete relay with the same key and holds a mesh link (a generated mesh
key) to every other worker's private port, so a client on worker 1 reaches a client on worker 2
through one ForwardPacket hop.  These links log in with client keys the parent generates
(``link_keys``), so every worker can leave them out of its metrics: they are not clients,
connections, watchers or mesh peers.

Each worker's relay (``start_relay``) and the parent's node around the workers (``start_node``,
with the workers as its relay: STUN, metrics, start-up lines, registration) are assembled by
``derpd.node`` from the same ``NodeSettings`` the single process runs with.

Dependencies: ``derpd.cli`` imports this module; it builds each worker and the parent's node with
``derpd.node``, and never imports the command line.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
from collections import defaultdict, deque
from functools import partial
from typing import Any

import trio
from stund.oneline import run_trio

from .keys import NodePrivate
from .node import (NodeParts, RunningNode, bind_error_message, handle_signals, open_signals, prepare, setup_logging,
                   start_node, start_relay)
from .relay.listener import BindError, RunningRelay
from .relay.server import RelayServer
from .settings import NodeSettings, SettingsError

log = logging.getLogger("derpd.workers")

GIVE_UP_AFTER = 5  # deaths of one worker ...
GIVE_UP_WINDOW = 60.0  # ... within this many seconds: the parent stops and exits 1
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
READY_TIMEOUT = 60.0  # a worker that is not serving by then counts as dead


def available_cpus() -> int:
    """CPUs this process may run on (``--workers auto``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _bind(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    if host in ("", "::"):
        family, addr = socket.AF_INET6, ("::", port)
    else:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        family, addr = info[0], info[4][:2]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and host in ("", "::"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return sock


# ---------------------------------------------------------------------------- metrics

# How the processes' series merge into one exposition (docs/operations.md, "Metrics in every mode").
# process_* and python_* (``PER_PROCESS_PREFIXES``) carry each process's own ``worker`` label,
# as they do without --workers, and stay apart.  Counters are summed, and so are gauges that
# count (connections, clients held); these gauges take the minimum or the maximum instead:
MIN_GAUGES = frozenset({
    "derp_tls_cert_not_after_seconds",  # the certificate that expires first
    "derp_mesh_peers_connected", "derp_mesh_peer_up",  # the worker that has lost a peer
})
MAX_GAUGES = frozenset({
    "derp_tls_cert_pinned", "derpd_build_info", "derp_bootstrap_dns_names",  # the same in every worker
    "derp_clients_remote", "derp_mesh_peers_configured", "derp_mesh_peer_keys",  # every worker sees the region
})


def aggregate_metrics(texts: list[str]) -> bytes:
    """Merge Prometheus text from several processes of one relay (each labels its own
    per-process series with its ``worker`` name), and expose the result with prometheus-client's
    own writer (so counter TYPE lines keep their ``_total`` names).

    Series that carry a ``worker`` label (``process_*``, ``python_*``) stay one per process.
    Everything else is merged into one series, as a single process reports it: counters (and
    histogram and summary series) and counting gauges are summed, ``MIN_GAUGES`` and
    ``MAX_GAUGES`` take the minimum or the maximum, and ``derp_clients`` is the merged
    ``derp_clients_local + derp_clients_remote``.
    """
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.samples import Sample

    families: dict[str, Any] = {}
    merged: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = defaultdict(dict)
    for text in texts:
        for fam in text_string_to_metric_families(text):
            families.setdefault(fam.name, fam)
            out = merged[fam.name]
            pick = min if fam.name in MIN_GAUGES else max if fam.name in MAX_GAUGES else None
            for sample in fam.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in out:
                    out[key] = sample.value
                elif pick is not None:
                    out[key] = pick(out[key], sample.value)
                else:
                    out[key] += sample.value
    clients = merged.get("derp_clients")
    if clients:
        local = sum(merged.get("derp_clients_local", {}).values())
        remote = sum(merged.get("derp_clients_remote", {}).values())
        for key in clients:
            clients[key] = local + remote
    for fam_name, fam in families.items():
        fam.samples = [Sample(sname, dict(labels), value) for (sname, labels), value in merged[fam_name].items()]

    class _Merged:
        def collect(self) -> Any:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())  # type: ignore[arg-type]
    return generate_latest(registry)


async def _scrape(port: int) -> str | None:
    """One worker's /metrics over its private loopback port, or None if it does not answer."""
    try:
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = bytearray()
                while chunk := await stream.receive_some(65536):
                    data += chunk
                    if len(data) > 64 << 20:
                        return None
        head, sep, body = bytes(data).partition(b"\r\n\r\n")
        return body.decode() if sep and head.startswith(b"HTTP/1.1 200") else None
    except (OSError, trio.BrokenResourceError, trio.TooSlowError, UnicodeDecodeError):
        return None


# ---------------------------------------------------------------------------- worker side


def _worker_main(index: int, settings: NodeSettings, main_sock: socket.socket, mesh_sock: socket.socket,
                 peer_ports: list[int], mesh_key: bytes, link_keys: list[bytes], conn: Any) -> None:
    """A worker process: serve until a signal stops it.  Tells the parent ("ready", info) once
    it serves, or ("error", one line) if it cannot start."""
    setup_logging(settings.verbose)
    if settings.verbose <= 0:
        logging.getLogger("derpd.startup").setLevel(logging.WARNING)  # the parent prints the start-up lines
    try:
        relay = dataclasses.replace(settings.relay, mesh_key=settings.relay.mesh_key or mesh_key)
        if index != 0:
            relay = dataclasses.replace(relay, http_port=-1)  # worker 0 serves the plain-HTTP companion
        settings = dataclasses.replace(settings, relay=relay)
        run_trio(_worker, index, settings, main_sock, mesh_sock, peer_ports, link_keys, conn)
    except KeyboardInterrupt:
        pass
    except BindError as e:  # worker 0's --http-port
        conn.send(("error", bind_error_message(e)))
        raise SystemExit(2) from None
    except (SettingsError, OSError) as e:  # SettingsError includes CertError
        conn.send(("error", str(e)))
        raise SystemExit(2) from None


async def _worker(index: int, settings: NodeSettings, main_sock: socket.socket, mesh_sock: socket.socket,
                  peer_ports: list[int], link_keys: list[bytes], conn: Any) -> None:
    from .mesh import MeshTarget, run_mesh

    parts = prepare(settings)  # this process's own admission checks (they hold trio objects)
    mesh_key = settings.relay.mesh_key
    assert mesh_key is not None  # _worker_main gives the workers one when the region has none
    with open_signals() as signals:
        async with trio.open_nursery() as nursery:
            running = await start_relay(nursery, settings, parts, sockets=[main_sock], internal_sockets=[mesh_sock])
            running.server.process_metrics.worker = str(index)
            running.server.registry.internal_keys = frozenset(NodePrivate(k).public.raw for k in link_keys)
            await nursery.start(partial(
                run_mesh, running.server, [MeshTarget(f"127.0.0.1:{p}") for p in peer_ports],
                mesh_key, client_key=NodePrivate(link_keys[index]), skip_self_check=True,
                scheme="http", internal=True))
            conn.send(("ready", {"url": running.url, "http_port": running.http_port}))
            # The parent announces the drain to the coordinators; each worker waits for its clients.
            await handle_signals(signals, running, settings, nursery.cancel_scope)


# ---------------------------------------------------------------------------- parent side


class WorkersFailed(Exception):
    """A worker could not start, or kept dying; the message is one line for the operator."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _exit_status(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class Supervisor:
    """Starts the workers, keeps them alive, and stops them (see the module docstring)."""

    def __init__(self, settings: NodeSettings, first_sock: socket.socket, mesh_socks: list[socket.socket]) -> None:
        self.settings = settings
        self.count = settings.workers
        self.host = settings.relay.listen[0]
        self.port = first_sock.getsockname()[1]
        self._first_sock: socket.socket | None = first_sock
        self.mesh_socks = mesh_socks
        self.mesh_ports = [s.getsockname()[1] for s in mesh_socks]
        self.mesh_key = os.urandom(32)
        self.link_keys = [NodePrivate.generate().raw for _ in range(self.count)]  # each worker's links: its own key
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: dict[int, Any] = {}
        self.ready_info: dict[int, dict[str, Any]] = {}
        self.restarts = [0] * self.count
        self.stopping = False
        self._stop = trio.Event()

    def request_stop(self) -> None:
        """No more restarts; a worker waiting for its restart gives up waiting at once."""
        self.stopping = True
        self._stop.set()

    def _spawn(self, index: int) -> tuple[Any, Any]:
        sock, self._first_sock = (self._first_sock, None) if self._first_sock is not None else (
            _bind(self.host, self.port, reuse_port=True), None)
        parent_end, child_end = self.ctx.Pipe(duplex=False)
        others = [p for j, p in enumerate(self.mesh_ports) if j != index]
        proc = self.ctx.Process(
            target=_worker_main, name=f"derpd-worker-{index}", daemon=False,
            args=(index, self.settings, sock, self.mesh_socks[index], others, self.mesh_key, self.link_keys,
                  child_end))
        try:
            proc.start()
        finally:
            sock.close()  # the worker holds the only copy now
            child_end.close()
        self.procs[index] = proc
        return proc, parent_end

    async def _wait_ready(self, proc: Any, conn: Any) -> tuple[str, Any]:
        """Returns ("ready", info), ("error", line), or ("dead", None)."""
        with trio.move_on_after(READY_TIMEOUT):
            await trio.lowlevel.wait_readable(conn.fileno())
            try:
                reply: tuple[str, Any] = conn.recv()
                return reply
            except (EOFError, OSError):
                return "dead", None
        return "dead", None

    async def keep_alive(self, index: int, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run worker ``index`` until the supervisor stops; restart it when it dies."""
        startup = logging.getLogger("derpd.startup")
        deaths: deque[float] = deque()
        first = True
        while True:
            proc, conn = self._spawn(index)
            started_at = trio.current_time()
            try:
                kind, info = await self._wait_ready(proc, conn)
            finally:
                conn.close()
            if kind == "ready":
                self.ready_info[index] = info
                if first:
                    task_status.started()
                    first = False
                else:
                    startup.info("worker %d is back (pid %d)", index, proc.pid)
            elif first and self.stopping:  # stopped while starting
                task_status.started()
                await self.reap(proc)
                return
            elif first:
                await self.reap(proc)
                why = info if kind == "error" else f"worker {index} {_exit_status(proc.exitcode)} while starting"
                raise WorkersFailed(why, 2)
            await trio.lowlevel.wait_readable(proc.sentinel)
            await self.reap(proc)
            if self.stopping:
                return
            now = trio.current_time()
            deaths.append(now)
            while deaths and now - deaths[0] > GIVE_UP_WINDOW:
                deaths.popleft()
            status = _exit_status(proc.exitcode) if kind != "error" else f"could not start: {info}"
            if len(deaths) >= GIVE_UP_AFTER:
                raise WorkersFailed(f"worker {index} died {len(deaths)} times within {GIVE_UP_WINDOW:.0f} s "
                                    f"(last: {status}); stopping", 1)
            delay = min(BACKOFF_MAX, BACKOFF_START * 2 ** (len(deaths) - 1))
            log.warning("worker %d (pid %d) %s after %.0f s; restarting it in %.1f s", index, proc.pid, status,
                        now - started_at, delay)
            self.restarts[index] += 1
            with trio.move_on_after(delay):
                await self._stop.wait()
            if self.stopping:
                return

    async def reap(self, proc: Any) -> None:
        await trio.to_thread.run_sync(proc.join, 5.0)

    def signal_all(self, signum: int) -> None:
        for proc in self.procs.values():
            if proc.pid is not None and proc.exitcode is None:
                try:
                    os.kill(proc.pid, signum)
                except ProcessLookupError:
                    pass

    def stop_all(self) -> None:
        """The stop after a failure (start-up failed, or giving up): SIGTERM to every worker."""
        self.stopping = True
        self.signal_all(signal.SIGTERM)

    async def metrics_text(self) -> bytes:
        from prometheus_client import REGISTRY, generate_latest

        from .metrics import ProcessMetrics

        texts = []
        for port in self.mesh_ports:
            text = await _scrape(port)
            if text is not None:
                texts.append(text)
        texts.append(generate_latest(ProcessMetrics(REGISTRY, "parent")).decode())  # type: ignore[arg-type]
        return aggregate_metrics(texts)


def run_workers(settings: NodeSettings) -> int:
    """Start ``settings.workers`` workers, keep them alive until a signal stops them.  Returns
    the exit code.  Each worker prepares its own parts (``derpd.node.prepare``) from ``settings``.

    Raises:
        SettingsError: the certificate is unusable.
        BindError: the relay port cannot be bound.
        WorkersFailed: a worker could not start (code 2) or kept dying (code 1).
    """
    host, port = settings.relay.listen
    server = RelayServer(settings.relay)  # this process's copy: the certificate (made here, once) and its pin
    server.load_tls()
    try:
        first = _bind(host, port, reuse_port=True)
    except OSError as e:
        raise BindError(e, host, port, "relay") from e
    mesh_socks = [_bind("127.0.0.1", 0, reuse_port=False) for _ in range(settings.workers)]
    supervisor = Supervisor(settings, first, mesh_socks)
    try:
        code: int = run_trio(_parent, supervisor, server)
        return code
    except BaseExceptionGroup as group:  # several workers failed at once: report the first
        failed = group.subgroup(lambda e: isinstance(e, WorkersFailed))
        while isinstance(failed, BaseExceptionGroup):
            failed = failed.exceptions[0]
        if failed is None:
            raise
        raise failed from None
    finally:
        for s in mesh_socks:
            s.close()


async def _parent(sup: Supervisor, server: RelayServer) -> int:
    """The node around the workers (``start_node``, with the workers as its relay) until a
    signal stops them."""
    settings = sup.settings
    with open_signals() as signals:
        try:
            async with trio.open_nursery() as nursery:
                started: list[RunningNode] = []  # the node, with its registration, once every worker serves
                nursery.start_soon(_forward_signals, sup, server, signals, started)
                cache = {"text": b""}

                async def refresh() -> None:
                    while True:
                        cache["text"] = await sup.metrics_text()
                        await trio.sleep(2)

                if settings.metrics.addr is not None:
                    nursery.start_soon(refresh)
                # No parts: the admission checks run in the workers, and NodeSettings refuses ACME with workers.
                started.append(await start_node(nursery, settings, NodeParts(), metrics=lambda: cache["text"],
                                                relay=partial(_start_workers, sup, server)))
        except BaseException:
            sup.stop_all()
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                for proc in sup.procs.values():
                    await sup.reap(proc)
            raise
    return 0


async def _start_workers(sup: Supervisor, server: RelayServer, nursery: trio.Nursery) -> tuple[RunningRelay, str]:
    """The parent's relay (``derpd.node.RelayStarter``): every worker, started at once.  Returns
    once all serve, with the parent's view of the relay (its certificate copy, worker 0's URL).
    When a signal stops them while they start, never returns: the nursery ends once they are gone."""

    async def all_workers(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        waiting = [sup.count]
        all_ready = trio.Event()

        async with trio.open_nursery() as keepers:

            async def start_one(i: int) -> None:
                await keepers.start(sup.keep_alive, i)
                waiting[0] -= 1
                if not waiting[0]:
                    all_ready.set()

            for i in range(sup.count):
                keepers.start_soon(start_one, i)
            await all_ready.wait()
            task_status.started()
        nursery.cancel_scope.cancel()  # every worker is gone: stopped by a signal

    await nursery.start(all_workers)
    if sup.stopping:
        await trio.sleep_forever()
    info = sup.ready_info[0]
    running = RunningRelay(server=server, url=info["url"], host=sup.host, port=sup.port,
                           public_key=server.public_key, cert_pin=server.cert.pin if server.cert else None,
                           http_port=info["http_port"], addresses=[(sup.host or "::", sup.port)])
    pids = " ".join(str(sup.procs[i].pid) for i in range(sup.count))
    return running, f"{sup.count} workers on port {sup.port} (pids {pids})"


async def _forward_signals(sup: Supervisor, server: RelayServer, signals: Any, started: list[RunningNode]) -> None:
    """SIGHUP: reload this process's certificate (for the pin it registers) and the workers';
    SIGTERM/SIGINT: stop restarting and pass the signal on (a second one stops them at once);
    SIGUSR1/SIGUSR2: pass it on.  A drain (SIGUSR1, or SIGTERM with --drain-grace) is announced
    to the coordinators from here, where the registration runs; the workers wait for their clients."""
    from .drain import announce_drain

    startup = logging.getLogger("derpd.startup")
    settings = sup.settings.relay
    async with trio.open_nursery() as nursery:
        async for signum in signals:
            if signum == signal.SIGHUP:
                startup.info("received SIGHUP, reloading")
                server.reload_tls()
            elif signum in (signal.SIGUSR1, signal.SIGUSR2):
                if started and not sup.stopping:
                    nursery.start_soon(announce_drain, started[0].announcer, signum == signal.SIGUSR1)
            elif not sup.stopping:
                draining = settings.drain_grace > 0 and sup.settings.announce is not None
                startup.info("received %s: %stelling clients to reconnect, draining queues for up to %.1fs "
                             "(send it again to stop at once)", signal.Signals(signum).name,
                             f"draining for up to {settings.drain_grace:.1f}s (--drain-grace), then " if draining else "",
                             settings.shutdown_grace)
                sup.request_stop()
                if draining and started:
                    nursery.start_soon(announce_drain, started[0].announcer, True)
            sup.signal_all(signum)


__all__ = ["Supervisor", "WorkersFailed", "aggregate_metrics", "available_cpus", "run_workers"]
