"""A relay in its own process (``python -m derpd serve``), so attacks measure *its* RSS and
descriptors from /proc, and helpers shared by the attack suite and the soak."""

from __future__ import annotations

import os
import re
import resource
import ssl
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field

import trio

_READY = re.compile(r"relay (\S+/derp) on ")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([-+0-9.eEnaINF]+)$")


def raise_open_files_limit(want: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``want`` (children inherit it).
    Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return soft


@dataclass
class Usage:
    rss_kib: int
    fds: int

    def __str__(self) -> str:
        return f"RSS {self.rss_kib / 1024:.1f} MiB, {self.fds} fds"


@dataclass
class RelayProcess:
    proc: trio.Process
    derp_url: str
    port: int
    log: deque[str] = field(default_factory=lambda: deque(maxlen=200))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def usage(self) -> Usage:
        with open(f"/proc/{self.pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return Usage(rss, len(os.listdir(f"/proc/{self.pid}/fd")))

    async def metrics(self) -> dict[str, float]:
        """The relay's /metrics (the relay port answers loopback clients), as name{labels} -> value."""
        stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        if self.derp_url.startswith("https:"):  # our own test relay's self-signed certificate
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            stream = trio.SSLStream(stream, ctx, server_hostname="127.0.0.1")
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = bytearray()
            try:
                while chunk := await stream.receive_some(65536):
                    data += chunk
            except trio.BrokenResourceError:  # TLS peers may close without close_notify
                pass
        body = bytes(data).split(b"\r\n\r\n", 1)[1].decode()
        out = {}
        for line in body.splitlines():
            m = _SAMPLE.match(line)
            if m:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
        return out

    async def wait_fds_at_most(self, limit: int, timeout: float = 20.0) -> int:
        """Poll /proc until the relay holds at most ``limit`` descriptors; returns the count."""
        with trio.fail_after(timeout):
            while (n := self.usage().fds) > limit:
                await trio.sleep(0.05)
        return n


async def start_relay_process(nursery: trio.Nursery, *args: str) -> RelayProcess:
    """Start ``derpd serve --dev`` on 127.0.0.1 port 0 (plus ``args``); returns once it listens.
    The process is killed when the nursery is cancelled."""
    cmd = [sys.executable, "-m", "derpd", "serve", "--dev", "-a", "127.0.0.1:0", "--stun-port", "-1", *args]
    proc = await trio.lowlevel.open_process(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    log: deque[str] = deque(maxlen=200)
    ready: trio.MemorySendChannel[str]
    ready, ready_rx = trio.open_memory_channel[str](1)

    async def pump() -> None:
        buf = b""
        try:
            while chunk := await proc.stderr.receive_some(65536):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    line = raw.decode(errors="replace")
                    log.append(line)
                    m = _READY.search(line)
                    if m:
                        ready.send_nowait(m.group(1))
        finally:
            ready.close()

    async def reap() -> None:
        try:
            await trio.sleep_forever()
        finally:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()

    nursery.start_soon(pump)
    nursery.start_soon(reap)
    with trio.fail_after(30):
        try:
            url = await ready_rx.receive()
        except trio.EndOfChannel:
            raise RuntimeError("the relay exited before listening:\n" + "\n".join(log)) from None
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    return RelayProcess(proc, url, port, log)


def start_relay_popen(*args: str) -> RelayProcess:
    """Like ``start_relay_process`` but synchronous, for a module-scoped fixture that outlives
    one test's trio run.  Stop it with ``stop_relay_popen``."""
    import threading

    cmd = [sys.executable, "-m", "derpd", "serve", "--dev", "-a", "127.0.0.1:0", "--stun-port", "-1", *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    log: deque[str] = deque(maxlen=200)
    url = None
    assert proc.stderr is not None
    for line in proc.stderr:
        log.append(line.rstrip())
        m = _READY.search(line)
        if m:
            url = m.group(1)
            break
    if url is None:
        raise RuntimeError("the relay exited before listening:\n" + "\n".join(log))
    stream = proc.stderr
    threading.Thread(target=lambda: [log.append(x.rstrip()) for x in stream], daemon=True).start()
    return RelayProcess(proc, url, int(url.rsplit(":", 1)[1].split("/")[0]), log)  # type: ignore[arg-type]


def stop_relay_popen(relay: RelayProcess) -> None:
    relay.proc.kill()
    relay.proc.wait(10)
