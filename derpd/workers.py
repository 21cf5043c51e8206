"""``derpd serve --workers N``: N relay processes on one port, meshed over loopback.

The parent binds the relay port N times with SO_REUSEPORT (the kernel spreads new
connections across the sockets) plus one private loopback port per worker, then forks.
Every worker is a complete relay with the same key, and holds a mesh link (a generated mesh
key) to every other worker's private port, so a client on worker 1 reaches a client on
worker 2 through one ForwardPacket hop.  STUN runs in worker 0.

The parent forwards SIGTERM/SIGINT/SIGHUP to the workers and, with ``--metrics-addr``, serves
the sum of every worker's metrics.

Dependencies: ``derpd.cli`` imports this module; it builds each worker from ``derpd.serve``
(options, signals, logging) and ``derpd.relay``, and never imports ``derpd.cli``.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
from collections import defaultdict
from functools import partial
from typing import Any

import trio

from .keys import NodePrivate
from .relay.listener import serve_metrics, serve_relay
from .serve import ServeOptions, handle_signals, setup_logging
from .settings import SettingsError

log = logging.getLogger("derpd.workers")


def _bind(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    if host in ("", "::"):
        family, addr = socket.AF_INET6, ("::", port)
    else:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        family, addr = info[0], info[4][:2]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6 and host in ("", "::"):
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(addr)
    sock.listen(socket.SOMAXCONN)
    return sock


def aggregate_metrics(texts: list[str]) -> bytes:
    """Sum Prometheus text from several processes, sample by sample, and expose the sum with
    prometheus-client's own writer (so counter TYPE lines keep their ``_total`` names)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.samples import Sample

    families: dict[str, Any] = {}
    sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = defaultdict(dict)
    for text in texts:
        for fam in text_string_to_metric_families(text):
            families.setdefault(fam.name, fam)
            for sample in fam.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                sums[fam.name][key] = sums[fam.name].get(key, 0.0) + sample.value
    for name, fam in families.items():
        fam.samples = [Sample(sname, dict(labels), value) for (sname, labels), value in sums[name].items()]

    class _Summed:
        def collect(self) -> Any:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Summed())  # type: ignore[arg-type]
    return generate_latest(registry)


def _worker_main(index: int, options: ServeOptions, main_sock: socket.socket, mesh_sock: socket.socket,
                 peer_ports: list[int], mesh_key: bytes) -> None:
    setup_logging(options.verbose)
    try:
        trio.run(_worker, index, options, main_sock, mesh_sock, peer_ports, mesh_key)
    except KeyboardInterrupt:
        pass


async def _worker(index: int, options: ServeOptions, main_sock: socket.socket, mesh_sock: socket.socket,
                  peer_ports: list[int], mesh_key: bytes) -> None:
    from .mesh import MeshTarget, run_mesh

    settings = dataclasses.replace(options.settings, mesh_key=options.settings.mesh_key or mesh_key)
    async with trio.open_nursery() as nursery:

        async def relay_then_stop(task_status: trio.TaskStatus) -> None:
            await serve_relay(settings, sockets=[main_sock], internal_sockets=[mesh_sock], task_status=task_status)
            nursery.cancel_scope.cancel()

        running = await nursery.start(relay_then_stop)
        if options.protection is not None:
            options.protection.install(running.server, nursery)
        await nursery.start(partial(
            run_mesh, running.server, [MeshTarget(f"127.0.0.1:{p}") for p in peer_ports], settings.mesh_key,
            client_key=NodePrivate.generate(), skip_self_check=True, scheme="http"))
        if index == 0 and options.stun_port >= 0:
            from stund.server import serve_stun

            await nursery.start(serve_stun, [(settings.listen[0] or "::", options.stun_port)])
        await handle_signals(running, settings, nursery.cancel_scope)


def run_workers(options: ServeOptions, count: int) -> int:
    """Start ``count`` workers and wait for them.  Returns the exit code.

    Raises:
        SettingsError: the options do not combine with workers.
        OSError: the port cannot be bound.
    """
    if options.mesh_with:
        raise SettingsError("--workers cannot be combined with --mesh-with yet: run one process per mesh node")
    settings = options.settings
    host, port = settings.listen
    first = _bind(host, port, reuse_port=True)
    port = first.getsockname()[1]
    main_socks = [first] + [_bind(host, port, reuse_port=True) for _ in range(count - 1)]
    mesh_socks = [_bind("127.0.0.1", 0, reuse_port=False) for _ in range(count)]
    mesh_ports = [s.getsockname()[1] for s in mesh_socks]
    mesh_key = os.urandom(32)
    ctx = multiprocessing.get_context("fork")
    procs = []
    for i in range(count):
        others = [p for j, p in enumerate(mesh_ports) if j != i]
        proc = ctx.Process(target=_worker_main, args=(i, options, main_socks[i], mesh_socks[i], others, mesh_key),
                           name=f"derpd-worker-{i}", daemon=False)
        proc.start()
        procs.append(proc)
    for s in main_socks + mesh_socks:
        s.close()
    logging.getLogger("derpd.startup").info("derpd: %d workers on port %d (pids %s)", count, port,
                                            " ".join(str(p.pid) for p in procs))
    return trio.run(_parent, procs, mesh_ports, options.metrics_addr)


async def _parent(procs: list[multiprocessing.Process], mesh_ports: list[int], metrics_addr: str | None) -> int:
    async def scrape_all() -> bytes:
        texts: list[str] = []
        for p in mesh_ports:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", p)
                async with stream:
                    await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    data = bytearray()
                    while chunk := await stream.receive_some(65536):
                        data += chunk
                texts.append(bytes(data).split(b"\r\n\r\n", 1)[1].decode())
            except (OSError, trio.BrokenResourceError, IndexError):
                continue
        return aggregate_metrics(texts)

    async with trio.open_nursery() as nursery:
        if metrics_addr is not None:
            cache = {"text": b""}

            async def refresh() -> None:
                while True:
                    cache["text"] = await scrape_all()
                    await trio.sleep(2)

            nursery.start_soon(refresh)
            await nursery.start(serve_metrics, metrics_addr, lambda: cache["text"])

        async def forward_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for signum in signals:
                    for p in procs:
                        if p.pid is not None and p.is_alive():
                            os.kill(p.pid, signum)

        nursery.start_soon(forward_signals)
        codes = []
        for p in procs:
            await trio.to_thread.run_sync(p.join, abandon_on_cancel=True)
            codes.append(p.exitcode or 0)
        nursery.cancel_scope.cancel()
    return max(codes, default=0)


__all__ = ["aggregate_metrics", "run_workers"]
