"""Builds and runs the Go side of the interop suite (used by conftest.py and the tests).

The Go side lives in this directory (``go.mod`` pins ``tailscale.com``).  The binaries
are built once per source tree into a cache folder keyed by a hash of the Go sources,
the Go version and the build tags, so a warm run does not invoke the compiler at all.
Go's own module and build caches (GOMODCACHE, GOCACHE) are used as configured.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

HERE = Path(__file__).resolve().parent
BUILD_TAGS = "ts_debug_websockets"  # compiles derphttp's WebSocket dialer in (spec 9.5)
PROGRAMS = ("./cmd/derpinterop", "tailscale.com/cmd/derpprobe", "tailscale.com/cmd/derper")
BUILD_TIMEOUT = 900.0  # cold: compiles a large part of tailscale.com on a small machine
SCENARIO_TIMEOUT = 120.0  # outer bound; each Go scenario has its own, shorter --timeout


def _go_mod_fact(pattern: str) -> str:
    match = re.search(pattern, (HERE / "go.mod").read_text(), re.MULTILINE)
    return match.group(1) if match else "?"


TAILSCALE_VERSION = _go_mod_fact(r"^\s*(?:require\s+)?tailscale\.com\s+(v\S+)")
GO_MIN = _go_mod_fact(r"^go\s+(\S+)")


def missing_tool(message: str) -> NoReturn:
    """A tool a suite needs is not installed: skip, or fail under DERPD_REQUIRE_INTEROP=1 (CI)."""
    import pytest

    if os.environ.get("DERPD_REQUIRE_INTEROP") == "1":
        pytest.fail(message + " (DERPD_REQUIRE_INTEROP=1 makes this a failure)", pytrace=False)
    pytest.skip(message)


def build_failed(message: str) -> NoReturn:
    import pytest

    pytest.fail(message, pytrace=False)


def find_go() -> str | None:
    found = shutil.which("go")
    if found:
        return found
    default_install = Path("/usr/local/go/bin/go")  # where the go.dev tarball installs
    return str(default_install) if default_install.exists() else None


def cache_root(name: str = "derpd-interop", env_var: str = "DERPD_INTEROP_CACHE") -> Path:
    """Where a suite keeps its built binaries: ``$env_var``, else ``$XDG_CACHE_HOME/name``,
    else ``~/.cache/name``.  Each suite has its own root (a build deletes stale folders in it)."""
    if env := os.environ.get(env_var):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / name


def source_key(go: str) -> str:
    """Hash of everything that decides the binaries' content."""
    h = hashlib.sha256()
    goenv = subprocess.run([go, "env", "GOVERSION", "GOOS", "GOARCH"], capture_output=True,
                           text=True, timeout=60, check=True).stdout
    h.update(goenv.encode())
    h.update(BUILD_TAGS.encode())
    h.update("\0".join(PROGRAMS).encode())
    for f in [HERE / "go.mod", HERE / "go.sum", *sorted(HERE.rglob("*.go"))]:
        h.update(str(f.relative_to(HERE)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:20]


def clean_env() -> dict[str, str]:
    """The environment for Go programs: no proxies (derphttp honours them, and every
    server here is on loopback) and no inherited Tailscale debug knobs, so each
    scenario says what it needs."""
    env = {k: v for k, v in os.environ.items()
           if not k.lower().endswith("_proxy") and not k.startswith("TS_")}
    env["NO_PROXY"] = env["no_proxy"] = "localhost,127.0.0.1,::1"
    return env


@dataclass(frozen=True)
class CertAuthority:
    ca_file: Path  # PEM of the CA, for SSL_CERT_FILE / --ca
    certdir: Path  # holds localhost.crt and localhost.key (derper's manual-mode names)


def make_test_ca(root: Path) -> CertAuthority:
    """A fresh test CA in ``root`` (ca.pem) and a certificate from it for localhost,
    127.0.0.1 and ::1 in ``root/certs`` (localhost.crt, localhost.key)."""
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1", "::1")
    certdir = root / "certs"
    certdir.mkdir(parents=True, exist_ok=True)
    ca.cert_pem.write_to_path(str(root / "ca.pem"))
    (certdir / "localhost.crt").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(certdir / "localhost.key"))
    return CertAuthority(root / "ca.pem", certdir)


@dataclass(frozen=True)
class GoTools:
    bindir: Path
    tailscale_version: str

    @property
    def derpinterop(self) -> str:
        return str(self.bindir / "derpinterop")

    @property
    def derpprobe(self) -> str:
        return str(self.bindir / "derpprobe")

    @property
    def derper(self) -> str:
        return str(self.bindir / "derper")


def build_go_tools(missing: Callable[[str], NoReturn], fail: Callable[[str], NoReturn]) -> GoTools:
    """Returns the cached binaries, building them first if the sources changed.

    ``missing(message)`` is called when Go is not installed, ``fail(message)`` when the
    build fails; both are expected not to return.
    """
    go = find_go()
    if go is None:
        missing(
            f"Go is not installed: the interop suite builds Tailscale's client code "
            f"(tailscale.com {TAILSCALE_VERSION}), which needs Go >= {GO_MIN}. Install it from "
            f"https://go.dev/dl/ so that `go` is on PATH (or in /usr/local/go/bin), then run "
            f"`go mod download` in tests/interop (.ci/setup.d/10-go-interop.sh does both)"
        )
    key = source_key(go)
    root = cache_root()
    bindir = root / key
    if all((bindir / Path(p).name).exists() for p in PROGRAMS):
        return GoTools(bindir, TAILSCALE_VERSION)

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    env = dict(os.environ)  # the build may need the module proxy, so keep proxy settings
    # Building must not edit go.mod or go.sum.
    env["GOFLAGS"] = (env.get("GOFLAGS", "") + " -mod=readonly").strip()
    cmd = [go, "build", "-tags", BUILD_TAGS, "-o", str(tmp) + os.sep, *PROGRAMS]
    shown = f"go build -tags {BUILD_TAGS} -o OUTDIR/ {' '.join(PROGRAMS)}"
    try:
        proc = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        shutil.rmtree(tmp, ignore_errors=True)
        fail(f"`{shown}` took over {BUILD_TIMEOUT:.0f}s; run it in tests/interop to see why")
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        fail(f"building the interop programs failed; run `{shown}` in tests/interop to "
             f"reproduce:\n{proc.stderr[-4000:]}")
    try:
        tmp.rename(bindir)
    except OSError:  # a concurrent run finished first; its binaries are equivalent
        shutil.rmtree(tmp, ignore_errors=True)
    for stale in root.iterdir():  # keep only the current build
        if stale.name != key and ".tmp-" not in stale.name:
            shutil.rmtree(stale, ignore_errors=True)
    return GoTools(bindir, TAILSCALE_VERSION)


@dataclass
class ScenarioResult:
    argv: list[str]
    returncode: int
    data: dict[str, Any]
    stderr: str

    def explain(self) -> str:
        return (f"`{' '.join(self.argv)}` exited {self.returncode}: "
                f"{json.dumps(self.data, sort_keys=True)}\nstderr (tail):\n{self.stderr[-3000:]}")


async def run_go(argv: list[str], *, env: dict[str, str] | None = None,
                 timeout: float = SCENARIO_TIMEOUT) -> tuple[int, str, str]:
    """Runs a Go program to completion; returns (returncode, stdout, stderr)."""
    import trio  # here, so that the build helpers above import without the venv (CI setup)

    full_env = clean_env()
    full_env.update(env or {})
    with trio.fail_after(timeout):
        proc = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                      check=False, env=full_env)
    return proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")


def parse_scenario(argv: list[str], code: int, out: str, err: str) -> ScenarioResult:
    """Parses derpinterop's one JSON line (the last non-empty stdout line)."""
    lines = [line for line in out.splitlines() if line.strip()]
    try:
        data = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        data = {"unparsed_stdout": out[-2000:]}
    return ScenarioResult(argv, code, data, err)


# ---------------------------------------------------------------------------
# Mesh helpers (derpd relays meshed with each other or with Tailscale's derper).

MESH_KEY = bytes(range(0x40, 0x60))  # any 32 non-zero bytes; shared by every node of a test


def write_mesh_key(path: Path, mesh_key: bytes = MESH_KEY) -> Path:
    """The --mesh-psk-file format (derper, derpprobe, derpd): 64 lower-case hex digits."""
    path.write_text(mesh_key.hex() + "\n")
    return path


async def wait_for_registries(registries: list[Any], condition: Callable[[], bool]) -> None:
    """Wait until ``condition()`` holds, re-checking it after every change of any of the
    relay registries (registration, unregistration, forwarder change); no polling."""
    import trio

    while True:
        # the events are taken before the check: a change racing the check is not missed
        events = [registry.change_event() for registry in registries]
        if condition():
            return
        async with trio.open_nursery() as nursery:
            for event in events:

                async def changed(event: Any = event) -> None:
                    await event.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(changed)


def watcher_keys(relay: Any) -> set[bytes]:
    """Keys of the mesh peers that sent WatchConns to ``relay`` (a RunningRelay)."""
    return {w.key for w in relay.server.registry.watchers}
