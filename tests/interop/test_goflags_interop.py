"""derpd reads derper's command lines as Go's flag package does: the same command lines parsed
by Go (derpinterop goflags, with derper's flag names and types) and by derpd's reader must set
the same flags to the same values, stop at the same place, and fail on the same input."""

from __future__ import annotations

import json

from derpd.cli import serve
from derpd.derperflags import DERPER_FLAGS, go_flags
from derpd.goflags import GoFlagError, normalise, parse_bool, parse_duration, parse_float, parse_int

ACCEPTED = [f for f in DERPER_FLAGS if f.status == "same"]

CASES = [
    ["-a", ":443"], ["--a=:443"], ["-a=:443", "--a", "[::1]:8443"],
    ["-certmode=manual"], ["--certmode", "manual", "-hostname", "derp.example.com"],
    ["-c", "-weird"], ["-c=x=y"], ["-home="],
    ["-stun"], ["-stun=false"], ["--stun=F"], ["-stun=0", "-stun"], ["-derp=TRUE", "-verify-clients=t"],
    ["-stun", "false", "-a", ":1"], ["-verify-clients", "false"],
    ["-http-port", "-1"], ["-http-port=0x50"], ["-http-port=010"], ["-http-port=0b11"], ["-http-port=0o17"],
    ["-http-port=+80"], ["-http-port=08"], ["-http-port=1_000"], ["-http-port=0x_50"], ["-http-port=eighty"],
    ["-http-port=9223372036854775808"],
    ["-tcp-user-timeout=15s"], ["-tcp-user-timeout", "500ms"], ["-tcp-keepalive-time=1h30m"],
    ["-tcp-keepalive-time=1.5h"], ["-tcp-write-timeout=0"], ["-tcp-write-timeout=.5s"], ["-tcp-write-timeout=1m0.5s"],
    ["-tcp-write-timeout=300us"], ["-tcp-write-timeout=2x"], ["-tcp-write-timeout="], ["-tcp-write-timeout=1e3s"],
    ["-accept-connection-limit=inf"], ["-accept-connection-limit=+Inf"], ["-accept-connection-limit=2.5e2"],
    ["-accept-connection-limit=0x1p4"], ["-accept-connection-limit=1_000"], ["-accept-connection-limit=ten"],
    ["-a", ":1", "--", "-stun=false"], ["-a", ":1", "-", "-stun"], ["-a", ":1", "stray", "-stun"],
    ["-http-port=1__0"], ["-http-port=_1"], ["-http-port=0_17"], ["-tcp-user-timeout=-1s"],
    ["-tcp-write-timeout=1h1h"], ["-tcp-write-timeout=1.000000001s"], ["-stun="], ["-accept-connection-limit=-Infinity"],
    ["---a=:1"], ["-=x"], ["--=x"], ["-nope"], ["-http-port"], ["-stun=yes"], ["-"], ["--"],
]


def derpd_view(argv: list[str]) -> dict[str, object]:
    """What derpd's reader makes of ARGV, in derpinterop's terms."""
    table = go_flags(serve)
    try:
        canonical, rest = normalise(argv, table)
    except GoFlagError as e:
        return {"error": str(e)}
    by_option = {}
    for flag in ACCEPTED:
        entry = table[flag.name]
        by_option[entry.on] = flag
        if entry.off:
            by_option[entry.off] = flag
    parse = {"string": str, "int": parse_int, "float": parse_float, "duration": parse_duration}
    got: dict[str, object] = {}
    it = iter(canonical)
    for item in it:
        option, eq, value = item.partition("=")
        flag = by_option[option]
        if flag.kind == "bool":
            got[flag.name] = option == table[flag.name].on
            continue
        if not eq:  # a short option: the value is the next item
            value = next(it)
        try:
            parsed = parse[flag.kind](value)
        except ValueError as e:
            return {"error": str(e)}
        got[flag.name] = f"{parsed:+}".replace("inf", "Inf") if parsed in (float("inf"), float("-inf")) else parsed
    return {"set": got, "rest": rest}


async def test_derpd_reads_command_lines_as_go_does(scenario, tmp_path):
    spec = {"flags": [{"name": f.name, "kind": f.kind} for f in ACCEPTED], "cases": CASES}
    (tmp_path / "cases.json").write_text(json.dumps(spec))
    go = (await scenario("goflags", "--cases", str(tmp_path / "cases.json"))).data["results"]
    assert len(go) == len(CASES)
    mismatches = []
    for argv, want in zip(CASES, go, strict=True):
        got = derpd_view(argv)
        if "error" in want or "error" in got:
            if ("error" in want) != ("error" in got):
                mismatches.append((argv, want, got))
        elif got != want:
            mismatches.append((argv, want, got))
    assert not mismatches, "\n".join(f"{argv}: Go {want} derpd {got}" for argv, want, got in mismatches)
    assert parse_bool("T") is True  # the reader's own value parsers are the ones compared here
