"""stund's optional compiled helper, or ``None``: the one place stund chooses its path.

``stund._mmsg`` (stund/_mmsg.c, Linux) is built by setup.py when a C compiler is there; the
pure-Python path behaves the same.  ``STUND_PURE=1``, or ``DERPD_PURE=1`` (the switch the
relay's tests and CI use for both packages), forces the pure path even when it was built.
stund does not import derpd, so it reads the switch itself.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def _set(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


PURE = _set("STUND_PURE") or _set("DERPD_PURE")


def _load(name: str) -> ModuleType | None:
    if PURE:
        return None
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ImportError:
        return None


mmsg: ModuleType | None = _load("_mmsg")

__all__ = ["PURE", "mmsg"]
