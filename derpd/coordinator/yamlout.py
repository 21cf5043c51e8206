"""The DERP map as YAML for headscale's ``derp.paths`` (spec 16.2, P-29).

headscale decodes these files with yaml.v3 into Tailscale's Go structs, which have no
yaml tags, so the keys are the Go field names lower-cased (``regionid``, ``hostname``,
``derpport``, ...) and are matched case-sensitively.  We emit the same fields as the JSON
(same omitempty rules) and write every string as a double-quoted scalar, so no value can
be mistaken for a number, a boolean or a null.
"""

from __future__ import annotations

from typing import Any

from .model import DerpMap


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return _quote(str(value))


def _printable(cp: int) -> bool:
    # YAML's printable set minus the BOM and the characters YAML 1.1 treats as line
    # breaks (NEL, LS, PS), which a double-quoted scalar would fold.
    return (0x20 <= cp <= 0x7E or (0xA0 <= cp <= 0xD7FF and cp not in (0x2028, 0x2029))
            or (0xE000 <= cp <= 0xFFFD and cp != 0xFEFF) or 0x10000 <= cp <= 0x10FFFF)


def _quote(text: str) -> str:
    """Returns ``text`` as a YAML double-quoted scalar (non-printables escaped)."""
    out = ['"']
    for ch in text:
        cp = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif _printable(cp):
            out.append(ch)
        elif cp < 0x100:
            out.append(f"\\x{cp:02x}")
        elif cp < 0x10000:
            out.append(f"\\u{cp:04x}")
        else:
            out.append(f"\\U{cp:08x}")
    out.append('"')
    return "".join(out)


def _fields(obj: dict[str, Any], indent: str, first_prefix: str) -> list[str]:
    lines: list[str] = []
    prefix = first_prefix
    for key, value in obj.items():
        lines.append(f"{prefix}{key.lower()}: {_scalar(value)}")
        prefix = indent
    return lines


def to_yaml(dmap: DerpMap) -> str:
    """Returns the map as a YAML document with lower-cased Go field names."""
    doc = dmap.to_json()
    regions: dict[str, dict[str, Any]] = doc["Regions"]
    if not regions:
        lines = ["regions: {}"]
    else:
        lines = ["regions:"]
    for key, region in regions.items():
        lines.append(f"  {key}:")
        nodes = region.pop("Nodes")
        lines.extend(_fields(region, "    ", "    "))
        if not nodes:
            lines.append("    nodes: []")
            continue
        lines.append("    nodes:")
        for node in nodes:
            lines.extend(_fields(node, "        ", "      - "))
    if doc.get("omitDefaultRegions"):
        lines.append("omitdefaultregions: true")
    return "\n".join(lines) + "\n"
