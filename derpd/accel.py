"""The optional compiled speed-ups, or ``None``.

``derpd._speedups`` (derpd/_speedups.c) is built by setup.py when a C compiler is there.
Every caller keeps a pure-Python path that behaves the same; ``DERPD_PURE=1`` in the
environment forces that path even when the module was built (CI runs the suite both ways).
"""

from __future__ import annotations

import os
from types import ModuleType

PURE = os.environ.get("DERPD_PURE", "") not in ("", "0")


def _load() -> ModuleType | None:
    if PURE:
        return None
    try:
        from . import _speedups  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _speedups


speedups: ModuleType | None = _load()

__all__ = ["PURE", "speedups"]
