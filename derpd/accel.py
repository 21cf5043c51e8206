"""The optional compiled speed-ups, or ``None``.

``derpd._speedups`` (derpd/_speedups.c) and, on Linux, ``derpd._dataplane``
(derpd/_dataplane.c, the packet path of plain-TCP and TLS clients) are built by setup.py when a C compiler is there.
Every caller keeps a pure-Python path that behaves the same; ``DERPD_PURE=1`` in the
environment forces that path even when the module was built (CI runs the suite both ways).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

PURE = os.environ.get("DERPD_PURE", "") not in ("", "0")


def _load(name: str) -> ModuleType | None:
    if PURE:
        return None
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ImportError:
        return None


speedups: ModuleType | None = _load("_speedups")
dataplane: ModuleType | None = _load("_dataplane")

__all__ = ["PURE", "dataplane", "speedups"]
