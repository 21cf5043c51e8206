"""pyproject.toml declares what current setuptools wants, so a fresh ``pip install -e .`` prints
no deprecation warnings: an SPDX license expression, and a bounded build requirement that
understands it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


def test_license_is_an_spdx_expression_and_the_build_requirement_is_bounded() -> None:
    doc = tomllib.loads(PYPROJECT.read_text())
    assert doc["project"]["license"] == "BSD-3-Clause"
    (setuptools,) = [r for r in doc["build-system"]["requires"] if r.startswith("setuptools")]
    m = re.fullmatch(r"setuptools>=(\d+),<(\d+)", setuptools.replace(" ", ""))
    assert m and int(m.group(1)) >= 77 and int(m.group(2)) > int(m.group(1)), setuptools  # 77: PEP 639
