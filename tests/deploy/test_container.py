"""deploy/container: build the image with buildah (chroot isolation) on a Debian bookworm base
(debootstrap + Debian's python3, imported as BASE), then run `derpd serve` inside it on
loopback and check it from outside with `derpd check` (TLS, pinned self-signed certificate)
and a STUN request, and from inside with the image's HEALTHCHECK command.  The image runs the
compiled data plane (built in the Containerfile's build stage) and holds no compiler."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import REPO, derpd_bin, free_port, missing, poll, require_tool

BASE_TAR = Path(os.environ.get("DERPD_CI_BASE_TAR", "/var/cache/derpd-ci/bookworm-python3.tar"))
BASE_IMAGE = "localhost/derpd-ci-base:bookworm"
IMAGE = "localhost/derpd:ci"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")

pytestmark = [pytest.mark.slow, pytest.mark.artefact]


def _run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(argv)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    buildah = require_tool("buildah", "the Debian package `buildah`")
    if not BASE_TAR.is_file():
        missing(f"{BASE_TAR} not found: .ci/setup.d/40-deploy-tools.sh makes it with debootstrap (Debian `debootstrap`)")
    if subprocess.run([buildah, "inspect", "--type", "image", BASE_IMAGE], capture_output=True).returncode != 0:
        ctr = _run([buildah, "from", "scratch"]).stdout.strip()
        try:
            _run([buildah, "add", "--quiet", ctr, str(BASE_TAR), "/"], timeout=300)
            _run([buildah, "commit", "--quiet", ctr, BASE_IMAGE], timeout=300)
        finally:
            subprocess.run([buildah, "rm", ctr], capture_output=True)
    # --layers: the compiler and dependency layers are reused by the next build on this machine
    # (CI's second pass, DERPD_PURE=1, rebuilds nothing).
    build = [buildah, "bud", "--isolation", "chroot", "--format", "docker", "--pull-never", "--layers",
             "--build-arg", f"BASE={BASE_IMAGE}", "-f", "deploy/container/Containerfile", "-t", IMAGE]
    if HOST_CA.is_file():
        # pip in the build stage trusts the same CAs as this machine (a TLS-inspecting proxy's
        # CA, say); the mount is not stored in the image.
        build += ["--volume", f"{HOST_CA}:{HOST_CA}:ro"]
    r = subprocess.run([*build, "."], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"buildah bud failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    yield IMAGE


def test_image_config(image: str) -> None:
    info = json.loads(_run(["buildah", "inspect", "--type", "image", image]).stdout)
    config = info["Docker"]["config"]
    assert config["User"] == "derpd:derpd"
    assert set(config["ExposedPorts"]) >= {"443/tcp", "80/tcp", "3478/udp"}
    assert "/var/lib/derpd" in config["Volumes"]
    assert config["Healthcheck"]["Test"] == ["CMD", "derpd-healthcheck"]
    assert config["Entrypoint"] == ["derpd-entrypoint"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["DERPD_ADDR"] == ":443" and env["DERPD_STUN_PORT"] == "3478"
    assert env["DERPD_CERTMODE"] == "letsencrypt" and env["DERPD_CERTDIR"] == "/var/lib/derpd/certs"


@pytest.fixture
def container(image: str) -> Iterator[str]:
    ctr = _run(["buildah", "from", "--pull-never", image]).stdout.strip()
    yield ctr
    subprocess.run(["buildah", "rm", ctr], capture_output=True, timeout=60)


def _uid_of_listener(port: int) -> int | None:
    """UID of the process whose command line names ``port`` (derpd inside the container)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        if b"serve" in cmdline and f"127.0.0.1:{port}".encode() in cmdline and b"buildah" not in cmdline[0]:
            return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:")))
    return None


def test_relay_in_container_serves_derp_and_stun(container: str, processes: Any) -> None:
    port, stun, metrics = free_port(), free_port(socket.SOCK_DGRAM), free_port()
    env = {"DERPD_ADDR": f"127.0.0.1:{port}", "DERPD_HTTP_PORT": "-1", "DERPD_STUN_PORT": str(stun),
           "DERPD_HOSTNAME": "127.0.0.1", "DERPD_METRICS_ADDR": f"127.0.0.1:{metrics}", "DERPD_CERTMODE": "manual"}
    argv = ["buildah", "run", "--isolation", "chroot"]
    for k, v in env.items():
        argv += ["--env", f"{k}={v}"]
    relay = processes([*argv, container, "--", "derpd-entrypoint"], name="container-relay")
    node = json.loads(relay.expect(r"(?m)^(\{.*\"CertName\".*\})$", timeout=60).group(1))
    assert node["DERPPort"] == port and node["STUNPort"] == stun

    r = _run([derpd_bin(), "check", f"https://127.0.0.1:{port}/derp", "--cert-pin", node["CertName"], "-n", "50"])
    assert "delivered 50/50" in r.stdout, r.stdout
    r = _run([derpd_bin("stund"), "check", f"127.0.0.1:{stun}"])
    assert "127.0.0.1:" in r.stdout, r.stdout
    # Non-root inside the container.
    assert poll(lambda: _uid_of_listener(port), 10, "the relay process") == 10001
    # The HEALTHCHECK command, run inside the same container.
    _run([*argv, container, "--", "derpd-healthcheck"])
    # The key was created on the volume path, readable only by the relay's user.
    r = _run(["buildah", "run", "--isolation", "chroot", container, "--", "stat", "-c", "%U %a",
              "/var/lib/derpd/derper.key"])
    assert r.stdout.split() == ["derpd", "600"]
    relay.stop()
    # Without DERPD_HOSTNAME the entrypoint explains what to set instead of starting.
    r = subprocess.run(["buildah", "run", "--isolation", "chroot", container, "--", "derpd-entrypoint"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "DERPD_HOSTNAME" in r.stderr


IN_IMAGE_PYTHON = "/opt/derpd/bin/python"
COMPILED = "compiled (derpd._dataplane, derpd._speedups, stund._mmsg)"


def test_image_runs_the_compiled_data_plane_and_holds_no_compiler(container: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # The extensions import in the image (not only in the build stage) and the selector picks them.
    r = _run(["buildah", "run", "--isolation", "chroot", container, "--", IN_IMAGE_PYTHON, "-c",
              "import derpd._dataplane, derpd._speedups, stund._mmsg, derpd.accel; "
              "print(derpd.accel.data_plane()); print(derpd._dataplane.__file__)"])
    line, path = r.stdout.splitlines()
    assert line == COMPILED
    assert path.startswith("/opt/derpd/lib/python3") and path.endswith(".so"), path
    # No compiler and no Python headers: they stayed in the build stage.
    probe = ("import glob, shutil; print(sorted({shutil.which(c) or '' for c in "
             "('gcc', 'cc', 'c89', 'c99', 'clang', 'tcc', 'ld', 'as')} - {''}) + glob.glob('/usr/bin/*-gcc*') "
             "+ glob.glob('/usr/include/python3*/Python.h') + glob.glob('/usr/local/include/python3*/Python.h'))")
    r = _run(["buildah", "run", "--isolation", "chroot", container, "--", IN_IMAGE_PYTHON, "-c", probe])
    assert r.stdout.strip() == "[]", f"build tools in the final image: {r.stdout}"
    # Its size, for deploy/README.md: the BASE plus the venv, which stays small.
    size = _run(["buildah", "images", "--noheading", "--format", "{{.Size}}", IMAGE]).stdout.strip()
    venv = ("import os; print(sum(os.lstat(os.path.join(d, f)).st_size "
            "for d, _, fs in os.walk('/opt/derpd') for f in fs))")
    venv_mb = int(_run(["buildah", "run", "--isolation", "chroot", container, "--", IN_IMAGE_PYTHON, "-c",
                        venv]).stdout) / 1e6
    with capsys.disabled():
        print(f"\n{IMAGE}: {size} (BASE {BASE_IMAGE} and the venv /opt/derpd, {venv_mb:.0f} MB)", end=" ")
    assert venv_mb < 100


def test_relay_in_container_relays_on_the_compiled_data_plane(container: str, processes: Any) -> None:
    # Plain TCP (no TLS): the clients' packets take the compiled path (derpd._dataplane).
    port = free_port()
    relay = processes(["buildah", "run", "--isolation", "chroot", container, "--", "derpd", "serve",
                       "-a", f"127.0.0.1:{port}", "--http-port", "-1", "--stun-port", "-1",
                       "-c", "/var/lib/derpd/derper.key"], name="container-plain-relay")
    relay.expect(r"relay http://127\.0\.0\.1:\d+/derp", timeout=60)
    assert f"data plane: {COMPILED}" in relay.output()
    r = _run([derpd_bin(), "check", f"http://127.0.0.1:{port}/derp", "-n", "200"])
    assert "delivered 200/200" in r.stdout, r.stdout
