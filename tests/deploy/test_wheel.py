"""The release files: deploy/build-wheel.sh (`make wheel`) builds an sdist and a wheel from the
repository with the hash-locked build requirements; twine checks both; the wheel goes into a
fresh venv after the runtime dependencies from deploy/requirements.lock (--require-hashes),
with --no-deps, as deploy/README.md says; and that venv runs: the compiled extensions import,
`derpd serve` says it runs them, and `derpd check` relays through it."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import BIN, DEPLOY, missing

pytestmark = [pytest.mark.slow, pytest.mark.artefact]

COMPILED = "compiled (derpd._dataplane, derpd._speedups, stund._mmsg)"
EXTENSIONS = ("derpd/_speedups", "derpd/_dataplane", "stund/_mmsg")
# Run what the venv holds, not this checkout: no DERPD_PURE (an empty value is the compiled
# path), no PYTHONPATH, and a working directory outside the repository.
CLEAN_ENV = {"DERPD_PURE": "", "PYTHONPATH": ""}


def _run(argv: list[str], timeout: float = 600, **kw: Any) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, argv))}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def lock_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], Path]]:
    """A fresh venv with the runtime dependencies from deploy/requirements.lock
    (--require-hashes), made in the background while ``dist`` builds (they do not depend on
    each other); calling the fixture's value waits for it and returns the venv's path."""
    venv = tmp_path_factory.mktemp("lock-venv") / "venv"
    v = shlex.quote(str(venv))
    pip = f"{v}/bin/pip install --quiet --disable-pip-version-check"
    script = (f"{shlex.quote(sys.executable)} -m venv {v} && "
              f"{pip} --require-hashes -r {shlex.quote(str(DEPLOY / 'requirements.lock'))}")
    proc = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def ready() -> Path:
        out, _ = proc.communicate(timeout=1020)
        assert proc.returncode == 0, f"{script}\n{out[-3000:]}"
        return venv

    try:
        yield ready
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory, lock_venv: Callable[[], Path]) -> dict[str, Path]:
    if shutil.which("cc") is None:
        missing("no C compiler: install the Debian packages gcc and python3-dev (.ci/setup.d/50-c-compiler.sh)")
    out = tmp_path_factory.mktemp("dist")
    r = _run(["bash", str(DEPLOY / "build-wheel.sh"), str(out)], timeout=900,
             env={**os.environ, "PYTHON": sys.executable})
    files = {Path(line).suffix: Path(line) for line in r.stdout.split()}
    assert set(files) == {".whl", ".gz"} and all(f.parent == out for f in files.values()), r.stdout
    return files


def test_sdist_and_wheel_hold_the_sources_and_extensions_and_pass_twine(dist: dict[str, Path]) -> None:
    wheel, sdist = dist[".whl"], dist[".gz"]
    # A platform wheel for this interpreter, with the three compiled extensions and no tests.
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert wheel.name.startswith(f"derpd-0.") and f"-{tag}-{tag}-linux_" in wheel.name, wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    for ext in EXTENSIONS:
        assert any(n.startswith(ext + ".") and n.endswith(".so") for n in names), (ext, names)
    assert not any(n.startswith("tests/") or n.endswith(".c") for n in names)
    # The sdist rebuilds the same: setup.py and the C sources are in it, nothing compiled is.
    with tarfile.open(sdist) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    assert {"pyproject.toml", "setup.py", "README.md"} <= members
    assert {ext + ".c" for ext in EXTENSIONS} <= members
    assert not any(m.endswith(".so") for m in members)
    twine = BIN / "twine"
    if not twine.exists():
        missing("twine is not installed: pip install -e '.[test]'")
    r = _run([str(twine), "check", "--strict", str(wheel), str(sdist)], timeout=120)
    assert r.stdout.count("PASSED") == 2, r.stdout


def test_wheel_in_a_fresh_venv_from_the_lock_relays_on_the_compiled_path(dist: dict[str, Path], tmp_path: Path,
                                                                          lock_venv: Callable[[], Path],
                                                                          processes: Any) -> None:
    venv = lock_venv()  # a fresh venv with deploy/requirements.lock installed (--require-hashes)
    pip = [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check"]
    _run([*pip, "--no-index", "--no-deps", str(dist[".whl"])], timeout=300)
    # The lock satisfies every requirement the wheel declares.
    _run([str(venv / "bin" / "pip"), "check", "--disable-pip-version-check"], timeout=120)

    env = {**os.environ, **CLEAN_ENV}
    probe = ("import derpd, derpd._dataplane, derpd._speedups, stund._mmsg, derpd.accel; "
             "print(derpd.__file__); print(derpd.accel.data_plane())")
    path, line = _run([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path, env=env,
                      timeout=60).stdout.splitlines()
    assert Path(path).is_relative_to(venv), path
    assert line == COMPILED
    pure = _run([str(venv / "bin" / "python"), "-c", "import derpd.accel; print(derpd.accel.data_plane())"],
                cwd=tmp_path, env={**env, "DERPD_PURE": "1"}, timeout=60).stdout.strip()
    assert pure == "pure Python (DERPD_PURE is set)"

    derpd = str(venv / "bin" / "derpd")
    relay = processes([derpd, "serve", "-a", "127.0.0.1:0", "--http-port", "-1", "--stun-port", "-1",
                       "-c", str(tmp_path / "derper.key")], name="wheel-relay", env=CLEAN_ENV)
    port = int(relay.expect(r"relay http://127\.0\.0\.1:(\d+)/derp").group(1))
    assert f"data plane: {COMPILED}" in relay.output()
    r = _run([derpd, "check", f"http://127.0.0.1:{port}/derp", "-n", "200"], env=env, timeout=60)
    assert "delivered 200/200" in r.stdout, r.stdout
    assert relay.stop() == 0, relay.output()
