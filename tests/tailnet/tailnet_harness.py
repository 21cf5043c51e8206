"""A real tailnet on one machine: headscale, two tailscaled and derpd, in a private network
namespace, used by the tailnet suite (conftest.py) and by bench/tailnet.py.

Everything that talks on the network runs inside one namespace made with ``unshare -n``
(``lo`` and a dead-end veth pair, see NAMESPACE_SETUP), so nothing can leave the machine:
no log uploads, no port mapping probes, no DNS.  The namespace is held by a ``sleep``
process; every other program enters it with ``nsenter --net=/proc/<holder>/ns/net``.  Because the namespace is new, its
ports are all free, so the programs get fixed ports (``PORTS``) and there is no race.

This module is synchronous (subprocess + one reader thread per process): every wait has a
timeout, reads the programs' own output for readiness, and every process is stopped by its
PID when the ``Tailnet`` closes.

The Go programs are built from the module proxy, cached by version like the interop build:
``tailscale.com/cmd/tailscaled`` and ``cmd/tailscale`` at the version tests/interop pins,
``github.com/juanfont/headscale/cmd/headscale`` at ``HEADSCALE_VERSION``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from tests.interop.interop_harness import TAILSCALE_VERSION, CertAuthority, cache_root, clean_env, find_go

HERE = Path(__file__).resolve().parent
HEADSCALE_VERSION = "v0.29.3"  # newest v0.29.x on the module proxy; see README.md to upgrade
# (module, version, commands built from it); each is built inside its own downloaded module
# directory, with that module's go.mod and go.sum.
MODULES = (
    ("tailscale.com", TAILSCALE_VERSION, ("./cmd/tailscaled", "./cmd/tailscale")),
    ("github.com/juanfont/headscale", HEADSCALE_VERSION, ("./cmd/headscale",)),
)
BUILD_TIMEOUT = 2700.0  # per go command; a cold build of both took 35 min niced on 2 busy cores

BLOB_SIZE = 50 * 1000 * 1000  # the 50 MB every transfer moves
REGION_ID = 900
REGION_CODE = "derpd"
PORTS = {"relay": 8443, "stun": 3478, "coordinator": 8080, "headscale": 8081,
         "headscale_metrics": 9091, "headscale_grpc": 50443, "blob": 9000}


CLOSE_GRACE = 5.0  # seconds a closing tailnet gives its processes to exit after SIGTERM, then SIGKILL


class TailnetError(Exception):
    """A step of the tailnet failed; the message says which and carries the log tails."""


# ---------------------------------------------------------------------------
# Building


@dataclass(frozen=True)
class TailnetTools:
    bindir: Path

    @property
    def tailscaled(self) -> str:
        return str(self.bindir / "tailscaled")

    @property
    def tailscale(self) -> str:
        return str(self.bindir / "tailscale")

    @property
    def headscale(self) -> str:
        return str(self.bindir / "headscale")


def build_tailnet_tools(missing: Callable[[str], NoReturn], fail: Callable[[str], NoReturn]) -> TailnetTools:
    """The cached binaries, built first if the versions or the Go toolchain changed.

    ``missing(message)``: Go or a namespace tool is not installed; ``fail(message)``: the
    build failed.  Neither is expected to return.
    """
    for tool, package in (("unshare", "util-linux"), ("nsenter", "util-linux"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            missing(f"`{tool}` is not installed: the tailnet suite runs everything in a private network "
                    f"namespace; install {package} (apt-get install {package})")
    go = find_go()
    if go is None:
        missing(f"Go is not installed: the tailnet suite builds tailscaled {TAILSCALE_VERSION} and headscale "
                f"{HEADSCALE_VERSION}; install Go from https://go.dev/dl/ (.ci/setup.d/50-go-tailnet.sh "
                f"then builds them)")
    goenv = subprocess.run([go, "env", "GOVERSION", "GOOS", "GOARCH"], capture_output=True, text=True,
                           timeout=60, check=True).stdout
    key = hashlib.sha256((goenv + repr(MODULES)).encode()).hexdigest()[:20]
    root = cache_root("derpd-tailnet", "DERPD_TAILNET_CACHE")
    bindir = root / key
    tools = TailnetTools(bindir)
    if all(Path(p).exists() for p in (tools.tailscaled, tools.tailscale, tools.headscale)):
        return tools
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    env = dict(os.environ)  # keeps proxy settings: a cold build needs the module proxy
    # Each module builds with its own go.mod and go.sum, never editing them.
    env["GOFLAGS"] = " ".join([*(f for f in env.get("GOFLAGS", "").split() if not f.startswith("-mod=")),
                               "-mod=readonly"])

    def go_run(args: list[str], cwd: Path) -> str:
        shown = f"(cd {cwd} && go {' '.join(args)})"
        try:
            proc = subprocess.run([go, *args], env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
                                  cwd=str(cwd))
        except subprocess.TimeoutExpired:
            shutil.rmtree(tmp, ignore_errors=True)
            fail(f"`{shown}` took over {BUILD_TIMEOUT:.0f}s; run it by hand to see why")
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            fail(f"`{shown}` failed (a cold cache needs the Go module proxy):\n{proc.stderr[-4000:]}")
        return proc.stdout

    for module, version, commands in MODULES:
        # `go install pkg@version` would also ask the proxy for the version list (deprecation
        # notices), which the proxy refuses for headscale; downloading one version does not.
        info = json.loads(go_run(["mod", "download", "-json", f"{module}@{version}"], tmp))
        go_run(["build", "-o", str(tmp) + os.sep, *commands], Path(info["Dir"]))
    try:
        tmp.rename(bindir)
    except OSError:  # a concurrent run finished first; its binaries are equivalent
        shutil.rmtree(tmp, ignore_errors=True)
    for stale in root.iterdir():
        if stale.name != key and ".tmp-" not in stale.name:
            shutil.rmtree(stale, ignore_errors=True)
    return tools


# ---------------------------------------------------------------------------
# Processes


class Proc:
    """A started program; its stdout and stderr go to ``log_path`` and are kept in memory
    (bounded) so that ``wait_for`` can wait for a line without polling."""

    MAX_LINES = 20000

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str],
                 stdin: int | None = subprocess.DEVNULL) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.lines: list[str] = []
        self.dropped = 0
        self.cond = threading.Condition()
        self.closed = False
        self.terminated = False
        self.popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=stdin,
                                      env=env)
        self.reader = threading.Thread(target=self._read, name=f"log-{name}", daemon=True)
        self.reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stdout is not None
        with self.log_path.open("ab") as log:
            for raw in self.popen.stdout:
                log.write(raw)
                log.flush()
                with self.cond:
                    self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                    if len(self.lines) > self.MAX_LINES:
                        del self.lines[: self.MAX_LINES // 2]
                        self.dropped += self.MAX_LINES // 2
                    self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def mark(self) -> int:
        """A position in the output; ``wait_for(..., since=mark)`` looks only after it."""
        with self.cond:
            return self.dropped + len(self.lines)

    def wait_for(self, pattern: str, timeout: float, since: int = 0) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = since
        with self.cond:
            while True:
                for line in self.lines[max(0, seen - self.dropped):]:
                    if m := regex.search(line):
                        return m
                seen = self.dropped + len(self.lines)
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    why = (f"exited with {self.popen.wait(5)}" if self.closed
                           else f"did not log /{pattern}/ within {timeout:.0f}s")
                    raise TailnetError(f"{self.name} {why}\n{self.tail()}")
                self.cond.wait(left)

    def tail(self, n: int = 40) -> str:
        with self.cond:
            lines = self.lines[-n:]
        return f"--- {self.name} ({self.log_path}), last lines:\n" + "\n".join(lines)

    def terminate(self) -> None:
        """SIGTERM, once, if it still runs (``stop`` then waits for it)."""
        if self.popen.poll() is None and not self.terminated:
            self.popen.send_signal(signal.SIGTERM)
            self.terminated = True

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self.popen.poll() is None:
            self.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        code = self.popen.wait(10)
        self.reader.join(5)
        return code


# tailscaled treats a machine whose only interface is lo as offline (netmon: no usable IPv4
# or IPv6) and never contacts control.  So the namespace also gets a veth pair, both ends
# inside it (a bridge without ports where veth is missing), with a private address and the
# default route: tailscaled sees a network, and whatever it sends off-loopback ends in the
# namespace.
NAMESPACE_SETUP = """
ip link set lo up &&
{ { ip link add tn0 type veth peer name tn1 && ip link set tn1 up; } 2>/dev/null || ip link add tn0 type bridge; } &&
ip addr add 10.255.255.1/24 dev tn0 && ip link set tn0 up && ip route add default dev tn0 &&
echo ready && exec sleep 86400
"""


class Netns:
    """A private network namespace: ``lo`` plus a dead-end interface (NAMESPACE_SETUP).
    Root uses ``unshare -n``; other users get a user namespace too (``unshare -r -n``)
    where unprivileged namespaces are allowed."""

    def __init__(self) -> None:
        self.user_ns = os.geteuid() != 0
        argv = ["unshare", *(["-r"] if self.user_ns else []), "-n", "--", "sh", "-c", NAMESPACE_SETUP]
        self.holder = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self.holder.stdout is not None
        ready, _, _ = select.select([self.holder.stdout], [], [], 20)
        line = self.holder.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self.holder.kill()
            err = self.holder.communicate(timeout=10)[1].decode(errors="replace").strip()
            raise NamespaceError(
                f"cannot make a private network namespace with `{' '.join(argv[:4])}` ({err or 'no output'}): "
                f"run as root (CI does), or allow unprivileged user namespaces, and install util-linux and iproute2")

    def wrap(self, argv: Iterable[str]) -> list[str]:
        ns = [f"--user=/proc/{self.holder.pid}/ns/user", "--preserve-credentials"] if self.user_ns else []
        return ["nsenter", *ns, f"--net=/proc/{self.holder.pid}/ns/net", "--", *argv]

    def run(self, argv: list[str], timeout: float, env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        try:
            proc = subprocess.run(self.wrap(argv), capture_output=True, text=True, timeout=timeout,
                                  env=env or clean_env(), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise TailnetError(f"`{' '.join(argv)}` took over {timeout:.0f}s") from exc
        if check and proc.returncode != 0:
            raise TailnetError(f"`{' '.join(argv)}` exited {proc.returncode}:\n{proc.stdout[-2000:]}"
                               f"{proc.stderr[-3000:]}")
        return proc

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait(10)


class NamespaceError(TailnetError):
    pass


_FETCH = """
import ssl, sys, urllib.request, urllib.error
ctx = ssl.create_default_context(cafile=sys.argv[2]) if sys.argv[2] else None
req = urllib.request.Request(sys.argv[1], headers={"Accept": sys.argv[4]})
try:
    body = urllib.request.urlopen(req, timeout=float(sys.argv[3]), context=ctx).read()
except urllib.error.HTTPError as e:
    body = e.read(); print(e.code, file=sys.stderr); sys.stdout.buffer.write(body); sys.exit(3)
sys.stdout.buffer.write(body)
"""


# ---------------------------------------------------------------------------
# The tailnet


@dataclass
class PingResult:
    via: str  # "DERP(derpd)", or an ip:port for a direct path
    ms: float  # the round trip tailscaled measured
    line: str
    waited: float  # seconds from starting `tailscale ping` to this pong


@dataclass
class Transfer:
    nbytes: int
    sha256: str
    seconds: float
    max_stall: float = 0.0  # the longest wait between two reads after the first byte
    stall_end: float = 0.0  # when it ended (time.monotonic())
    stalls: list[tuple[float, float]] = field(default_factory=list)  # (ended at, seconds), for waits over 0.5 s

    def longest_stall(self, start: float, end: float) -> float:
        """The longest wait between two reads that overlaps [start, end] (time.monotonic())."""
        return max((gap for at, gap in self.stalls if at >= start and at - gap <= end), default=0.0)

    def __repr__(self) -> str:
        return (f"Transfer({self.nbytes} bytes, sha256 {self.sha256[:12]}..., {self.seconds:.2f} s, "
                f"longest stall {self.max_stall:.2f} s)")

    @property
    def mbit_s(self) -> float:
        return self.nbytes * 8 / self.seconds / 1e6


@dataclass
class Node:
    """One tailscaled, in userspace-networking mode, with its own statedir, socket and port."""

    net: Tailnet
    name: str
    socket: Path
    proc: Proc

    def cli(self, *args: str, timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.net.ns.run([self.net.tools.tailscale, f"--socket={self.socket}", *args], timeout=timeout,
                               env=self.net.node_env(), check=check)

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli("status", "--json").stdout)

    def ip(self) -> str:
        return next(a for a in self.status()["Self"]["TailscaleIPs"] if ":" not in a)

    def ping(self, peer_ip: str, count: int = 10, timeout: float = 60.0) -> PingResult:
        """``tailscale ping`` (disco ping, up to ``count`` tries of at most 5 s each); returns
        at the first pong and stops the CLI (it would go on pinging ``count`` times, once a
        second, hoping for a direct path that TS_DEBUG_ALWAYS_USE_DERP rules out)."""
        argv = self.net.ns.wrap([self.net.tools.tailscale, f"--socket={self.socket}", "ping", f"--c={count}",
                                 "--timeout=5s", peer_ip])
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=self.net.node_env(), text=True)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        start = time.monotonic()
        seen: list[str] = []
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                seen.append(line.rstrip())
                if m := re.search(r"pong from .* via (\S+) in ([\d.]+)(ms|s|µs)", line):
                    scale = {"ms": 1.0, "s": 1000.0, "µs": 0.001}[m.group(3)]
                    return PingResult(m.group(1), float(m.group(2)) * scale, m.group(0),
                                      time.monotonic() - start)
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        raise TailnetError(f"{self.name}: `tailscale ping {peer_ip}` got no pong in {time.monotonic() - start:.1f}s:\n"
                           + "\n".join(seen[-10:]) + f"\n{self.proc.tail(20)}")

    def fetch(self, peer_ip: str, port: int, timeout: float, progress: threading.Event | None = None,
              progress_at: int = 0) -> Transfer:
        """Reads everything a service on the peer's ``port`` sends, through ``tailscale nc``
        (tailscaled dials it over the tailnet); stdin stays open until the peer closes.
        ``progress`` is set once ``progress_at`` bytes have arrived."""
        argv = self.net.ns.wrap([self.net.tools.tailscale, f"--socket={self.socket}", "nc", peer_ip, str(port)])
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=self.net.node_env())
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        h = hashlib.sha256()
        n = 0
        start = time.monotonic()
        last = stall = stall_end = 0.0
        stalls: list[tuple[float, float]] = []
        try:
            assert proc.stdout is not None
            while chunk := proc.stdout.read1(1 << 20):
                now = time.monotonic()
                if n and now - last > stall:
                    stall, stall_end = now - last, now
                if n and now - last > 0.5:
                    stalls.append((now, now - last))
                last = now
                h.update(chunk)
                n += len(chunk)
                if progress is not None and n >= progress_at:
                    progress.set()
            seconds = time.monotonic() - start
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(10)
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if proc.returncode not in (0, None) and n == 0:
            raise TailnetError(f"{self.name}: `tailscale nc {peer_ip} {port}` exited {proc.returncode}: {err[-1500:]}")
        return Transfer(n, h.hexdigest(), seconds, stall, stall_end, stalls)

    def localapi(self, method: str, path: str, timeout: float) -> tuple[int, bytes]:
        """One LocalAPI request over tailscaled's unix socket (a file, reachable from outside
        the namespace); returns (status, body)."""
        import http.client
        import socket as socket_mod

        conn = http.client.HTTPConnection("local-tailscaled.sock", timeout=timeout)
        sock = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.socket))
            conn.sock = sock
            conn.request(method, path, headers={"Host": "local-tailscaled.sock"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def disco_ping(self, peer_ip: str, timeout: float) -> dict[str, Any] | None:
        """One disco ping through the LocalAPI (what `tailscale ping` sends, without its
        one-second pause); the PingResult, or None when no pong came within ``timeout``."""
        try:
            status, body = self.localapi("POST", f"/localapi/v0/ping?ip={peer_ip}&type=disco", timeout + 1)
        except OSError:
            return None
        if status != 200:
            return None
        doc = json.loads(body)
        return None if doc.get("Err") else doc


@dataclass
class PingLog:
    """Disco pings from one node to a peer every ``interval`` seconds in a thread, each
    allowed ``timeout``; ``results`` holds (sent at, round trip or None if lost, DERP region)."""

    node: Node
    peer_ip: str
    interval: float = 0.2
    timeout: float = 3.0
    results: list[tuple[float, float | None, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> PingLog:
        self._thread = threading.Thread(target=self._run, name=f"ping-{self.node.name}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            sent = time.monotonic()
            doc = self.node.disco_ping(self.peer_ip, self.timeout)
            rtt = time.monotonic() - sent if doc is not None else None
            self.results.append((sent, rtt, int(doc.get("DERPRegionID") or 0) if doc else 0))
            next_at = max(next_at + self.interval, time.monotonic())
            self._stop.wait(next_at - time.monotonic())

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 10)

    def lost(self) -> int:
        return sum(1 for _, rtt, _ in self.results if rtt is None)

    def slowest(self) -> float:
        return max((rtt for _, rtt, _ in self.results if rtt is not None), default=0.0)

    def longest_gap(self) -> float:
        """The longest time without a pong between two answered pings (sent-at to sent-at)."""
        ok = [t for t, rtt, _ in self.results if rtt is not None]
        return max((b - a for a, b in zip(ok, ok[1:])), default=0.0)

    def window(self, start: float, end: float) -> PingLog:
        """The pings sent in [start, end] (time.monotonic()), as a log of their own."""
        return PingLog(self.node, self.peer_ip, self.interval, self.timeout,
                       [r for r in self.results if start <= r[0] <= end])

    def lost_at(self, origin: float) -> list[float]:
        """When the lost pings were sent, in seconds after ``origin`` (time.monotonic())."""
        return [round(t - origin, 1) for t, rtt, _ in self.results if rtt is None]

    def summary(self) -> str:
        return (f"{len(self.results)} pings every {self.interval * 1000:.0f} ms, {self.lost()} lost, slowest "
                f"{self.slowest() * 1000:.0f} ms, longest gap between pongs {self.longest_gap():.2f} s")


@dataclass
class Tailnet:
    """Owns the namespace and everything started in it; ``close()`` stops them all by PID."""

    tools: TailnetTools
    ca: CertAuthority
    workdir: Path
    derpd: list[str] = field(default_factory=lambda: [sys.executable, "-m", "derpd"])
    ns: Netns = field(init=False)
    procs: list[Proc] = field(default_factory=list)
    headscale_config: Path | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ns = Netns()

    def __enter__(self) -> Tailnet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stops everything at once: SIGTERM to every process, SIGKILL to those still running
        after CLOSE_GRACE.  (One after the other, a relay started with ``--drain-grace`` would
        wait for the clients that the later stops had not yet taken away.)"""
        for proc in self.procs:
            proc.terminate()
        deadline = time.monotonic() + CLOSE_GRACE
        for proc in reversed(self.procs):
            proc.stop(timeout=max(0.0, deadline - time.monotonic()))
        self.procs.clear()
        self.ns.close()

    # -- plumbing -----------------------------------------------------------------

    def node_env(self) -> dict[str, str]:
        env = clean_env()
        env["SSL_CERT_FILE"] = str(self.ca.ca_file)  # the relay's test CA
        env["TS_DEBUG_ALWAYS_USE_DERP"] = "1"  # magicsock binds no UDP: every packet goes through DERP
        env["TS_NO_LOGS_NO_SUPPORT"] = "1"
        env["HOME"] = str(self.workdir)
        return env

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None, **kw: Any) -> Proc:
        log = self.workdir / f"{name}.log"
        proc = Proc(name, self.ns.wrap(argv), log, env or clean_env(), **kw)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> int:
        code = proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)
        return code

    def fetch_url(self, url: str, timeout: float = 15.0, ok: bool = True, accept: str = "*/*") -> str:
        """GET ``url`` from inside the namespace (trusting the test CA); the body."""
        proc = self.ns.run([sys.executable, "-c", _FETCH, url, str(self.ca.ca_file), str(timeout), accept],
                           timeout=timeout + 10, check=ok)
        return proc.stdout

    def tails(self) -> str:
        return "\n".join(p.tail(15) for p in self.procs)

    # -- derpd ----------------------------------------------------------------------

    def relay_argv(self, name: str, port: int = PORTS["relay"], stun_port: int = PORTS["stun"],
                   args: Iterable[str] = ()) -> list[str]:
        return [*self.derpd, "serve", "-v", "-c", str(self.workdir / f"{name}.key"), "-a", f"127.0.0.1:{port}",
                "--certmode", "manual", "--certdir", str(self.ca.certdir), "--hostname", "localhost",
                "--http-port", "-1", "--stun-port", str(stun_port), "--shutdown-grace", "1", *args]

    def start_relay(self, name: str = "relay", port: int = PORTS["relay"], stun_port: int = PORTS["stun"],
                    args: Iterable[str] = (), timeout: float = 30.0) -> Proc:
        """derpd serve (TLS for localhost from the test CA, key file ``<name>.key``, kept
        across restarts); returns once it logs that it listens."""
        proc = self.start(name, self.relay_argv(name, port, stun_port, args))
        proc.wait_for(r"relay \S+ on 127\.0\.0\.1:\d+|\d+ workers on port", timeout)
        return proc

    def metrics(self, port: int = PORTS["relay"], url: str | None = None) -> dict[str, float]:
        """derpd's /metrics (the relay port answers loopback peers), as {'name{labels}': value}."""
        text = self.fetch_url(url or f"https://localhost:{port}/metrics")
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def metrics_when(self, condition: Callable[[dict[str, float]], bool], url: str, timeout: float = 15.0
                     ) -> dict[str, float]:
        """Metrics from ``url`` once ``condition`` holds.  For ``--workers``' summed metrics,
        which the parent re-scrapes from its workers every 2 s: there is no event to wait
        for, so this re-reads every 0.5 s, up to ``timeout``."""
        deadline = time.monotonic() + timeout
        while not condition(m := self.metrics(url=url)):
            if time.monotonic() > deadline:
                raise TailnetError(f"{url}: condition not met within {timeout:.0f}s: {m}")
            time.sleep(0.5)
        return m

    # -- coordinator ----------------------------------------------------------------

    def start_coordinator(self, nodes: list[dict[str, Any]], probe_interval: float = 2.0,
                          settings: dict[str, Any] | None = None, timeout: float = 30.0) -> str:
        """derpd coordinator with one region (REGION_ID) of ``nodes`` (TOML node keys), its
        state in the work directory, ``settings`` added to ``[coordinator]``; returns the
        JSON map URL."""
        extra = [f"{k} = {json.dumps(v)}" for k, v in (settings or {}).items()]
        lines = ["[coordinator]", f'listen = "127.0.0.1:{PORTS["coordinator"]}"',
                 f"probe_interval = {probe_interval}", f"probe_timeout = {max(1.0, probe_interval - 0.5)}",
                 f'ca_file = "{self.ca.ca_file}"', "omit_default_regions = true",
                 "allow_loopback_nodes = true",  # every relay of the test tailnet is on loopback
                 *extra,
                 "[[regions]]", f"id = {REGION_ID}", f'code = "{REGION_CODE}"', 'name = "derpd tailnet test"']
        for node in nodes:
            lines.append("[[regions.nodes]]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in node.items()]
        config = self.workdir / "coordinator.toml"
        config.write_text("\n".join(lines) + "\n")
        proc = self.start("coordinator", [*self.derpd, "coordinator", "-v", "--config", str(config),
                                          "-a", f"127.0.0.1:{PORTS['coordinator']}",
                                          "--state-dir", str(self.workdir / "coordinator-state")])
        proc.wait_for(r"map at (\S+)", timeout)
        return f"http://127.0.0.1:{PORTS['coordinator']}/derpmap/default"

    @staticmethod
    def map_node(name: str, port: int = PORTS["relay"], stun_port: int = PORTS["stun"]) -> dict[str, Any]:
        return {"name": name, "hostname": "localhost", "ipv4": "127.0.0.1", "ipv6": "none",
                "derp_port": port, "stun_port": stun_port}

    def status_view(self) -> dict[str, Any]:
        return json.loads(self.fetch_url(f"http://127.0.0.1:{PORTS['coordinator']}/status.json"))

    # -- headscale ------------------------------------------------------------------

    def start_headscale(self, derp_urls: Iterable[str] = (), derp_paths: Iterable[Path] = (),
                        auto_update: bool = True, timeout: float = 60.0, update_frequency: str = "10s") -> str:
        """headscale on loopback with SQLite, its embedded DERP off, re-reading the DERP map
        every ``update_frequency`` unless ``auto_update`` is false; returns a reusable
        pre-auth key for a fresh user."""
        d = self.workdir / "headscale"
        d.mkdir(exist_ok=True)
        hs = PORTS["headscale"]
        config = {
            "server_url": f"http://127.0.0.1:{hs}",
            "listen_addr": f"127.0.0.1:{hs}",
            "metrics_listen_addr": f"127.0.0.1:{PORTS['headscale_metrics']}",
            "grpc_listen_addr": f"127.0.0.1:{PORTS['headscale_grpc']}",
            "grpc_allow_insecure": False,
            "noise": {"private_key_path": str(d / "noise_private.key")},
            "prefixes": {"v4": "100.64.0.0/10", "v6": "fd7a:115c:a1e0::/48", "allocation": "sequential"},
            "derp": {"server": {"enabled": False}, "urls": list(derp_urls), "paths": [str(p) for p in derp_paths],
                     "auto_update_enabled": auto_update, "update_frequency": update_frequency},
            "disable_check_updates": True,
            "database": {"type": "sqlite", "sqlite": {"path": str(d / "db.sqlite"), "write_ahead_log": True}},
            "log": {"level": "info", "format": "text"},
            "policy": {"mode": "file", "path": ""},
            "dns": {"magic_dns": False, "override_local_dns": False, "base_domain": "tailnet.test",
                    "nameservers": {"global": []}},
            "unix_socket": str(d / "headscale.sock"),
            "unix_socket_permission": "0770",
            "logtail": {"enabled": False},
        }
        self.headscale_config = d / "config.yaml"
        self.headscale_config.write_text(json.dumps(config, indent=2))  # JSON is YAML
        env = clean_env() | {"HOME": str(d)}
        proc = self.start("headscale", [self.tools.headscale, "-c", str(self.headscale_config), "serve"], env=env)
        proc.wait_for(r"listening and serving HTTP on", timeout)
        self.headscale_cli("users", "create", "derpd")
        users = json.loads(self.headscale_cli("users", "list", "-o", "json"))
        uid = next(u["id"] for u in users if u["name"] == "derpd")
        key = json.loads(self.headscale_cli("preauthkeys", "create", "-u", str(uid), "--reusable",
                                            "-e", "1h", "-o", "json"))
        return key["key"]

    def headscale_derp_ports(self) -> dict[int, list[int]]:
        """The DERPPort of each node of each region, in the order headscale sends them to
        the nodes (headscale shuffles the nodes of each region whenever it loads the map)."""
        info = json.loads(self.fetch_url(f"http://127.0.0.1:{PORTS['headscale_metrics']}/debug/derp",
                                         accept="application/json"))
        return {int(rid): [n["derp_port"] for n in r["nodes"]] for rid, r in info["regions"].items()}

    def headscale_cli(self, *args: str) -> str:
        assert self.headscale_config is not None
        env = clean_env() | {"HOME": str(self.workdir / "headscale")}
        return self.ns.run([self.tools.headscale, "-c", str(self.headscale_config), *args], timeout=30,
                           env=env).stdout

    # -- tailscaled -----------------------------------------------------------------

    def start_node(self, name: str, port: int, authkey: str, timeout: float = 90.0) -> Node:
        """tailscaled in userspace-networking mode, joined with ``authkey``; returns once
        ``tailscale up`` says it runs."""
        d = self.workdir / f"node-{name}"
        d.mkdir(exist_ok=True)
        sock = d / "tailscaled.sock"
        proc = self.start(f"tailscaled-{name}", [
            self.tools.tailscaled, "--tun=userspace-networking", f"--statedir={d}", f"--socket={sock}",
            f"--port={port}", "--no-logs-no-support"], env=self.node_env() | {"TS_LOGS_DIR": str(d)})
        proc.wait_for(r"got LocalBackend in", timeout)
        node = Node(self, name, sock, proc)
        node.cli("up", f"--login-server=http://127.0.0.1:{PORTS['headscale']}", f"--authkey={authkey}",
                 f"--hostname={name}", "--accept-dns=false", f"--timeout={timeout:.0f}s", timeout=timeout + 10)
        return node

    def two_nodes(self, relay_args: Iterable[str] = (), use_paths: bool = False,
                  start_relay: Callable[[], Proc] | None = None,
                  coordinator: dict[str, Any] | None = None) -> tuple[Node, Node]:
        """The usual tailnet: one derpd relay (``relay_args`` added; or whatever
        ``start_relay()`` starts on PORTS["relay"]), the coordinator with it as the only node
        of region REGION_ID, headscale reading the coordinator's map (``derp.urls``, or with
        ``use_paths`` a saved copy of its YAML in ``derp.paths``), and nodes ``a`` and ``b``
        joined."""
        if start_relay is None:
            self.start_relay(args=relay_args)
        else:
            start_relay()
        url = self.start_coordinator([self.map_node(f"{REGION_ID}a")], settings=coordinator)
        if use_paths:
            path = self.workdir / "derpmap.yaml"
            path.write_text(self.fetch_url(url + ".yaml"))
            authkey = self.start_headscale(derp_paths=[path])
        else:
            authkey = self.start_headscale(derp_urls=[url])
        return self.start_node("a", 41641, authkey), self.start_node("b", 41642, authkey)

    def pings_via_derp(self, a: Node, b: Node) -> list[PingResult]:
        """``tailscale ping`` a -> b and b -> a; each must answer via DERP(REGION_CODE)."""
        pongs = [a.ping(b.ip()), b.ping(a.ip())]
        for pong in pongs:
            print(pong.line)  # the figures, for `pytest -rP`
            if pong.via != f"DERP({REGION_CODE})":
                raise TailnetError(f"not through our relay: {pong.line}")
        return pongs

    def transfer(self, a: Node, b: Node, blob: tuple[Path, str], timeout: float = 180.0) -> Transfer:
        """``a`` fetches the file ``blob`` = (path, sha256) from ``b``'s side of the tailnet
        (served once per tailnet); size and sha256 must match."""
        path, digest = blob
        if not any(p.name == f"blob-{PORTS['blob']}" for p in self.procs):
            self.serve_file(path)
        t = a.fetch(b.ip(), PORTS["blob"], timeout=timeout)
        if t.nbytes != path.stat().st_size or t.sha256 != digest:
            raise TailnetError(f"{b.name} -> {a.name}: got {t.nbytes} bytes with sha256 {t.sha256}, "
                               f"want {path.stat().st_size} with {digest}")
        return t

    def serve_file(self, path: Path, port: int = PORTS["blob"], timeout: float = 20.0, rate: int = 0) -> Proc:
        """A TCP service on 127.0.0.1:port in the namespace that sends ``path`` to each
        client (at ``rate`` bytes per second; 0: as fast as it goes) and closes.  A
        userspace-networking tailscaled forwards connections to its own tailnet address to
        127.0.0.1, so this is what both nodes serve."""
        proc = self.start(f"blob-{port}", [sys.executable, str(HERE / "blobserve.py"), str(path), str(port),
                                           *([str(rate)] if rate else [])])
        proc.wait_for(r"serving", timeout)
        return proc


def make_blob(path: Path, size: int) -> str:
    """Writes ``size`` random bytes to ``path`` once; returns their sha256."""
    h = hashlib.sha256()
    if not path.exists() or path.stat().st_size != size:
        with path.open("wb") as f:
            left = size
            while left:
                chunk = os.urandom(min(left, 1 << 20))
                f.write(chunk)
                left -= len(chunk)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def main(argv: list[str]) -> int:
    """``python3 -m tests.tailnet.tailnet_harness build``: build (or find) the cached
    binaries and print where they are; what .ci/setup.d/50-go-tailnet.sh runs."""
    if argv != ["build"]:
        print("usage: python3 -m tests.tailnet.tailnet_harness build", file=sys.stderr)
        return 2

    def give_up(message: str) -> NoReturn:
        print(f"go-tailnet: {message}", file=sys.stderr)
        raise SystemExit(1)

    start = time.monotonic()
    tools = build_tailnet_tools(give_up, give_up)
    print(f"go-tailnet: tailscaled/tailscale {TAILSCALE_VERSION}, headscale {HEADSCALE_VERSION} in {tools.bindir} "
          f"({time.monotonic() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
