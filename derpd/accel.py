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


def data_plane() -> str:
    """Which packet path this process runs, for ``derpd serve``'s start-up line:
    ``compiled (...)`` naming the extensions loaded, ``partly compiled (...)``, or
    ``pure Python (why)``, with stund's own selector for its extension."""
    from stund import accel as stund_accel

    if PURE:
        return "pure Python (DERPD_PURE is set)"
    loaded = {"derpd._dataplane": dataplane is not None, "derpd._speedups": speedups is not None,
              "stund._mmsg": stund_accel.mmsg is not None}
    have = [name for name, ok in loaded.items() if ok]
    lack = [name for name, ok in loaded.items() if not ok]
    if not lack:
        return f"compiled ({', '.join(have)})"
    if not have:
        return "pure Python (no compiled extension is built: install a wheel built with a C compiler)"
    return f"partly compiled ({', '.join(have)}; not built: {', '.join(lack)})"


__all__ = ["PURE", "data_plane", "dataplane", "speedups"]
