"""The DERP map: regions and nodes as ``tailcfg.DERPMap`` (spec 15.1).

JSON output follows Tailscale's field names, order and ``omitempty`` rules exactly:

    DERPMap     Regions (never omitted, never null; keys are decimal region IDs),
                omitDefaultRegions (lower-case o; omitted when false)
    DERPRegion  RegionID, RegionCode, RegionName, [Latitude, Longitude, Avoid,
                NoMeasureNoHome], Nodes
    DERPNode    Name, RegionID, HostName, [CertName, IPv4, IPv6, STUNPort, STUNOnly,
                DERPPort, InsecureForTests, STUNTestIP, CanPort80]

Bracketed fields are omitted when zero.  We never emit a ``null`` region (P-29).

Validation reports every problem at once as :class:`Problem` values that name the
Python attribute; callers (the TOML loader, the registration endpoint) translate the
attribute to *their* spelling of the field, so users see the name they typed.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

MAX_REGION_ID = 2**53 - 1
PIN_PREFIX = "sha256-raw:"
_LOWER_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class DerpNode:
    """One ``tailcfg.DERPNode``."""

    name: str
    region_id: int
    host_name: str
    cert_name: str = ""
    ipv4: str = ""
    ipv6: str = ""
    stun_port: int = 0
    stun_only: bool = False
    derp_port: int = 0
    insecure_for_tests: bool = False
    stun_test_ip: str = ""
    can_port_80: bool = False

    def to_json(self) -> dict[str, Any]:
        """Returns the node as a JSON object with Go's field names and omitempty rules."""
        out: dict[str, Any] = {"Name": self.name, "RegionID": self.region_id, "HostName": self.host_name}
        for attr, key in _NODE_OPTIONAL:
            value = getattr(self, attr)
            if value:
                out[key] = value
        return out


# (attribute, JSON key) for the omitempty fields of DERPNode, in Go struct order.
_NODE_OPTIONAL: tuple[tuple[str, str], ...] = (
    ("cert_name", "CertName"),
    ("ipv4", "IPv4"),
    ("ipv6", "IPv6"),
    ("stun_port", "STUNPort"),
    ("stun_only", "STUNOnly"),
    ("derp_port", "DERPPort"),
    ("insecure_for_tests", "InsecureForTests"),
    ("stun_test_ip", "STUNTestIP"),
    ("can_port_80", "CanPort80"),
)

#: Every DERPNode attribute and its JSON key, in Go struct order.
NODE_JSON_KEYS: dict[str, str] = {
    "name": "Name",
    "region_id": "RegionID",
    "host_name": "HostName",
    **dict(_NODE_OPTIONAL),
}


@dataclass(frozen=True, slots=True)
class DerpRegion:
    """One ``tailcfg.DERPRegion``."""

    region_id: int
    region_code: str
    region_name: str
    nodes: tuple[DerpNode, ...] = ()
    latitude: float = 0.0
    longitude: float = 0.0
    avoid: bool = False
    no_measure_no_home: bool = False

    def to_json(self) -> dict[str, Any]:
        """Returns the region as a JSON object with Go's field names and omitempty rules."""
        out: dict[str, Any] = {
            "RegionID": self.region_id,
            "RegionCode": self.region_code,
            "RegionName": self.region_name,
        }
        for attr, key in _REGION_OPTIONAL:
            value = getattr(self, attr)
            if value:
                out[key] = value
        out["Nodes"] = [n.to_json() for n in self.nodes]
        return out


_REGION_OPTIONAL: tuple[tuple[str, str], ...] = (
    ("latitude", "Latitude"),
    ("longitude", "Longitude"),
    ("avoid", "Avoid"),
    ("no_measure_no_home", "NoMeasureNoHome"),
)

REGION_JSON_KEYS: dict[str, str] = {
    "region_id": "RegionID",
    "region_code": "RegionCode",
    "region_name": "RegionName",
    **dict(_REGION_OPTIONAL),
    "nodes": "Nodes",
}


@dataclass(frozen=True, slots=True)
class DerpMap:
    """One ``tailcfg.DERPMap``.  Regions are kept sorted by ID."""

    regions: tuple[DerpRegion, ...] = ()
    omit_default_regions: bool = False

    def to_json(self) -> dict[str, Any]:
        """Returns the map as a JSON object (``Regions`` is always an object, never null)."""
        out: dict[str, Any] = {
            "Regions": {str(r.region_id): r.to_json() for r in sorted(self.regions, key=lambda r: r.region_id)}
        }
        if self.omit_default_regions:
            out["omitDefaultRegions"] = True
        return out

    def to_json_bytes(self) -> bytes:
        """Returns the map as indented UTF-8 JSON with a trailing newline."""
        return (json.dumps(self.to_json(), indent="\t", ensure_ascii=False) + "\n").encode()

    def nodes(self) -> Iterable[DerpNode]:
        for region in self.regions:
            yield from region.nodes


@dataclass(frozen=True, slots=True)
class Problem:
    """One validation failure.

    ``region`` and ``node`` are indexes into the map being validated (``None`` when the
    problem is not about one region or node); ``attr`` is the dataclass attribute.
    """

    message: str
    attr: str = ""
    region: int | None = None
    node: int | None = None


class InvalidMapError(ValueError):
    """A map (or a node) failed validation.  ``problems`` lists every failure."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(p.message for p in self.problems))


def _check_ip(value: str, version: int) -> str | None:
    """Returns an error message, or None when ``value`` is fine for an IPv{version} field."""
    if value in ("", "none"):
        return None
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return f"must be an IPv{version} literal, \"\" (use DNS) or \"none\" (got {value!r})"
    if addr.version != version:
        return f"must be an IPv{version} address, not IPv{addr.version} (got {value!r})"
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def node_problems(node: DerpNode) -> list[Problem]:
    """Returns the problems of one node on its own (no uniqueness checks)."""
    out: list[Problem] = []

    def bad(attr: str, message: str) -> None:
        out.append(Problem(message, attr))

    for attr in ("name", "host_name", "cert_name", "ipv4", "ipv6", "stun_test_ip"):
        if not isinstance(getattr(node, attr), str):
            bad(attr, "must be a string")
    for attr in ("stun_only", "insecure_for_tests", "can_port_80"):
        if not isinstance(getattr(node, attr), bool):
            bad(attr, "must be true or false")
    if out:
        return out
    for attr in ("host_name", "cert_name", "ipv4", "ipv6", "stun_test_ip"):
        if not getattr(node, attr).isprintable():
            bad(attr, "must contain only printable characters")
    if not node.name:
        bad("name", "must not be empty (a short unique name such as \"900a\")")
    elif len(node.name) > 64 or not node.name.isprintable():
        bad("name", "must be at most 64 printable characters")
    if not node.host_name:
        bad("host_name", "must not be empty (the DNS name clients dial and check the certificate for)")
    elif len(node.host_name) > 253 or any(c.isspace() or c in "/?#@" for c in node.host_name):
        bad("host_name", f"must be a DNS name or an IP literal (got {node.host_name!r})")
    if not _is_int(node.region_id) or not 1 <= node.region_id <= MAX_REGION_ID:
        bad("region_id", f"must be an integer in 1..{MAX_REGION_ID} (got {node.region_id!r})")
    if not _is_int(node.derp_port) or not 0 <= node.derp_port <= 65535:
        bad("derp_port", f"must be in 0..65535, 0 meaning 443 (got {node.derp_port!r})")
    if not _is_int(node.stun_port) or not -1 <= node.stun_port <= 65535:
        bad("stun_port", f"must be in -1..65535, 0 meaning 3478 and -1 no STUN (got {node.stun_port!r})")
    for attr, version in (("ipv4", 4), ("ipv6", 6)):
        msg = _check_ip(getattr(node, attr), version)
        if msg:
            bad(attr, msg)
    if node.stun_test_ip:
        try:
            ipaddress.ip_address(node.stun_test_ip)
        except ValueError:
            bad("stun_test_ip", f"must be an IP literal or empty (got {node.stun_test_ip!r})")
    if node.cert_name.startswith(PIN_PREFIX):
        digest = node.cert_name[len(PIN_PREFIX):]
        if len(digest) != 64 or not _LOWER_HEX.issuperset(digest):
            bad("cert_name", "a sha256-raw: pin must be followed by 64 lower-case hex digits (spec P-23)")
    return out


def region_problems(region: DerpRegion) -> list[Problem]:
    """Returns the problems of a region's own fields (not its nodes)."""
    out: list[Problem] = []
    if not _is_int(region.region_id) or not 1 <= region.region_id <= MAX_REGION_ID:
        out.append(Problem(f"must be an integer in 1..{MAX_REGION_ID} (got {region.region_id!r})", "region_id"))
    if not isinstance(region.region_code, str) or not region.region_code:
        out.append(Problem("must be a non-empty string such as \"nyc\"", "region_code"))
    elif not region.region_code.isprintable() or len(region.region_code) > 64:
        out.append(Problem("must be at most 64 printable characters", "region_code"))
    if not isinstance(region.region_name, str):
        out.append(Problem("must be a string", "region_name"))
    elif not region.region_name.isprintable() or len(region.region_name) > 128:
        out.append(Problem("must be at most 128 printable characters", "region_name"))
    for attr, limit in (("latitude", 90.0), ("longitude", 180.0)):
        value = getattr(region, attr)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -limit <= value <= limit:
            out.append(Problem(f"must be a number in -{limit:g}..{limit:g} (got {value!r})", attr))
    return out


def map_problems(dmap: DerpMap) -> list[Problem]:
    """Returns every problem of a whole map: fields, unique region IDs and node names."""
    out: list[Problem] = []
    seen_ids: dict[int, int] = {}
    seen_names: dict[str, tuple[int, int]] = {}
    for ri, region in enumerate(dmap.regions):
        for p in region_problems(region):
            out.append(Problem(p.message, p.attr, ri))
        if region.region_id in seen_ids:
            out.append(Problem(f"region ID {region.region_id} is used twice", "region_id", ri))
        seen_ids.setdefault(region.region_id, ri)
        for ni, node in enumerate(region.nodes):
            for p in node_problems(node):
                out.append(Problem(p.message, p.attr, ri, ni))
            if node.region_id != region.region_id:
                out.append(Problem(f"must equal its region's ID {region.region_id}", "region_id", ri, ni))
            if node.name in seen_names:
                out.append(Problem(f"duplicate node name {node.name!r}: node names must be unique across the map",
                                   "name", ri, ni))
            seen_names.setdefault(node.name, (ri, ni))
    return out


def validate_map(dmap: DerpMap) -> DerpMap:
    """Returns ``dmap`` unchanged.

    Raises:
        InvalidMapError: listing every problem found.
    """
    problems = map_problems(dmap)
    if problems:
        raise InvalidMapError(problems)
    return dmap

