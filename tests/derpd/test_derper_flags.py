"""derper's command line: Go's flag syntax, derper's defaults, real-world derper command lines
resolving to the settings derper would use, and one-line errors (some as real processes)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from derpd import goflags
from derpd.cli import serve
from derpd.derperflags import (
    DERPER_FLAGS,
    FlagError,
    cert_settings,
    default_certdir,
    default_key_file,
    default_mesh_psk_file,
    go_flags,
)
from derpd.settings import SettingsError, split_host_port

DERPER_SOURCE = Path.home() / "go/pkg/mod/tailscale.com@v1.98.10/cmd/derper/derper.go"


def params(argv: list[str]) -> dict[str, object]:
    """What ``derpd serve ARGV`` parses to (click's parameters), without running anything."""
    with serve.make_context("serve", list(argv)) as ctx:
        return dict(ctx.params)


def resolved(argv: list[str]) -> dict[str, object]:
    """The settings derper would use for ARGV, as derpd resolves them."""
    p = params(argv)
    port = split_host_port(str(p["addr"]))[1]
    out: dict[str, object] = {
        "addr": p["addr"], "hostname": p["hostname"], "http_port": p["http_port"],
        "stun_port": p["stun_port"] if p["stun"] else -1, "derp": p["derp_enabled"],
        "certmode": p["certmode"], "verify_clients": p["verify_clients"],
        "verify_client_url": p["verify_client_url"] or "", "home": p["home"], "dev": p["dev"],
        "tcp_keepalive_time": p["tcp_keepalive_time"], "tcp_user_timeout": p["tcp_user_timeout"],
        "tcp_write_timeout": p["tcp_write_timeout"], "config": p["config"], "mesh_with": p["mesh_with"],
    }
    try:
        mode, certdir = cert_settings(str(p["certmode"]), p["certdir"], port)  # type: ignore[arg-type]
    except SettingsError as e:
        out["tls"] = f"error: {e}"
    else:
        out["tls"] = mode is not None
        out["certdir"] = certdir
    return out


DEFAULTS = {
    "addr": ":443", "hostname": "derp.tailscale.com", "http_port": 80, "stun_port": 3478, "derp": True,
    "certmode": "letsencrypt", "verify_clients": False, "verify_client_url": "", "home": "", "dev": False,
    "tcp_keepalive_time": 600.0, "tcp_user_timeout": 15.0, "tcp_write_timeout": 2.0, "config": None,
    "mesh_with": "",
}
ACME_TLS = {"tls": True}  # letsencrypt on port 443: ACME (derpd.acme); certdir: derper's default


def expect(**changes: object) -> dict[str, object]:
    return {**DEFAULTS, **changes}


# Each: where the line comes from, the command line (after the program name, shell words as the
# shell would pass them, with the environment's typical values filled in), and the settings.
REAL_WORLD = [
    ("Tailscale custom-DERP guide: derper --hostname", "--hostname=derp.example.com",
     expect(hostname="derp.example.com", **ACME_TLS)),
    ("derper README: a relay verifying clients with tailscaled",
     "--hostname=derp.example.com --verify-clients",
     expect(hostname="derp.example.com", verify_clients=True, **ACME_TLS)),
    ("community image (DERP_* variables), its defaults",
     "--hostname=your-hostname.com --certmode=letsencrypt --certdir=/app/certs --a=:443 --stun=true "
     "--stun-port=3478 --http-port=80 --verify-clients=false --verify-client-url=",
     expect(hostname="your-hostname.com", tls=True, certdir=Path("/app/certs"))),
    ("community image (DERP_* variables), manual certificates on a high port",
     "--hostname=derp.example.com --certmode=manual --certdir=/app/certs --a=:12345 --stun=true "
     "--stun-port=3478 --http-port=-1 --verify-clients=true --verify-client-url=",
     expect(hostname="derp.example.com", certmode="manual", addr=":12345", http_port=-1, verify_clients=True,
            tls=True, certdir=Path("/app/certs"))),
    ("community image (DERP_* variables), headscale admission behind a TLS proxy",
     "--hostname=derp.example.com --certmode=letsencrypt --certdir=/app/certs --a=:8080 --stun=false "
     "--stun-port=3478 --http-port=-1 --verify-clients=false "
     "--verify-client-url=https://headscale.example.com/verify",
     expect(hostname="derp.example.com", addr=":8080", stun_port=-1, http_port=-1, tls=False,
            certdir=Path("/app/certs"), verify_client_url="https://headscale.example.com/verify")),
    ("IP-address image: manual mode, self-signed for an IP hostname",
     "--hostname=203.0.113.7 --certmode=manual --certdir=./certs/ --a=:443 --stun=true --stun-port=3478 "
     "--http-port=-1 --verify-clients=false",
     expect(hostname="203.0.113.7", certmode="manual", http_port=-1, tls=True, certdir=Path("certs"))),
    ("entrypoint with Go single-dash flags and separate values",
     "-hostname derp.example.com -certdir /certs -certmode manual -a :443 -http-port 80 -stun-port 3478 "
     "-stun -derp",
     expect(hostname="derp.example.com", certmode="manual", tls=True, certdir=Path("/certs"))),
    ("systemd unit from a blog post", "-hostname=derp.example.com -certmode=manual -certdir=/root/certdir "
     "-a=:12345 -http-port=-1 -stun-port=3478 -verify-clients",
     expect(hostname="derp.example.com", certmode="manual", addr=":12345", http_port=-1, verify_clients=True,
            tls=True, certdir=Path("/root/certdir"))),
    ("Go durations and a decommissioning relay (derp off)",
     "-c /var/lib/derper/derper.key -a :8080 --derp=false --tcp-keepalive-time=1h30m --tcp-user-timeout 500ms "
     "-tcp-write-timeout=0",
     expect(config=Path("/var/lib/derper/derper.key"), addr=":8080", derp=False, tcp_keepalive_time=5400.0,
            tcp_user_timeout=0.5, tcp_write_timeout=0.0, tls=False)),
    ("derper --dev", "-dev", expect(dev=True, **ACME_TLS)),
    ("a mesh pair", "--hostname=derp1.example.com --a=:8443 --certmode=manual --certdir=/etc/derp "
     "--mesh-with=derp1.example.com,derp2.example.com/10.0.0.2 --home=blank --http-port=-1",
     expect(hostname="derp1.example.com", addr=":8443", certmode="manual", tls=True, certdir=Path("/etc/derp"),
            mesh_with="derp1.example.com,derp2.example.com/10.0.0.2", home="blank", http_port=-1)),
    ("plain seconds still work, booleans in every spelling",
     "-a :80 --tcp-user-timeout 20 --stun=F --derp=TRUE --verify-clients=0 --verify-client-url-fail-open=f",
     expect(addr=":80", tcp_user_timeout=20.0, stun_port=-1, tls=False)),
    ("everything after -- is not read (derper ignores it; derpd has none)", "-a :80 --",
     expect(addr=":80", tls=False)),
]


@pytest.mark.parametrize(("source", "line", "want"), REAL_WORLD, ids=[r[0] for r in REAL_WORLD])
def test_real_world_derper_command_lines(source, line, want, monkeypatch):
    monkeypatch.setenv("HOME", "/home/op")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    got = resolved(shlex.split(line))
    if isinstance(want["tls"], str):
        assert str(got["tls"]).startswith(want["tls"]), got["tls"]
        want = {k: v for k, v in want.items() if k != "tls"}
        got = {k: v for k, v in got.items() if k not in ("tls", "certdir")}
    want.setdefault("certdir", Path("/home/op/.cache/tailscale/derper-certs"))
    got.setdefault("certdir", want["certdir"])
    assert got == want


def test_certmode_manual_is_never_read_as_dash_c():
    for line in ("-certmode=manual", "-certmode manual", "--certmode=manual", "-c=k -certmode=manual"):
        p = params(shlex.split(line))
        assert p["certmode"] == "manual"
        assert p["config"] in (None, Path("k")), line


def test_a_bool_never_takes_the_next_argument():
    # derper would read -verify-clients as true and stop at "false", silently ignoring -a;
    # derpd refuses the whole line instead.
    with pytest.raises(FlagError, match="unexpected argument 'false'"):
        params(["-verify-clients", "false", "-a", ":8443"])


def test_a_value_flag_takes_the_next_argument_whatever_it_looks_like():
    assert params(["--stun-port", "-1"])["stun_port"] == -1
    assert params(["-home", "-blank-"])["home"] == "-blank-"
    assert params(["-c", "-weird"])["config"] == Path("-weird")


def test_last_occurrence_wins_for_values_and_booleans():
    p = params(["--a=:1", "-a", ":2", "--derp=false", "--derp", "--no-derp", "--stun", "--stun=false"])
    assert p["addr"] == ":2" and p["derp_enabled"] is False and p["stun"] is False


def test_derpd_own_flags_take_go_syntax_too():
    p = params(["-workers=2", "-queue-depth", "64", "-shutdown-grace=1m", "-vv", "-v",
                "--no-verify-client-url-fail-open"])
    assert (p["workers"], p["queue_depth"], p["shutdown_grace"], p["verbose"]) == (2, 64, 60.0, 3)
    assert p["verify_client_url_fail_open"] is False


def test_go_integers_and_floats():
    assert params(["--http-port=0x50"])["http_port"] == 80
    assert params(["--http-port=010"])["http_port"] == 8  # Go reads a leading 0 as octal
    assert params(["--accept-connection-limit=+Inf"])["accept_connection_limit"] == float("inf")
    assert params(["--accept-connection-limit", "2.5e2"])["accept_connection_limit"] == 250.0


@pytest.mark.parametrize(("text", "seconds"), [("0", 0.0), ("500ms", 0.5), ("2s", 2.0), ("10m", 600.0),
                                               ("1h30m", 5400.0), ("1.5h", 5400.0), ("300us", 0.0003),
                                               ("1m0.5s", 60.5), ("15", 15.0), ("2.5", 2.5), (".5s", 0.5)])
def test_go_durations(text, seconds):
    assert goflags.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "5x", "1h30", "10 m", "--1s", "1e3s", "five"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        goflags.parse_duration(text)


def test_go_bool_spellings_exactly():
    for text in ("1", "t", "T", "TRUE", "true", "True"):
        assert goflags.parse_bool(text) is True
    for text in ("0", "f", "F", "FALSE", "false", "False"):
        assert goflags.parse_bool(text) is False
    for text in ("yes", "on", "tRUE", "", "2"):
        with pytest.raises(ValueError):
            goflags.parse_bool(text)


@pytest.mark.parametrize(("line", "message"), [
    ("-foo", "flag provided but not defined: -foo"),
    ("---a=:1", "bad flag syntax: ---a=:1"),
    ("-=x", "bad flag syntax"),
    ("-stun=maybe", "invalid boolean value 'maybe' for -stun"),
    ("-http-port", "flag needs an argument: -http-port"),
    ("-http-port=eighty", "'eighty' is not an integer"),
    ("-tcp-user-timeout=5x", "'5x' is not a duration"),
    ("-tcp-write-timeout=-2s", "is negative"),
    ("-certmode=acme", "'acme' is not one of"),
    ("--secrets-url=https://setec.example.com", "--secrets-url is not supported: setec"),
    ("--ace", "--ace is not supported"),
    ("-a :443 stray", "unexpected argument 'stray'"),
])
def test_bad_flags_are_one_line(line, message):
    with pytest.raises(FlagError) as info:
        params(shlex.split(line))
    assert message in info.value.format_message() and "\n" not in info.value.format_message()
    assert info.value.exit_code == 2


def test_refused_flags_at_their_default_are_accepted():
    params(["--ace=false", "--secrets-path-prefix=prod/derp", "--secrets-url="])


def test_every_derper_flag_is_in_the_table_and_accepted():
    source = DERPER_SOURCE.read_text() if DERPER_SOURCE.exists() else None
    names = {f.name for f in DERPER_FLAGS}
    if source is not None:  # the pinned derper's own list, when the module cache has it
        import re

        assert names == set(re.findall(r'flag\.\w+\("([\w-]+)"', source))
    table = go_flags(serve)
    for flag in DERPER_FLAGS:
        assert flag.name in table, flag.name
        if flag.status == "same":
            assert table[flag.name].on, f"{flag.name} is 'same' but serve has no such option"
        else:
            assert flag.reason, flag.name


def test_computed_defaults_as_derper():
    assert default_certdir({"HOME": "/home/op"}) == Path("/home/op/.cache/tailscale/derper-certs")
    assert default_certdir({"HOME": "/h", "XDG_CACHE_HOME": "/xdg"}) == Path("/xdg/tailscale/derper-certs")
    assert default_certdir({"XDG_CACHE_HOME": "relative"}) is None and default_certdir({}) is None
    assert default_key_file(uid=0) == Path("/var/lib/derper/derper.key") and default_key_file(uid=1000) is None
    assert default_mesh_psk_file({"HOME": "/h"}, exists=lambda p: p == "/h/keys/derp-mesh.key") == \
        Path("/h/keys/derp-mesh.key")
    assert default_mesh_psk_file({"HOME": "/h"}, exists=lambda p: False) is None


def test_help_is_readable_and_mentions_go_syntax():
    from click.testing import CliRunner

    from derpd.cli import main

    result = CliRunner().invoke(main, ["serve", "-help"])
    assert result.exit_code == 0
    assert "Go's flag syntax" in result.output and "--tcp-user-timeout DURATION" in result.output
    assert "[default: 15s]" in result.output


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "derpd", "serve", *args], capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize("args", [
    ("-tcp-user-timeout=15", "-tcp-write-timeout=2x", "--dev"),
    ("--dev", "-no-such-flag"),
    ("-certmode=manual", "-c"),
])
def test_bad_flags_as_real_processes(args):
    result = _run(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "derpd serve: " in result.stderr and "derpd serve -h" in result.stderr and result.stdout == ""


def test_version_flag_as_a_real_process():
    result = _run("-version")
    assert result.returncode == 0 and result.stdout.startswith("derpd ")


def test_click_flag_defaults_are_derper_s():
    p = params([])
    assert (p["addr"], p["certmode"], p["hostname"], p["http_port"], p["stun_port"]) == \
        (":443", "letsencrypt", "derp.tailscale.com", 80, 3478)
    assert isinstance(serve, click.Command)


def test_the_compat_doc_lists_every_flag_with_its_status():
    doc = (Path(__file__).resolve().parents[2] / "docs/derper-compat.md").read_text()
    word = {"same": "accepted", "later": "**not supported yet**", "refused": "**refused**"}
    for flag in DERPER_FLAGS:
        row = next((line for line in doc.splitlines() if line.startswith(f"| `-{flag.name}` |")), None)
        assert row is not None, flag.name
        assert f"| {word[flag.status]} |" in row, row


async def test_a_community_image_command_line_serves_as_a_real_process(nursery, tmp_path):
    """The DERP_* image's entrypoint with manual mode on an IP: TLS with a self-signed certificate,
    its pin printed, and two clients relaying through it (derpd check with the pin)."""
    import hashlib
    import ssl

    import trio

    from .test_cli import DERPD, start_serve

    line = (f"--hostname=127.0.0.1 --certmode=manual --certdir={tmp_path}/certs --a=127.0.0.1:0 --stun=false "
            f"--stun-port=3478 --http-port=-1 --verify-clients=false --verify-client-url= -c {tmp_path}/derper.key")
    with trio.fail_after(60):
        proc, port = await start_serve(*shlex.split(line), nursery=nursery)
        der = ssl.PEM_cert_to_DER_cert((tmp_path / "certs/127.0.0.1.crt").read_text())
        pin = "sha256-raw:" + hashlib.sha256(der).hexdigest()
        result = await trio.run_process([*DERPD, "check", f"https://127.0.0.1:{port}/derp", "-n", "50",
                                         "--cert-pin", pin], capture_stdout=True, check=False)
        assert result.returncode == 0 and b"delivered 50/50" in result.stdout, result.stdout
        proc.terminate()
        assert await proc.wait() == 0


def test_registering_needs_a_real_hostname(tmp_path):
    from click.testing import CliRunner

    from derpd.cli import main

    result = CliRunner().invoke(main, ["serve", "-c", str(tmp_path / "k"), "-a", "127.0.0.1:0",
                                       "--coordinator", "http://127.0.0.1:1"])
    assert result.exit_code == 2 and "--coordinator needs --hostname" in result.output
