"""pyproject.toml declares what current setuptools wants, so a fresh ``pip install -e .`` prints
no deprecation warnings: an SPDX license expression, and a bounded build requirement that
understands it.  The hash-locked requirements (deploy/*.lock, ``make lock``) pin every runtime
and build requirement pyproject.toml names, at versions it allows, each with its hashes."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"
DEPLOY = PYPROJECT.parent / "deploy"


def test_license_is_an_spdx_expression_and_the_build_requirement_is_bounded() -> None:
    doc = tomllib.loads(PYPROJECT.read_text())
    assert doc["project"]["license"] == "BSD-3-Clause"
    (setuptools,) = [r for r in doc["build-system"]["requires"] if r.startswith("setuptools")]
    m = re.fullmatch(r"setuptools>=(\d+),<(\d+)", setuptools.replace(" ", ""))
    assert m and int(m.group(1)) >= 77 and int(m.group(2)) > int(m.group(1)), setuptools  # 77: PEP 639


def _locked(path: Path) -> dict[str, str]:
    """name -> pinned version; every entry is ``name==version`` with at least one sha256 hash."""
    pins: dict[str, str] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", path.read_text()):
        if block.startswith("#") or not block.strip():
            continue
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+) \\\n", block)
        assert m, f"{path.name}: not an exact pin with hashes: {block[:80]!r}"
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", block), f"{path.name}: {m.group(1)} has no hash"
        pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def test_locks_pin_what_pyproject_requires_with_hashes() -> None:
    doc = tomllib.loads(PYPROJECT.read_text())
    runtime = _locked(DEPLOY / "requirements.lock")
    build = _locked(DEPLOY / "build-requirements.lock")
    wanted = [(runtime, r) for r in doc["project"]["dependencies"]]
    wanted += [(build, r) for r in doc["build-system"]["requires"]] + [(build, "build")]
    for pins, spec in wanted:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} is not locked: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} not in {spec}: make lock"
    assert "derpd" not in runtime and len(runtime) > len(doc["project"]["dependencies"])  # transitive ones too


def test_no_instruction_installs_derpd_from_a_package_index() -> None:
    # derpd is not published: `pip install derpd` would fail, or install whoever took the name.
    root = PYPROJECT.parent
    docs = [root / "README.md", *(root / "docs").rglob("*.md"), *(root / "deploy").rglob("*")]
    bad = re.compile(r"pip3? install (?:-\S+ )*['\"]?derpd(?![\w./-])")
    found = [f"{p.relative_to(root)}: {m.group(0)}" for p in docs if p.is_file()
             for m in bad.finditer(p.read_text(errors="replace"))]
    assert not found, found
