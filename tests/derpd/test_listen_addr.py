"""``-a`` read as derper reads it: Go's net.SplitHostPort refuses an address without a port
(``8443``, ``127.0.0.1``, ``[::1]``) and an unbracketed IPv6 address, and derper exits on it;
derpd refuses the same with one line and exit 2, as real processes, and still serves ``:port``,
``ip:port`` and ``[v6]:port`` (those run in a private network namespace, where ``:port`` binds
nothing reachable from outside)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from derpd.settings import SettingsError, split_listen_addr
from tests.deploy.conftest import missing  # a skip, or a failure under CI=true / DERPD_REQUIRE_INTEROP=1

DERPD = [sys.executable, "-m", "derpd"]


@pytest.mark.parametrize(("addr", "hint"), [
    ("8443", "write :8443 (every interface) or 127.0.0.1:8443"),
    ("127.0.0.1", "write 127.0.0.1:443"),
    ("[::1]", "write [::1]:443"),
    ("::1", "too many colons in address"),
    ("derp.example.com", "write derp.example.com:443"),
    ("127.0.0.1:", "write 127.0.0.1:443"),
    ("", "write :443"),
])
def test_an_address_without_a_port_is_refused_as_a_real_process(tmp_path: Path, addr: str, hint: str) -> None:
    key = tmp_path / "derper.key"
    r = subprocess.run([*DERPD, "serve", "-a", addr, "-c", str(key), "--certmode", "manual", "--hostname",
                        "127.0.0.1", "--certdir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and r.stdout == "", r.stderr
    assert r.stderr.startswith(f"derpd: -a {addr!r}: ") and hint in r.stderr, r.stderr
    assert not key.exists()  # refused before anything is written


@pytest.mark.parametrize(("addr", "want"), [
    (":443", ("", 443)), (":8443", ("", 8443)), ("127.0.0.1:8443", ("127.0.0.1", 8443)),
    ("[::1]:8443", ("::1", 8443)), ("localhost:https", ("localhost", 443)), ("[fe80::1%eth0]:0", ("fe80::1%eth0", 0)),
])
def test_addresses_with_a_port_parse_as_before(addr: str, want: tuple[str, int]) -> None:
    assert split_listen_addr(addr) == want


def test_go_s_errors_are_refused_in_process_too() -> None:
    for addr in ("8443", "127.0.0.1", "::1", "[::1]", "a:b:c", "[::1]x"):
        with pytest.raises(SettingsError):
            split_listen_addr(addr)


# Runs inside the namespace: starts the relay on ADDR, relays through it with `derpd check` at
# CHECK_HOST, then stops it with SIGTERM (a clean exit 0).
NETNS_DRIVER = r"""
import re, subprocess, sys
addr, check_host = sys.argv[1], sys.argv[2]
derpd = [sys.executable, "-m", "derpd"]
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
relay = subprocess.Popen([*derpd, "serve", "--dev", "-a", addr, "--stun-port", "-1"],
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
lines = []
for line in relay.stderr:
    lines.append(line)
    m = re.search(r"relay http://\S+:(\d+)/derp on (\S+)", line)
    if m:
        break
else:
    sys.exit("the relay exited: " + "".join(lines))
url = f"http://{check_host}:{m.group(1)}/derp"
r = subprocess.run([*derpd, "check", url, "-n", "10"], capture_output=True, text=True, timeout=60)
relay.terminate()
relay.stderr.close()
print(m.group(2), r.returncode, r.stdout.strip(), r.stderr.strip(), "relay exit", relay.wait(30))
"""


@pytest.mark.parametrize(("addr", "check_host", "bound"), [
    (":3340", "127.0.0.1", ":3340"),
    ("127.0.0.1:3340", "127.0.0.1", "127.0.0.1:3340"),
    ("[::1]:3340", "[::1]", "::1:3340"),
])
def test_addresses_with_a_port_serve_in_a_private_namespace(addr: str, check_host: str, bound: str) -> None:
    unshare = shutil.which("unshare")
    if unshare is None or shutil.which("ip") is None:
        missing("unshare (util-linux) and ip (iproute2) are needed for a private network namespace")
    argv = [unshare, *([] if os.geteuid() == 0 else ["-r"]), "-n", "--", sys.executable, "-c", NETNS_DRIVER,
            addr, check_host]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if r.returncode != 0 and "unshare" in r.stderr and "Operation not permitted" in r.stderr:
        missing(f"no private network namespace here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stdout + r.stderr
    where, code, *rest = r.stdout.split(" ", 2)
    assert code == "0" and "delivered 10/10" in r.stdout and r.stdout.rstrip().endswith("relay exit 0"), r.stdout
    assert where.rstrip(",").endswith(bound.rsplit(":", 1)[1]) and (bound.startswith(":") or
                                                                   where.startswith(bound.rsplit(":", 1)[0])), where
