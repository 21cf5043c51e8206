"""The docs refer only to what is there: every `see "Section"` names (the start of) a heading of
the same file, every relative link names a file of the repository, and nothing cites a protocol
"spec" that is not part of it (say what it means, or link Tailscale's sources)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "deploy").rglob("*.md"),
               *(REPO / "bench").glob("*.md")])
UNITS = sorted((REPO / "deploy" / "systemd").glob("*.service"))


def _id(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.mark.parametrize("path", DOCS + UNITS, ids=_id)
def test_no_reference_to_a_spec_that_is_not_shipped(path: Path) -> None:
    hits = [line for line in path.read_text().splitlines() if re.search(r"\bspec(?:'s|s)?\b(?!:)", line, re.I)]
    assert not hits, hits


@pytest.mark.parametrize("path", DOCS, ids=_id)
def test_see_section_names_a_heading_of_the_same_file(path: Path) -> None:
    text = path.read_text()
    headings = {m.group(1).strip() for m in re.finditer(r"(?m)^#+\s+(.+)$", text)}
    for ref in re.findall(r'see "([^"]+)"', text):
        assert any(h.startswith(ref) for h in headings), f"{_id(path)}: see {ref!r}, but no such heading"


@pytest.mark.parametrize("path", DOCS, ids=_id)
def test_relative_links_name_files_that_exist(path: Path) -> None:
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (path.parent / target).exists(), f"{_id(path)}: link to {target}, which is not there"
