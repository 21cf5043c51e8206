"""Dependencies run one way (docs/architecture.md, "Assembling a node"): the command line, where
flags become typed settings, on top; then the node's assembly; then the domain modules.  Read
from the source (every import statement, wherever it sits), so a lazy import counts too.  The
protocol core's freedom from I/O is checked at import time in tests/derpd/test_protocol.py."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: The command line: the only modules that parse flags (and so import click).
CLI_EDGE = frozenset({"derpd.__main__", "derpd.cli", "derpd.cli_settings", "derpd.derperflags",
                      "derpd.coordinator.cli"})
#: The node's assembly: built from NodeSettings, used by the command line only.
ASSEMBLY = frozenset({"derpd.node", "derpd.workers", "derpd.devregion"})


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted((REPO / "derpd").rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """Every module ``name`` imports, absolute, including ``from pkg import module`` targets."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def _importers(targets: frozenset[str]) -> dict[str, set[str]]:
    out = {}
    for name in MODULES:
        hits = {m for m in imports_of(name) if m in targets or m.split(".")[0] in targets}
        if hits:
            out[name] = hits
    return out


def test_the_layers_name_modules_that_exist():
    assert CLI_EDGE | ASSEMBLY <= set(MODULES)


def test_only_the_command_line_imports_click():
    users = set(_importers(frozenset({"click"})))
    assert users, "no module imports click: the check reads the wrong files"
    assert users <= CLI_EDGE, sorted(users - CLI_EDGE)


def test_nothing_imports_the_command_line_but_the_command_line():
    importers = {name: hits for name, hits in _importers(CLI_EDGE).items() if name not in CLI_EDGE}
    assert not importers, importers


def test_only_the_command_line_and_the_assembly_import_the_assembly():
    importers = {name: hits for name, hits in _importers(ASSEMBLY).items() if name not in CLI_EDGE | ASSEMBLY}
    assert not importers, importers
    assert "derpd.node" in imports_of("derpd.cli") and "derpd.node" in imports_of("derpd.workers")
    assert "derpd.node" in imports_of("derpd.devregion")


@pytest.mark.parametrize("name", sorted(set(MODULES) - CLI_EDGE))
def test_no_flag_dicts_below_the_command_line(name):
    """Below the command line, functions take typed settings: no parameter named like a bag of
    parsed flags (``opts``, ``flags``) typed as a dict or mapping of ``object``/``Any``."""
    tree = ast.parse(MODULES[name].read_text())
    bags = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for arg in [*node.args.args, *node.args.kwonlyargs]:
                text = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                if arg.arg in ("opts", "flags") and re.fullmatch(r"(dict|Mapping)\[str, (object|Any)\]", text):
                    bags.append(f"{node.name}({arg.arg}: {text})")
    assert not bags, bags


def test_the_node_registration_is_built_in_one_place():
    """One ``Announcer`` for every way a node runs (one process, the workers' parent, ``derpd dev``)."""
    builders = [name for name, path in MODULES.items() if name != "derpd.coordinator.announce"
                and any(isinstance(node, ast.Call) and ast.unparse(node.func) == "Announcer"
                        for node in ast.walk(ast.parse(path.read_text())))]
    assert builders == ["derpd.node"], builders
