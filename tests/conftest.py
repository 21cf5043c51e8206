"""Shared fixtures.  Servers start on 127.0.0.1 port 0; every I/O test runs under trio.fail_after."""

from __future__ import annotations

import traceback
from collections.abc import Iterator

import pytest


def _leaves(group: BaseExceptionGroup) -> Iterator[BaseException]:
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            yield from _leaves(e)
        else:
            yield e


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep the reason of a skip in an async test.

    pytest-trio turns a ``pytest.skip("install X")`` that reaches it inside trio's exception
    group into a bare ``pytest.skip()``, so the summary said only ``Skipped``; the original,
    with its message and location, is in the context of the bare one."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if not report.skipped or call.excinfo is None or not isinstance(report.longrepr, tuple):
        return
    bare = call.excinfo.value
    group = bare.__context__
    if getattr(bare, "msg", None) or not isinstance(group, BaseExceptionGroup):
        return
    skips = [e for e in _leaves(group) if isinstance(e, pytest.skip.Exception) and e.msg]
    if len(skips) == 1:
        frames = [f for f in traceback.extract_tb(skips[0].__traceback__) if "_pytest" not in f.filename]
        where = frames[-1] if frames else None
        path, lineno = (where.filename, where.lineno) if where else report.longrepr[:2]
        report.longrepr = (path, lineno, f"Skipped: {skips[0].msg}")
