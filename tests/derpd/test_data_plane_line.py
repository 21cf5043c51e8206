"""``derpd serve`` names the packet path it runs in one start-up line (``accel.data_plane``):
compiled, partly compiled or pure Python, and why."""

from __future__ import annotations

import os

import pytest
import stund.accel

from derpd import accel

COMPILED = "compiled (derpd._dataplane, derpd._speedups, stund._mmsg)"


def test_the_line_names_the_path_this_process_runs() -> None:
    if os.environ.get("DERPD_PURE", "") not in ("", "0"):
        assert accel.data_plane() == "pure Python (DERPD_PURE is set)"
    elif os.environ.get("DERPD_REQUIRE_SPEEDUPS") == "1":
        assert accel.data_plane() == COMPILED
    else:
        assert accel.data_plane().startswith(("compiled (", "partly compiled (", "pure Python ("))


@pytest.mark.parametrize("built, line", [
    ((True, True, True), COMPILED),
    ((True, False, True), "partly compiled (derpd._speedups, stund._mmsg; not built: derpd._dataplane)"),
    ((False, False, False),
     "pure Python (no compiled extension is built: install a wheel built with a C compiler)"),
], ids=["all", "no _dataplane", "none"])
def test_each_mix_of_built_extensions(monkeypatch: pytest.MonkeyPatch, built: tuple[bool, bool, bool],
                                      line: str) -> None:
    speedups, dataplane, mmsg = built
    monkeypatch.setattr(accel, "PURE", False)
    monkeypatch.setattr(accel, "speedups", object() if speedups else None)
    monkeypatch.setattr(accel, "dataplane", object() if dataplane else None)
    monkeypatch.setattr(stund.accel, "mmsg", object() if mmsg else None)
    assert accel.data_plane() == line
    monkeypatch.setattr(accel, "PURE", True)
    assert accel.data_plane() == "pure Python (DERPD_PURE is set)"
