"""Pebble, Let's Encrypt's ACME test server, for the ACME tests.

``build_pebble`` fetches ``github.com/letsencrypt/pebble/v2`` at ``PEBBLE_VERSION`` from the Go
module proxy (``go mod download``), builds ``cmd/pebble`` once and caches the binary in
``pebble_cache()`` (beside the interop binaries' folder), keyed by the version and the Go
toolchain.  ``Pebble`` runs it on loopback with its challenge ports pointed at a derpd relay and
its resolver (``-dnsserver``, which Pebble asks over TCP) at ``serve_dns``, which answers every
A query with 127.0.0.1 (so any test name resolves to the relay).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import trio

from tests.interop.interop_harness import cache_root, find_go

PEBBLE_MODULE = "github.com/letsencrypt/pebble/v2"
PEBBLE_VERSION = "v2.10.3"
BUILD_TIMEOUT = 600.0
# Pebble's profiles for the tests: the CA default, Let's Encrypt's short-lived one (6 days, as
# in Pebble's own test config) and a tiny one to see renewals happen within a test.
PROFILES = {
    "default": {"description": "90 days", "validityPeriod": 7776000},
    "shortlived": {"description": "6 days, as Let's Encrypt's", "validityPeriod": 518400},
    "tiny": {"description": "renewal tests", "validityPeriod": 12},
}
EAB_KEYS = {"kid-1": "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"}


@dataclass(frozen=True)
class PebbleBuild:
    binary: Path
    module_dir: Path  # the module's source: test/certs/ holds Pebble's own TLS certificate

    @property
    def minica(self) -> Path:
        """The CA of Pebble's own HTTPS certificate (not of the certificates it issues)."""
        return self.module_dir / "test" / "certs" / "pebble.minica.pem"


def pebble_cache() -> Path:
    """Beside the interop binaries' folder, not in it: the interop build deletes what it does
    not know there."""
    root = cache_root()
    return root.parent / f"{root.name}-pebble"


def build_pebble(missing: Callable[[str], NoReturn], fail: Callable[[str], NoReturn]) -> PebbleBuild:
    go = find_go()
    if go is None:
        missing(f"Go is not installed: the ACME tests build Pebble ({PEBBLE_MODULE}@{PEBBLE_VERSION}); install "
                "Go from https://go.dev/dl/ (.ci/setup.d/50-pebble.sh builds Pebble once)")
    env = dict(os.environ)
    env["GOFLAGS"] = "-mod=mod"
    work = pebble_cache()
    work.mkdir(parents=True, exist_ok=True)
    try:
        out = subprocess.run([go, "mod", "download", "-json", f"{PEBBLE_MODULE}@{PEBBLE_VERSION}"], cwd=work,
                             env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        fail(f"`go mod download {PEBBLE_MODULE}@{PEBBLE_VERSION}` took over {BUILD_TIMEOUT:.0f}s")
    try:
        module_dir = Path(json.loads(out.stdout)["Dir"])
    except (ValueError, KeyError):
        fail(f"`go mod download {PEBBLE_MODULE}@{PEBBLE_VERSION}` failed: {(out.stderr or out.stdout)[-2000:]}")
    goversion = subprocess.run([go, "env", "GOVERSION", "GOOS", "GOARCH"], capture_output=True, text=True,
                               timeout=60, check=True).stdout
    key = hashlib.sha256(f"{PEBBLE_VERSION}\0{goversion}".encode()).hexdigest()[:16]
    bindir = work / f"pebble-{PEBBLE_VERSION}-{key}"
    if (bindir / "pebble").exists():
        return PebbleBuild(bindir / "pebble", module_dir)
    tmp = work / f"pebble-{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    env["GOFLAGS"] = "-mod=readonly"
    try:
        proc = subprocess.run([go, "build", "-o", str(tmp) + os.sep, "./cmd/pebble"], cwd=module_dir, env=env,
                              capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        fail(f"building Pebble took over {BUILD_TIMEOUT:.0f}s")
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        fail(f"building Pebble failed (go build ./cmd/pebble in {module_dir}):\n{proc.stderr[-3000:]}")
    try:
        tmp.rename(bindir)
    except OSError:  # a concurrent run finished first
        shutil.rmtree(tmp, ignore_errors=True)
    for stale in work.glob("pebble-*"):
        if stale.name != bindir.name and ".tmp-" not in stale.name:
            shutil.rmtree(stale, ignore_errors=True)
    return PebbleBuild(bindir / "pebble", module_dir)


def unused_tcp_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just gave out and took back (Pebble cannot report a port-0 bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------- DNS


def dns_answer(query: bytes, address: bytes = bytes([127, 0, 0, 1])) -> bytes | None:
    """The answer to one DNS query: an A record ``address`` for an A question, no records
    (NOERROR) for any other type; None for something that is not a query."""
    if len(query) < 12 or query[2] & 0x80:
        return None
    pos = 12
    while True:  # the question name
        if pos >= len(query):
            return None
        n = query[pos]
        if n == 0:
            pos += 1
            break
        if n & 0xC0:
            return None
        pos += 1 + n
    if pos + 4 > len(query):
        return None
    qtype = int.from_bytes(query[pos:pos + 2], "big")
    question = query[12:pos + 4]
    answers = b""
    if qtype == 1:
        answers = b"\xc0\x0c" + (1).to_bytes(2, "big") + (1).to_bytes(2, "big") + (0).to_bytes(4, "big") \
            + (4).to_bytes(2, "big") + address
    header = query[:2] + b"\x81\x80" + (1).to_bytes(2, "big") + (1 if answers else 0).to_bytes(2, "big") + bytes(4)
    return header + question + answers


async def _answer_tcp(stream: trio.SocketStream, address: bytes) -> None:
    """DNS over TCP (RFC 1035 4.2.2): each message behind a two-byte length."""
    buf = b""
    async with stream:
        with trio.move_on_after(10):
            while chunk := await stream.receive_some(4096):
                buf += chunk
                while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
                    n = int.from_bytes(buf[:2], "big")
                    query, buf = buf[2:2 + n], buf[2 + n:]
                    answer = dns_answer(query, address)
                    if answer is None:
                        return
                    await stream.send_all(len(answer).to_bytes(2, "big") + answer)


async def serve_dns(answer: str = "127.0.0.1", *,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """A DNS responder on 127.0.0.1 over TCP, which Pebble's ``-dnsserver`` client speaks,
    answering every A query with ``answer`` (port reported through task_status)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    address = socket.inet_aton(answer)
    await trio.serve_listeners(lambda stream: _answer_tcp(stream, address), listeners)


# ---------------------------------------------------------------------------- Pebble


@dataclass
class Pebble:
    build: PebbleBuild
    workdir: Path
    dns_port: int
    http_port: int  # where Pebble sends HTTP-01 validations (derpd's --http-port)
    tls_port: int  # where Pebble sends TLS-ALPN-01 validations (derpd's TLS port)
    port: int = field(default_factory=unused_tcp_port)
    management_port: int = field(default_factory=unused_tcp_port)
    eab: bool = False
    env: dict[str, str] = field(default_factory=dict)
    process: trio.Process | None = None
    log: bytearray = field(default_factory=bytearray)

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def config(self) -> dict[str, Any]:
        certs = self.build.module_dir / "test" / "certs" / "localhost"
        return {"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(certs / "cert.pem"), "privateKey": str(certs / "key.pem"),
            "httpPort": self.http_port, "tlsPort": self.tls_port, "ocspResponderURL": "",
            "externalAccountBindingRequired": self.eab,
            "externalAccountMACKeys": EAB_KEYS if self.eab else {},
            "retryAfter": {"authz": 1, "order": 1}, "keyAlgorithm": "ecdsa", "profiles": PROFILES,
        }}

    async def start(self, nursery: trio.Nursery) -> None:
        """Start Pebble and return once its ACME directory answers."""
        config = self.workdir / f"pebble-{self.port}.json"
        config.write_text(json.dumps(self.config()))
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        # No sleeping before validations, no random badNonce answers, no reuse of valid
        # authorizations (so every order is validated); PEBBLE_VA_ALWAYS_VALID stays unset.
        env.update({"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"})
        env.update(self.env)
        argv = [str(self.build.binary), "-config", str(config), "-dnsserver", f"127.0.0.1:{self.dns_port}"]
        self.process = await nursery.start(lambda task_status: trio.run_process(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, check=False,
            task_status=task_status))
        assert self.process.stdout is not None
        nursery.start_soon(self._collect, self.process.stdout)
        # Pebble logs "Listening on" just before it binds, and offers no other readiness
        # signal: try its directory until it answers (bounded).
        with trio.fail_after(20):
            while True:
                try:
                    await trio.to_thread.run_sync(self.fetch, "/dir", False)
                    return
                except OSError:
                    if self.process.returncode is not None:
                        raise AssertionError(f"pebble exited: {self.log.decode(errors='replace')[-2000:]}")
                    await trio.sleep(0.05)

    async def _collect(self, stream: trio.abc.ReceiveStream) -> None:
        while chunk := await stream.receive_some(65536):
            self.log += chunk[: max(0, (1 << 20) - len(self.log))]

    def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()

    async def stopped(self) -> None:
        self.stop()
        if self.process is not None:
            await self.process.wait()

    def fetch(self, path: str, management: bool = True) -> bytes:
        ctx = ssl.create_default_context(cafile=str(self.build.minica))
        port = self.management_port if management else self.port
        with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", context=ctx, timeout=5) as r:
            return bytes(r.read())

    async def root_pem(self) -> bytes:
        """The root of the chains Pebble issues (a new one each Pebble start)."""
        return await trio.to_thread.run_sync(self.fetch, "/roots/0")
