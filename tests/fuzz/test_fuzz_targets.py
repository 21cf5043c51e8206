"""A bounded run of every fuzz target under fuzz/ (atheris when installed, else Hypothesis),
and every seed replayed in-process."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
TARGETS = ["frames", "login", "http_front", "stun", "engine"]
SECONDS = 2


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"fuzz_target_{name}", FUZZ / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def needs_built(name: str) -> None:
    """The engine target drives derpd._dataplane itself: it needs the module built."""
    if name == "engine" and importlib.util.find_spec("derpd._dataplane") is None:
        pytest.skip("derpd._dataplane not built (no C compiler)")


def have_atheris() -> bool:
    return importlib.util.find_spec("atheris") is not None


@pytest.mark.parametrize("name", TARGETS)
def test_seeds_pass(name):
    seeds = sorted((FUZZ / "corpus" / name).iterdir())
    assert len(seeds) >= 3
    needs_built(name)
    target = load(name)
    for seed in seeds:
        target.one_input(seed.read_bytes())


@pytest.mark.parametrize("name", TARGETS)
def test_bounded_fuzz_run(name, tmp_path):
    needs_built(name)
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ / "corpus" / name, corpus)  # libFuzzer adds to it; keep the repo clean
    if have_atheris():
        args = [f"-max_total_time={SECONDS}", f"-artifact_prefix={tmp_path}/", str(corpus)]
    else:
        args = ["--hypothesis", "--seconds", str(SECONDS)]
    result = subprocess.run([sys.executable, str(FUZZ / f"{name}.py"), *args],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert ("Done " in out) if have_atheris() else ("no finding" in out), out[-3000:]
    assert not list(tmp_path.glob("crash-*"))
