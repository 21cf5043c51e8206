"""Helpers shared by bench/relay.py and bench/compare.py: the Go load generator and the derper
anchor (built from the module proxy into bench/.build/), test certificates, server processes
on 127.0.0.1, and per-process CPU and memory figures read from /proc.

Nothing here runs at import time; every process it starts is bounded in time and is ended
by the ``ServerProcess`` context manager.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LOADGEN_DIR = HERE / "loadgen"
BUILD_DIR = HERE / ".build"
RESULTS_DIR = HERE / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------- Go side


def find_go() -> str | None:
    found = shutil.which("go")
    if found:
        return found
    default_install = Path("/usr/local/go/bin/go")
    return str(default_install) if default_install.exists() else None


def tailscale_version() -> str:
    for line in (LOADGEN_DIR / "go.mod").read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["require"] and len(parts) >= 3 and parts[1] == "tailscale.com":
            return parts[2]
        if parts[:1] == ["tailscale.com"]:
            return parts[1]
    return "?"


def build_go(log=print) -> tuple[Path, Path] | None:
    """Build the load generator and derper (same pinned tailscale.com) into bench/.build/,
    keyed by a hash of the module's files and the Go version.  Returns (loadgen, derper),
    or None when Go is missing or the build fails (the message says why)."""
    go = find_go()
    if go is None:
        log("Go not found: using the pure-Python generator, and no derper anchor")
        return None
    h = hashlib.sha256()
    h.update(subprocess.run([go, "env", "GOVERSION", "GOOS", "GOARCH"], capture_output=True, text=True,
                            timeout=60, check=True).stdout.encode())
    for f in sorted(LOADGEN_DIR.glob("*")):
        if f.suffix in (".go", ".mod", ".sum"):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    out = BUILD_DIR / h.hexdigest()[:16]
    loadgen, derper = out / "loadgen", out / "derper"
    if loadgen.exists() and derper.exists():
        return loadgen, derper
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOFLAGS": "-mod=mod -buildvcs=false"}
    log(f"building the Go load generator and derper (tailscale.com {tailscale_version()}); "
        "a cold build takes minutes on a small machine")
    for target, dest in ((".", loadgen), ("tailscale.com/cmd/derper", derper)):
        r = subprocess.run([go, "build", "-o", str(dest), target], cwd=LOADGEN_DIR, env=env,
                           capture_output=True, text=True, timeout=1200)
        if r.returncode != 0:
            log(f"go build {target} failed:\n{r.stderr.strip()[-2000:]}")
            return None
    return loadgen, derper


def go_env() -> dict[str, str]:
    """No proxies for Go programs (everything is on loopback), no inherited TS_ knobs."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and not k.startswith("TS_")}
    env["NO_PROXY"] = env["no_proxy"] = "localhost,127.0.0.1,::1"
    return env


# ---------------------------------------------------------------------- certificates, ports


@dataclass
class Certs:
    dir: Path  # holds localhost.crt / localhost.key (what --certmode manual reads)
    ca: Path  # PEM of the CA, for clients


def make_certs(base: Path) -> Certs:
    """A trustme CA and a leaf for localhost and 127.0.0.1."""
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    d = base / "certs"
    d.mkdir(parents=True, exist_ok=True)
    leaf.cert_chain_pems[0].write_to_path(str(d / "localhost.crt"))
    leaf.private_key_pem.write_to_path(str(d / "localhost.key"))
    os.chmod(d / "localhost.key", 0o600)
    ca.cert_pem.write_to_path(str(base / "ca.pem"))
    return Certs(d, base / "ca.pem")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)  # polling a child process's port, not a test
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def taskset_prefix(cpus: str | None) -> list[str]:
    if cpus is None or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", cpus]


def pin_plan() -> tuple[str | None, str | None]:
    """(server cpus, load generator cpus): disjoint halves when there are 2+ CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or shutil.which("taskset") is None:
        return None, None
    half = len(cpus) // 2
    return ",".join(map(str, cpus[:half])), ",".join(map(str, cpus[half:]))


def derpd_command() -> list[str]:
    return [sys.executable, "-m", "derpd"]


def server_command(impl: str, port: int, *, tls: Certs | None, workdir: Path, derper: Path | None,
                   stun_port: int = -1) -> list[str]:
    """derpd or derper on 127.0.0.1:port, plain HTTP or TLS (--certmode manual, same cert)."""
    key = workdir / f"{impl}-key.json"
    if impl == "derpd":
        cmd = [*derpd_command(), "serve", "-a", f"127.0.0.1:{port}", "-c", str(key), "--http-port", "-1",
               "--stun-port", str(stun_port)]
    else:
        assert derper is not None
        cmd = [str(derper), "-a", f"127.0.0.1:{port}", "-c", str(key), "-http-port", "-1"]
        cmd += [f"-stun-port={stun_port}", "-stun=true"] if stun_port > 0 else ["-stun=false"]
    if tls is not None:
        cmd += ["--certmode" if impl == "derpd" else "-certmode", "manual",
                "--certdir" if impl == "derpd" else "-certdir", str(tls.dir),
                "--hostname" if impl == "derpd" else "-hostname", "localhost"]
    return cmd


# ---------------------------------------------------------------------- /proc figures


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class ServerProcess:
    """A server child process with stdout/stderr in a log file; ended on exit (SIGTERM, then
    SIGKILL after 5 s)."""

    cmd: list[str]
    port: int
    log_path: Path
    env: dict[str, str] | None = None
    cwd: str | None = None
    proc: subprocess.Popen | None = field(default=None, init=False)

    def __enter__(self) -> ServerProcess:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     stdin=subprocess.DEVNULL, cwd=self.cwd)
        try:
            wait_listening(self.port, self.proc)
        except RuntimeError as e:
            self.__exit__(None, None, None)
            raise RuntimeError(f"{e}; {Path(self.cmd[0]).name} said:\n{self.log_tail()}") from None
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()

    def log_tail(self, n: int = 5) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


def run_json(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run a generator that prints one JSON object as its last stdout line."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"{Path(cmd[0]).name} printed no result (exit {r.returncode}): {r.stderr.strip()[-500:]}")
    return json.loads(lines[-1])


def tempdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="derpd-bench-")


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return float("nan")
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


# ---------------------------------------------------------------------- process trees


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name: [0] state, [1] parent pid, [11]
    utime, [12] stime, [13] cutime, [14] cstime (clock ticks)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant of it (children, their children, ...), from the parent
    pids in /proc: a server with ``--workers`` is its parent and the processes it spawned."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat(int(entry.name))[1])
        except (OSError, ValueError, IndexError):  # gone while we looked
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def tree_cpu_seconds(pid: int) -> dict[int, float]:
    """User + system CPU seconds of ``pid`` and of each live descendant, by pid.  Each figure
    includes the CPU of that process's own reaped children (a worker that died and was
    restarted still counts, through its parent)."""
    out = {}
    for p in process_tree(pid):
        try:
            f = _stat(p)
        except OSError:
            continue
        out[p] = (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / CLK_TCK
    return out


def cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds a process tree spent between two ``tree_cpu_seconds`` readings (a process
    that started in between counts from zero)."""
    return sum(v - before.get(p, 0.0) for p, v in after.items())


def process_starts(pids: list[int]) -> dict[int, str]:
    """Each live pid's start time (clock ticks after boot), to tell it from a later process
    that reuses the pid."""
    out = {}
    for p in pids:
        try:
            out[p] = _stat(p)[19]
        except (OSError, IndexError):
            continue
    return out


def kill_leftovers(starts: dict[int, str], grace: float = 3.0) -> list[int]:
    """What a server's tree left behind after its parent stopped: wait up to ``grace`` seconds
    for the processes of ``starts`` (``process_starts``) to exit on their own (multiprocessing's
    resource tracker follows its parent within moments; a zombie has exited), then SIGKILL those
    that still run as the same process.  Returns their pids."""

    def running() -> list[int]:
        out = []
        for p, start in starts.items():
            try:
                f = _stat(p)
            except (OSError, IndexError):
                continue
            if f[19] == start and f[0] != "Z":
                out.append(p)
        return out

    deadline = time.monotonic() + grace
    while (left := running()) and time.monotonic() < deadline:
        time.sleep(0.05)  # waiting for a child process's exit, not a test
    killed = []
    for p in left:
        try:
            os.kill(p, 9)
            killed.append(p)
        except ProcessLookupError:
            pass
    return killed
