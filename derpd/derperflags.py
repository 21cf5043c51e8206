"""derper's command line (``cmd/derper`` at tailscale.com v1.98.10), flag by flag, and the click
command class that reads it with Go's syntax.

``DERPER_FLAGS`` lists every flag derper defines: its name, type, derper's default and what
derpd does with it.  ``status`` is one of

* ``same``: accepted with derper's name, default and meaning (a click option of ``serve``);
* ``later``: derper's meaning is not built yet: any value but the default is a one-line
  "not supported yet" error (``reason`` says what to do meanwhile);
* ``refused``: derpd will not do it: any value but the default is a one-line error with
  ``reason``.

To support a ``later`` flag, add a click option with its name to ``derpd serve`` and set its
status here to ``same``: an option of the command always wins over a refusal row.

``DerperCommand`` is the click command class of ``derpd serve``: it rewrites the argv with
``goflags.normalise`` (every option of the command, derpd's own included, in Go's syntax), and
raises every flag error as a ``FlagError`` (a usage error: one line from the ``derpd`` group,
exit status 2).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from .settings import SettingsError
from .goflags import Flag, GoFlagError, normalise, parse_duration, parse_float, parse_int


@dataclass(frozen=True, slots=True)
class DerperFlag:
    name: str
    kind: str  # bool, string, int, float, duration
    default: str  # as derper's -help shows it (computed defaults described)
    status: str  # same, later, refused
    reason: str = ""  # later/refused: why, and what to do instead; same: derpd's notes


_SETEC = ("setec is Tailscale's internal secrets service, which derpd does not speak; "
          "put the mesh key in a file and pass --mesh-psk-file")

DERPER_FLAGS: tuple[DerperFlag, ...] = (
    DerperFlag("a", "string", ":443", "same",
               "TLS when the port is 443 or --certmode is manual, plain HTTP otherwise; an address without a "
               "port (8443, 127.0.0.1) is refused (as derper)"),
    DerperFlag("accept-connection-burst", "int", "MaxInt", "same"),
    DerperFlag("accept-connection-limit", "float", "+Inf", "same"),
    DerperFlag("ace", "bool", "false", "refused",
               "derper's experimental CONNECT proxy (ACE) is not supported by derpd"),
    DerperFlag("acme-eab-key", "string", "", "same",
               "base64url or standard base64, as derper; with --acme-eab-kid for --certmode gcp (docs/acme.md)"),
    DerperFlag("acme-eab-kid", "string", "", "same", "external account binding key ID (docs/acme.md)"),
    DerperFlag("acme-email", "string", "", "same", "the ACME account's contact (required for --certmode gcp)"),
    DerperFlag("bootstrap-dns-names", "string", "", "same",
               "resolved at start and every 10 minutes, served from memory at /bootstrap-dns"),
    DerperFlag("c", "string", "", "same",
               "created if missing; /var/lib/derper/derper.key when run as root without -c (as derper)"),
    DerperFlag("certdir", "string", "$XDG_CACHE_HOME/tailscale/derper-certs", "same",
               "derper's default: $XDG_CACHE_HOME (else ~/.cache) + /tailscale/derper-certs"),
    DerperFlag("certmode", "string", "letsencrypt", "same",
               "as derper: letsencrypt and gcp obtain and renew the certificate over ACME when serving TLS "
               "(port 443; TLS-ALPN-01 and HTTP-01, docs/acme.md); manual loads files"),
    DerperFlag("derp", "bool", "true", "same"),
    DerperFlag("dev", "bool", "false", "same",
               "plain HTTP on :3340 with a fresh key; the hostname defaults to localhost"),
    DerperFlag("home", "string", "", "same"),
    DerperFlag("hostname", "string", "derp.tailscale.com", "same"),
    DerperFlag("http-port", "int", "80", "same"),
    DerperFlag("mesh-psk-file", "string", "/home/derp/keys/derp-mesh.key or ~/keys/derp-mesh.key if present",
               "same"),
    DerperFlag("mesh-with", "string", "", "same"),
    DerperFlag("rate-config", "string", "", "same"),
    DerperFlag("secrets-cache-dir", "string", "~/.cache/derper-secrets", "refused", _SETEC),
    DerperFlag("secrets-path-prefix", "string", "prod/derp", "refused", _SETEC),
    DerperFlag("secrets-url", "string", "", "refused", _SETEC),
    DerperFlag("socket", "string", "", "same",
               "tailscaled's LocalAPI socket for --verify-clients (default /var/run/tailscale/tailscaled.sock)"),
    DerperFlag("stun", "bool", "true", "same"),
    DerperFlag("stun-port", "int", "3478", "same"),
    DerperFlag("tcp-keepalive-time", "duration", "10m0s", "same"),
    DerperFlag("tcp-user-timeout", "duration", "15s", "same"),
    DerperFlag("tcp-write-timeout", "duration", "2s", "same"),
    DerperFlag("unpublished-bootstrap-dns-names", "string", "", "same",
               "answered only to ?q=NAME; an entry with a TXT rollout record (name/txtname) is refused"),
    DerperFlag("verify-client-url", "string", "", "same"),
    DerperFlag("verify-client-url-fail-open", "bool", "true", "same"),
    DerperFlag("verify-clients", "bool", "false", "same",
               "asks the local tailscaled's LocalAPI (whois by node key), fail-closed as derper"),
    DerperFlag("version", "bool", "false", "same", "prints derpd's version"),
)


def _refusal(flag: DerperFlag) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if value == flag.default or (flag.kind == "bool" and value == "false"):
            return None
        lead = "is not supported yet" if flag.status == "later" else "is not supported"
        return f"derper's flag --{flag.name} {lead}: {flag.reason}"

    return check


def go_flags(command: click.Command) -> dict[str, Flag]:
    """The Go-syntax table of a click command: every option name of the command (short and
    long, without dashes), plus derper's flags it refuses, plus -h/-help."""
    table: dict[str, Flag] = {}
    for row in DERPER_FLAGS:
        if row.status != "same":
            table[row.name] = Flag("bool" if row.kind == "bool" else "value", check=_refusal(row))
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        longs = [o for o in param.opts if o.startswith("--")]
        primary = longs[0] if longs else param.opts[0]
        if param.count:
            flag = Flag("count", on=primary)
        elif param.is_flag:
            secondary = param.secondary_opts[0] if param.secondary_opts else None
            if secondary is None and param.default is True:
                raise AssertionError(f"{primary} defaults to true: give it a --no- form")
            flag = Flag("bool", on=primary, off=secondary, dest=str(param.name))
            for name in param.secondary_opts:
                table[name.lstrip("-")] = Flag("bool", on=name, off=primary, dest=str(param.name))
        else:
            flag = Flag("value", on=primary)
        for name in param.opts:
            table[name.lstrip("-")] = flag
    for name in ("h", "help"):
        table[name] = Flag("help", on="--help")
    return table


class FlagError(click.UsageError):
    """A command-line error of ``derpd serve`` (exit status 2; the group prints it as one line)."""


class DerperCommand(click.Command):
    """``derpd serve``: click options read with Go's flag syntax (see the module docstring)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            canonical, rest = normalise(args, go_flags(self))
        except GoFlagError as e:
            raise FlagError(str(e), ctx) from None
        if rest:
            raise FlagError(f"unexpected argument {rest[0]!r}: serve takes only flags (derper would "
                            "stop reading flags there and ignore the rest)", ctx)
        try:
            return super().parse_args(ctx, canonical)
        except click.UsageError as e:
            raise FlagError(e.format_message(), ctx) from None


# ----------------------------------------------------------------------------- value types


class GoDuration(click.ParamType):
    """A Go duration (``2s``, ``500ms``, ``10m``, ``1h30m``) or plain seconds, never negative."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        try:
            seconds = parse_duration(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)
        if seconds < 0:
            self.fail(f"{value!r} is negative", param, ctx)
        return seconds


class GoInt(click.ParamType):
    """An integer as Go's flag package reads it (``0x``, ``0o``, leading-zero octal)."""

    name = "integer"

    def __init__(self, minimum: int | None = None) -> None:
        self.minimum = minimum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            number = value
        else:
            try:
                number = parse_int(str(value))
            except ValueError as e:
                self.fail(str(e), param, ctx)
        if self.minimum is not None and number < self.minimum:
            self.fail(f"{number} is below the minimum {self.minimum}", param, ctx)
        return number


class GoFloat(click.ParamType):
    name = "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_float(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


# ----------------------------------------------------------------------------- computed defaults


def default_certdir(env: dict[str, str] | None = None) -> Path | None:
    """derper's ``tsweb.DefaultCertDir("derper-certs")``: Go's ``os.UserCacheDir()`` (Linux:
    ``$XDG_CACHE_HOME``, which must be absolute, else ``$HOME/.cache``) + ``tailscale/derper-certs``;
    None when neither variable is usable (derper then says --certdir is missing)."""
    env = dict(os.environ) if env is None else env
    cache = env.get("XDG_CACHE_HOME", "")
    if cache:
        if not os.path.isabs(cache):
            return None
        base = Path(cache)
    elif env.get("HOME"):
        base = Path(env["HOME"]) / ".cache"
    else:
        return None
    return base / "tailscale" / "derper-certs"


ROOT_KEY_FILE = Path("/var/lib/derper/derper.key")


def default_key_file(uid: int | None = None) -> Path | None:
    """derper's -c default: /var/lib/derper/derper.key when run as root, else none (an error)."""
    return ROOT_KEY_FILE if (os.getuid() if uid is None else uid) == 0 else None


def default_mesh_psk_file(env: dict[str, str] | None = None,
                          exists: Callable[[str], bool] = os.path.exists) -> Path | None:
    """derper's --mesh-psk-file default: the first of /home/derp/keys/derp-mesh.key and
    $HOME/keys/derp-mesh.key that exists."""
    env = dict(os.environ) if env is None else env
    for candidate in ("/home/derp/keys/derp-mesh.key", os.path.join(env.get("HOME", ""), "keys", "derp-mesh.key")):
        if exists(candidate):
            return Path(candidate)
    return None


def cert_settings(certmode: str, certdir: Path | None, port: int) -> tuple[str | None, Path | None]:
    """derper's rule: TLS iff the port is 443 or --certmode is manual; --certmode letsencrypt
    (the default) and gcp only matter with TLS, where they get the certificate over ACME
    (derpd.acme).  Returns the relay's certmode (None: plain HTTP) and the certificate
    directory (derper's default when ``certdir`` is None).

    Raises:
        SettingsError: TLS and no directory.
    """
    if certdir is None:
        certdir = default_certdir()
    if certmode != "manual" and port != 443:
        return None, certdir
    if certdir is None:
        raise SettingsError(f"--certmode {certmode} needs --certdir (there is no $XDG_CACHE_HOME or $HOME for "
                            "derper's default)")
    return certmode, certdir
