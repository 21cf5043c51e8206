"""One relay process for the whole attack suite; its RSS and descriptors are read from /proc."""

from __future__ import annotations

import pytest

from .relay_process import RelayProcess, raise_open_files_limit, start_relay_popen, stop_relay_popen

# Test process: up to 5,000 client sockets at once plus the usual; the relay inherits the limit.
OPEN_FILES = 16384


@pytest.fixture(scope="module")
def relay_proc() -> RelayProcess:
    have = raise_open_files_limit(OPEN_FILES)
    if have < 6000:
        pytest.fail(f"the attack suite needs ~6000 open files, the hard limit allows {have}: raise ulimit -Hn")
    relay = start_relay_popen()
    yield relay
    stop_relay_popen(relay)
