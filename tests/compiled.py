"""The optional compiled modules, for the tests that check them.

``optional("derpd._dataplane")`` is the module, or None when it was not built (no C compiler,
not Linux, or ``DERPD_PURE=1`` at build time); with ``DERPD_REQUIRE_SPEEDUPS=1`` (CI's compiled
pass) a missing module is an error, so the compiled pass can never pass by skipping.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def optional(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("DERPD_REQUIRE_SPEEDUPS") == "1":
            raise ImportError(f"{name} is not built: install a C compiler (gcc) and reinstall derpd") from None
        return None
