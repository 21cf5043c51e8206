"""The coordinator's TOML config file: settings plus static regions and nodes.

Every error names the file, the line and the field, so a user can go straight to it::

    coordinator.toml:14: regions[0].nodes[1].derp_port: must be in 0..65535, 0 meaning 443 (got 70000)

``tomllib`` reports syntax errors with a line; for errors in values we find the line by
scanning the file for the table headers and ``key =`` lines (good enough for the usual
one-key-per-line style; inline tables fall back to the line of their table header).
See ``deploy/coordinator.example.toml`` for a complete example.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from derpd.keys import KeyFormatError, parse_mesh_key

from .model import DerpMap, DerpNode, DerpRegion, map_problems

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_NODE_TTL = 60.0
#: ``derpd serve --heartbeat-interval``'s default
DEFAULT_HEARTBEAT_INTERVAL = 15.0


class ConfigError(Exception):
    """The config file is unusable.  ``str()`` is ``file:line: field: message``."""

    def __init__(self, file: str, line: int | None, field_path: str, message: str) -> None:
        self.file = file
        self.line = line
        self.field = field_path
        self.message = message
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {field_path}: {message}" if field_path else f"{where}: {message}")


@dataclass(frozen=True, slots=True)
class TokenScope:
    """A registration token from ``[[tokens]]``: it may register only nodes of ``regions``
    (None: every region) and, when ``nodes`` is given, only nodes with those names.  ``name``
    is its file."""

    token: str = field(repr=False)
    regions: frozenset[int] | None = None
    nodes: frozenset[str] | None = None
    name: str = ""

    def refusal(self, region_id: int, node_name: str) -> tuple[str, str] | None:
        """Returns ``(reason, message)`` if this token may not register ``node_name`` in
        ``region_id`` (reason ``region`` or ``node``), else None."""
        if self.regions is not None and region_id not in self.regions:
            allowed = ", ".join(str(r) for r in sorted(self.regions))
            return "region", f"this token may register nodes of region {allowed} only, not of region {region_id}"
        if self.nodes is not None and node_name not in self.nodes:
            return "node", f"this token may register the nodes {', '.join(sorted(self.nodes))} only"
        return None


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    """Everything the coordinator needs, validated.  Durations are in seconds."""

    static_map: DerpMap = field(default_factory=DerpMap)
    listen: str = DEFAULT_LISTEN
    token: str | None = field(default=None, repr=False)  # for every region (token_file, --token-file)
    tokens: tuple[TokenScope, ...] = ()  # bound to regions and nodes ([[tokens]])
    probe_interval: float = 10.0
    probe_timeout: float = 8.0
    node_ttl: float = DEFAULT_NODE_TTL
    #: the relays' heartbeat before they hear the coordinator's (``derpd serve --heartbeat-interval``);
    #: node_ttl must be at least twice this.  Relays are told min(this, node_ttl / 3).
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    keep_region_when_down: bool = True
    ca_file: Path | None = None
    max_body_bytes: int = 16 * 1024
    max_registered_nodes: int = 256
    min_heartbeat_interval: float = 1.0
    history: int = 30
    status_refresh: int = 5
    #: the DERP probe logs in as a mesh peer with this key (derpprobe -mesh-psk-file), which
    #: admission (--verify-client-url, --allow-keys) lets through; per region it may differ.
    mesh_key: bytes | None = field(default=None, repr=False)
    region_mesh_keys: Mapping[int, bytes] = field(default_factory=dict, repr=False)
    #: networks a registered node may advertise besides public addresses
    probe_allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    #: registered nodes may advertise loopback addresses (``derpd dev``; never inferred from
    #: where a registration comes from, which behind a proxy on the same host is loopback)
    allow_loopback_nodes: bool = False
    body_timeout: float = 10.0
    max_parallel_probes: int = 32
    source: str = "<defaults>"

    @property
    def registration_enabled(self) -> bool:
        return self.token is not None or bool(self.tokens)

    def find_token(self, given: bytes) -> TokenScope | None:
        """Returns the token ``given`` matches (:data:`UNSCOPED` for ``token``), or None.
        Every token is compared, each in constant time, so the time taken says nothing about
        which one nearly matched."""
        found: TokenScope | None = None
        if self.token is not None and hmac.compare_digest(given, self.token.encode()):
            found = UNSCOPED
        for scope in self.tokens:
            if hmac.compare_digest(given, scope.token.encode()) and found is None:
                found = scope
        return found

    def mesh_key_for(self, region_id: int) -> bytes | None:
        """Returns the mesh key the DERP probe uses in a region (its own, else the global one)."""
        return self.region_mesh_keys.get(region_id, self.mesh_key)


#: what :meth:`CoordinatorConfig.find_token` returns for the unscoped token
UNSCOPED = TokenScope("", name="token_file")

# TOML key -> (model attribute, expected python types) for [[regions.nodes]].
_NODE_KEYS: dict[str, tuple[str, tuple[type, ...]]] = {
    "name": ("name", (str,)),
    "hostname": ("host_name", (str,)),
    "cert_name": ("cert_name", (str,)),
    "ipv4": ("ipv4", (str,)),
    "ipv6": ("ipv6", (str,)),
    "stun_port": ("stun_port", (int,)),
    "stun_only": ("stun_only", (bool,)),
    "derp_port": ("derp_port", (int,)),
    "insecure_for_tests": ("insecure_for_tests", (bool,)),
    "stun_test_ip": ("stun_test_ip", (str,)),
    "can_port_80": ("can_port_80", (bool,)),
}
_REGION_KEYS: dict[str, tuple[str, tuple[type, ...]]] = {
    "id": ("region_id", (int,)),
    "code": ("region_code", (str,)),
    "name": ("region_name", (str,)),
    "latitude": ("latitude", (int, float)),
    "longitude": ("longitude", (int, float)),
    "avoid": ("avoid", (bool,)),
    "no_measure_no_home": ("no_measure_no_home", (bool,)),
}
_NODE_ATTR_TO_KEY = {attr: key for key, (attr, _) in _NODE_KEYS.items()} | {"region_id": "id"}
_REGION_ATTR_TO_KEY = {attr: key for key, (attr, _) in _REGION_KEYS.items()}

_COORD_KEYS: dict[str, tuple[type, ...]] = {
    "listen": (str,),
    "token_file": (str,),
    "probe_interval": (int, float),
    "probe_timeout": (int, float),
    "node_ttl": (int, float),
    "heartbeat_interval": (int, float),
    "keep_region_when_down": (bool,),
    "omit_default_regions": (bool,),
    "ca_file": (str,),
    "max_body_bytes": (int,),
    "max_registered_nodes": (int,),
    "min_heartbeat_interval": (int, float),
    "history": (int,),
    "status_refresh": (int,),
    "mesh_key_file": (str,),
    "probe_allow": (list,),
    "allow_loopback_nodes": (bool,),
    "body_timeout": (int, float),
    "max_parallel_probes": (int,),
}

_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list"}

_HEADER_RE = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\s\"-]+?)\s*\]\]?\s*(#.*)?$")
_KEY_RE = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")


class _LineIndex:
    """Maps (table path, key) to the line where it appears, from a plain scan of the text."""

    def __init__(self, text: str) -> None:
        self.lines: dict[tuple[Any, ...], int] = {}
        counts: dict[str, int] = {}
        node_counts: dict[int, int] = {}
        table: tuple[Any, ...] = ()
        for lineno, line in enumerate(text.splitlines(), start=1):
            m = _HEADER_RE.match(line)
            if m:
                name = re.sub(r"\s+", "", m.group(2))
                if m.group(1) == "[[" and name == "regions":
                    i = counts.get("regions", 0)
                    counts["regions"] = i + 1
                    table = ("regions", i)
                elif m.group(1) == "[[" and name == "regions.nodes":
                    ri = counts.get("regions", 1) - 1
                    j = node_counts.get(ri, 0)
                    node_counts[ri] = j + 1
                    table = ("regions", ri, "nodes", j)
                else:
                    table = (name,)
                self.lines.setdefault(table, lineno)
                continue
            k = _KEY_RE.match(line)
            if k:
                self.lines.setdefault((*table, k.group(1)), lineno)

    def find(self, *path: Any) -> int | None:
        """Returns the line of ``path`` or of the nearest enclosing table that was found."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None


def _fmt_path(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Loader:
    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.index = _LineIndex(text)

    def error(self, path: tuple[Any, ...], message: str) -> ConfigError:
        return ConfigError(self.file, self.index.find(*path), _fmt_path(path), message)

    def typed(self, path: tuple[Any, ...], value: Any, types: tuple[type, ...]) -> Any:
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            want = " or ".join(_TYPE_WORDS[t] for t in types)
            raise self.error(path, f"must be {want} (got {type(value).__name__} {value!r})")
        return value

    def table(self, path: tuple[Any, ...], value: Any, allowed: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(path, "must be a table")
        for key in value:
            if key not in allowed:
                raise self.error((*path, key), f"unknown key; allowed keys are: {', '.join(sorted(allowed))}")
        return value


def load_config(path: str | Path) -> CoordinatorConfig:
    """Reads and validates a coordinator config file.

    Relative ``token_file`` and ``ca_file`` paths are relative to the config file.

    Raises:
        ConfigError: the file cannot be read, is not TOML, or has a bad value.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), None, "", f"cannot read the config file: {exc}") from None
    return parse_config(text, str(path), base_dir=path.parent)


def parse_config(text: str, file: str = "<config>", *, base_dir: Path | None = None) -> CoordinatorConfig:
    """Parses config text; see :func:`load_config`.

    Raises:
        ConfigError: naming file, line and field.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigError(file, int(m.group(1)) if m else None, "", f"not valid TOML: {exc}") from None
    ld = _Loader(file, text)
    ld.table((), doc, {"coordinator": 1, "regions": 1, "tokens": 1})
    coord = ld.table(("coordinator",), doc.get("coordinator", {}), _COORD_KEYS)
    opts: dict[str, Any] = {}
    for key, types in _COORD_KEYS.items():
        if key in coord:
            opts[key] = ld.typed(("coordinator", key), coord[key], types)

    base = base_dir or Path(".")
    kw: dict[str, Any] = {"source": file}
    if "listen" in opts:
        kw["listen"] = opts["listen"]
    for key in ("probe_interval", "probe_timeout", "node_ttl", "heartbeat_interval", "min_heartbeat_interval",
                "body_timeout"):
        if key in opts:
            value = float(opts[key])
            if not math.isfinite(value) or value <= 0 or value > 86400:
                raise ld.error(("coordinator", key), f"must be a number of seconds in (0, 86400] (got {value!r})")
            kw[key] = value
    interval = kw.get("probe_interval", 10.0)
    if "probe_timeout" not in kw:
        kw["probe_timeout"] = round(interval * 0.8, 3)
    elif kw["probe_timeout"] > interval:
        raise ld.error(("coordinator", "probe_timeout"), f"must not exceed probe_interval ({interval:g} s)")
    if "node_ttl" in kw and kw["node_ttl"] < kw.get("min_heartbeat_interval", 1.0):
        raise ld.error(("coordinator", "node_ttl"), "must be at least min_heartbeat_interval")
    heartbeat = kw.get("heartbeat_interval", DEFAULT_HEARTBEAT_INTERVAL)
    if heartbeat < kw.get("min_heartbeat_interval", 1.0):
        raise ld.error(("coordinator", "heartbeat_interval"), "must be at least min_heartbeat_interval")
    ttl = kw.get("node_ttl", DEFAULT_NODE_TTL)
    if ttl < 2 * heartbeat:
        where = ("coordinator", "node_ttl") if "node_ttl" in kw else ("coordinator", "heartbeat_interval")
        raise ld.error(where, f"node_ttl must be at least twice heartbeat_interval "
                              f"({ttl:g} s < 2 x {heartbeat:g} s), or registered nodes drop out between "
                              f"heartbeats: set node_ttl = {2 * heartbeat:g} or more, or heartbeat_interval = "
                              f"{ttl / 2:g} and start the relays with --heartbeat-interval {ttl / 2:g}s")
    for key, lo, hi in (("max_body_bytes", 1024, 1 << 20), ("max_registered_nodes", 0, 100_000),
                        ("history", 1, 1000), ("status_refresh", 1, 3600), ("max_parallel_probes", 1, 1024)):
        if key in opts:
            if not lo <= opts[key] <= hi:
                raise ld.error(("coordinator", key), f"must be in {lo}..{hi} (got {opts[key]})")
            kw[key] = opts[key]
    for key in ("keep_region_when_down", "allow_loopback_nodes"):
        if key in opts:
            kw[key] = opts[key]
    if "token_file" in opts:
        kw["token"] = read_token_file(base / opts["token_file"], lambda msg: ld.error(("coordinator", "token_file"), msg))
    if "mesh_key_file" in opts:
        kw["mesh_key"] = read_mesh_key_file(base / opts["mesh_key_file"],
                                            lambda msg: ld.error(("coordinator", "mesh_key_file"), msg))
    if "probe_allow" in opts:
        nets = []
        for i, text in enumerate(opts["probe_allow"]):
            try:
                if not isinstance(text, str):
                    raise TypeError(text)
                nets.append(ipaddress.ip_network(text, strict=False))
            except (ValueError, TypeError):
                raise ld.error(("coordinator", "probe_allow"),
                               f"entry {i} must be a CIDR such as \"10.0.0.0/8\" (got {text!r})") from None
        kw["probe_allow"] = tuple(nets)
    if "ca_file" in opts:
        ca = base / opts["ca_file"]
        if not ca.is_file():
            raise ld.error(("coordinator", "ca_file"), f"no such file: {ca} (give a PEM bundle of CA certificates)")
        kw["ca_file"] = ca

    regions_raw = doc.get("regions", [])
    if not isinstance(regions_raw, list):
        raise ld.error(("regions",), "must be an array of tables: write [[regions]]")
    regions: list[DerpRegion] = []
    region_mesh_keys: dict[int, bytes] = {}
    for ri, raw in enumerate(regions_raw):
        rpath: tuple[Any, ...] = ("regions", ri)
        rt = ld.table(rpath, raw, {**_REGION_KEYS, "nodes": 1, "mesh_key_file": 1})
        for key in ("id", "code"):
            if key not in rt:
                raise ld.error((*rpath, key), "is required")
        rargs = {attr: ld.typed((*rpath, key), rt[key], types)
                 for key, (attr, types) in _REGION_KEYS.items() if key in rt}
        rargs.setdefault("region_name", rt["code"])
        if "mesh_key_file" in rt:
            file_name = ld.typed((*rpath, "mesh_key_file"), rt["mesh_key_file"], (str,))
            region_mesh_keys[rargs["region_id"]] = read_mesh_key_file(
                base / file_name, lambda msg: ld.error((*rpath, "mesh_key_file"), msg))
        nodes_raw = rt.get("nodes", [])
        if not isinstance(nodes_raw, list):
            raise ld.error((*rpath, "nodes"), "must be an array of tables: write [[regions.nodes]]")
        nodes = []
        for ni, nraw in enumerate(nodes_raw):
            npath = (*rpath, "nodes", ni)
            nt = ld.table(npath, nraw, _NODE_KEYS)
            for key in ("name", "hostname"):
                if key not in nt:
                    raise ld.error((*npath, key), "is required")
            nargs = {attr: ld.typed((*npath, key), nt[key], types)
                     for key, (attr, types) in _NODE_KEYS.items() if key in nt}
            nodes.append(DerpNode(region_id=rargs["region_id"], **nargs))
        regions.append(DerpRegion(nodes=tuple(nodes), **rargs))
    dmap = DerpMap(tuple(regions), omit_default_regions=opts.get("omit_default_regions", False))
    problems = map_problems(dmap)
    if problems:
        p = problems[0]
        if p.node is not None:
            path: tuple[Any, ...] = ("regions", p.region, "nodes", p.node, _NODE_ATTR_TO_KEY.get(p.attr, p.attr))
        else:
            path = ("regions", p.region, _REGION_ATTR_TO_KEY.get(p.attr, p.attr))
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ld.error(path, p.message + more)
    kw["tokens"] = _parse_tokens(ld, doc.get("tokens", []), base, kw.get("token"))
    return CoordinatorConfig(static_map=dmap, region_mesh_keys=region_mesh_keys, **kw)


_TOKEN_KEYS = {"file": 1, "regions": 1, "nodes": 1}


def _parse_tokens(ld: _Loader, raw: Any, base: Path, unscoped: str | None) -> tuple[TokenScope, ...]:
    """``[[tokens]]``: ``file`` (required), ``regions`` (required, region IDs), ``nodes`` (names)."""
    if not isinstance(raw, list):
        raise ld.error(("tokens",), "must be an array of tables: write [[tokens]]")
    out: list[TokenScope] = []
    seen = {unscoped} if unscoped else set()
    for i, entry in enumerate(raw):
        path: tuple[Any, ...] = ("tokens", i)
        t = ld.table(path, entry, _TOKEN_KEYS)
        for key in ("file", "regions"):
            if key not in t:
                what = ("the token's file (head -c 32 /dev/urandom | base64 > FILE)" if key == "file"
                        else "the region IDs this token may register nodes in, e.g. regions = [901]")
                raise ld.error((*path, key), f"is required: {what}")
        file_name = ld.typed((*path, "file"), t["file"], (str,))
        regions = ld.typed((*path, "regions"), t["regions"], (list,))
        if not regions or not all(isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= 1 << 31
                                  for r in regions):
            raise ld.error((*path, "regions"),
                           f"must be a non-empty list of region IDs such as [901] (got {regions!r})")
        nodes = None
        if "nodes" in t:
            names = ld.typed((*path, "nodes"), t["nodes"], (list,))
            if not names or not all(isinstance(n, str) and n for n in names):
                raise ld.error((*path, "nodes"), f"must be a non-empty list of node names such as [\"901a\"] "
                                                 f"(got {names!r})")
            nodes = frozenset(names)
        token = read_token_file(base / file_name, lambda msg, p=path: ld.error((*p, "file"), msg))
        if token in seen:
            raise ld.error((*path, "file"), f"{base / file_name} holds the same token as another entry; "
                                            "give every scope its own token")
        seen.add(token)
        out.append(TokenScope(token, frozenset(regions), nodes, file_name))
    return tuple(out)


def read_mesh_key_file(path: Path, error: Any) -> bytes:
    """Returns the mesh key in ``path`` (64 hex digits, as ``derper -mesh-psk-file``).

    Raises:
        what ``error(message)`` returns: missing, unreadable or not a key.
    """
    try:
        return parse_mesh_key(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read the mesh key file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    except KeyFormatError as exc:
        raise error(f"{path}: the mesh key must be 64 hex digits, as in the relays' --mesh-psk-file ({exc})") from None


def read_token_file(path: Path, error: Any = None) -> str:
    """Returns the shared registration token (the file's content, stripped).

    Raises:
        ConfigError (or what ``error(message)`` returns): missing, unreadable or too short.
    """
    def fail(msg: str) -> Exception:
        return error(msg) if error else ConfigError(str(path), None, "token_file", msg)

    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"cannot read the token file {path}: {exc}") from None
    if len(token) < 16:
        raise fail(f"the token in {path} is shorter than 16 characters; "
                   "create one with: head -c 32 /dev/urandom | base64 > FILE")
    return token
