"""``POST /v1/nodes`` bodies: the node's DERPNode entry plus its region and key.

A registration is a JSON object whose keys are Tailscale's DERPNode field names, plus
``RegionCode``/``RegionName`` (needed when the region is not in the config) and
``PublicKey`` (``nodekey:<hex>``, shown on the status page)::

    {"Name": "901a", "RegionID": 901, "RegionCode": "edge", "HostName": "derp.example.net",
     "IPv4": "198.51.100.7", "DERPPort": 443, "STUNPort": 3478,
     "CertName": "sha256-raw:<64 hex>", "PublicKey": "nodekey:<64 hex>"}

Keys are case-sensitive and unknown keys are refused, so typos fail loudly instead of
publishing a half-configured node.  ``InsecureForTests: true`` is refused: a registration
must never turn certificate checks off for every client of the map.  ``Draining: true``
announces maintenance: the coordinator takes the node out of the map (or marks its region
``NoMeasureNoHome`` when it is the region's last healthy node) while the relay keeps
serving; the relay's next registration without it ends the drain.  Every failure is a
:class:`RegistrationError` with an HTTP status and a message naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from derpd.keys import KeyFormatError, NodePublic

from .model import NODE_JSON_KEYS, DerpNode, node_problems


class RegistrationError(Exception):
    """A registration was refused.  ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, field: str = "", *, reason: str = "") -> None:
        self.status = status
        self.message = message
        self.field = field
        self.reason = reason  # the metrics' label, when the status alone does not say it
        super().__init__(f"{field}: {message}" if field else message)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message}
        if self.field:
            out["field"] = self.field
        return out


@dataclass(frozen=True, slots=True)
class Registration:
    """A validated registration."""

    node: DerpNode
    region_code: str = ""
    region_name: str = ""
    public_key: str = ""
    draining: bool = False  # "Draining": true, the relay is about to stop for maintenance


_TYPES: dict[str, tuple[type, ...]] = {
    "Name": (str,), "RegionID": (int,), "HostName": (str,), "CertName": (str,),
    "IPv4": (str,), "IPv6": (str,), "STUNPort": (int,), "STUNOnly": (bool,), "DERPPort": (int,),
    "InsecureForTests": (bool,), "STUNTestIP": (str,), "CanPort80": (bool,),
    "RegionCode": (str,), "RegionName": (str,), "PublicKey": (str,), "Draining": (bool,),
}
_REQUIRED = ("Name", "RegionID", "HostName")
_KEY_TO_ATTR = {key: attr for attr, key in NODE_JSON_KEYS.items()}
_WORD = {str: "a string", int: "an integer", bool: "true or false"}


def parse_registration(body: bytes) -> Registration:
    """Parses and validates a registration body.

    Raises:
        RegistrationError: 400 with a message naming the bad field.
    """
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise RegistrationError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RegistrationError(400, "the body must be a JSON object with the node's DERPNode fields")
    unknown = sorted(k for k in doc if k not in _TYPES)
    if unknown:
        raise RegistrationError(400, f"unknown field; allowed fields are {', '.join(_TYPES)}", unknown[0][:64])
    for key in _REQUIRED:
        if key not in doc:
            raise RegistrationError(400, "is required", key)
    for key, value in doc.items():
        types = _TYPES[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise RegistrationError(400, f"must be {_WORD[types[0]]}", key)
    if doc.get("InsecureForTests"):
        raise RegistrationError(400, "is never accepted from a registration (it turns off certificate checks "
                                     "for every client); give the relay a certificate, or a CertName pin",
                                "InsecureForTests")
    if len(doc["RegionCode"] if "RegionCode" in doc else "") > 64 or len(doc.get("RegionName", "")) > 128:
        raise RegistrationError(400, "RegionCode/RegionName too long (64/128 characters at most)")
    if "RegionCode" in doc and not doc["RegionCode"]:
        raise RegistrationError(400, "must not be empty when given", "RegionCode")
    public_key = doc.get("PublicKey", "")
    if public_key:
        try:
            if NodePublic.parse(public_key).is_zero():
                raise RegistrationError(400, "must not be the zero key", "PublicKey")
        except KeyFormatError as exc:
            raise RegistrationError(400, f"{exc}", "PublicKey") from None
    node = DerpNode(**{_KEY_TO_ATTR[k]: v for k, v in doc.items() if k in _KEY_TO_ATTR})
    problems = node_problems(node)
    if problems:
        p = problems[0]
        raise RegistrationError(400, p.message, NODE_JSON_KEYS.get(p.attr, p.attr))
    return Registration(node, doc.get("RegionCode", ""), doc.get("RegionName", ""), public_key,
                        doc.get("Draining", False))
