"""``--allow-keys FILE``: a static allow-list, reloaded on SIGHUP and when the file changes."""

from __future__ import annotations

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from derpd.admission import AdmissionConfigError, AllowList, parse_allow_keys
from derpd.keys import NodePrivate

from .conftest import logs_in


def write(path, *keys, extra: str = "") -> None:
    path.write_text("# tailnet keys\n" + "".join(f"{k.public}  # a device\n" for k in keys) + extra)


async def test_only_listed_keys_log_in_and_reload_applies(relay, tmp_path):
    a, b = NodePrivate.generate(), NodePrivate.generate()
    path = tmp_path / "allow"
    write(path, a)
    allow = AllowList(path)
    allow.load()
    relay.server.admission_checks.append(allow.check)
    relay.server.reload_hooks.append(allow.reload)
    with trio.fail_after(10):
        assert await logs_in(relay, a)
        assert not await logs_in(relay, b)
        assert relay.server.stats.admission_refused["not_allowed"] == 1
        write(path, a, b)
        relay.server.reload()  # what SIGHUP does
        assert await logs_in(relay, b)
        # A broken file keeps the current list.
        path.write_text("nodekey:nothex\n")
        assert allow.reload() is False
        assert await logs_in(relay, b)


async def test_file_change_is_picked_up_without_sighup(relay, tmp_path, nursery):
    a = NodePrivate.generate()
    path = tmp_path / "allow"
    write(path)
    allow = AllowList(path)
    allow.load()
    relay.server.admission_checks.append(allow.check)
    nursery.start_soon(allow.watch, 0.01)
    with trio.fail_after(10):
        assert not await logs_in(relay, a)
        write(path, a, extra="\n")
        while a.public.raw not in allow.keys:  # the watch notices the change
            await trio.sleep(0.01)
        assert await logs_in(relay, a)


def test_parse_accepts_comments_blank_lines_and_upper_case():
    k = NodePrivate.generate().public
    text = f"\n# comment\n  {str(k).upper().replace('NODEKEY', 'nodekey')}  # phone\n\n{k}\n"
    assert parse_allow_keys(text) == frozenset({k.raw})


def test_bad_line_names_its_number(tmp_path):
    with pytest.raises(AdmissionConfigError, match="line 2"):
        parse_allow_keys("# ok\nprivkey:00\n")
    with pytest.raises(AdmissionConfigError, match="--allow-keys"):
        AllowList(tmp_path / "missing").load()


@given(st.text(max_size=300))
def test_garbage_raises_only_our_error(text):
    try:
        parse_allow_keys(text)
    except AdmissionConfigError:
        pass
