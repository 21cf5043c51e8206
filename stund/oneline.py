"""One-line operator errors for the ``stund`` and ``derpd`` command lines.

An operator's mistake (a port in use, a bad flag value, a missing file) must end in ONE line
that says what to do, never a traceback.  Three things stand in the way, and this module
removes each at one boundary:

* trio wraps an error raised inside a nursery in ``ExceptionGroup`` s, so ``except OSError``
  around ``trio.run`` never sees it: ``run_trio`` re-raises the one error a group carries;
* click prints usage errors as four lines: ``OneLineGroup`` prints them as one;
* ``OSError`` from ``bind`` names neither the address nor the flag: ``listen_error`` does.

Dependencies: click and trio only.  stund is the lower package (derpd imports it, stund never
imports derpd), so both command lines share this module from here.
"""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
import trio

T = TypeVar("T")


def single_error(exc: BaseException) -> BaseException:
    """The one error an exception group (nested or not) carries, ``trio.Cancelled`` aside.

    Returns ``exc`` itself when it is not a group, or when the group holds several errors.
    """
    while isinstance(exc, BaseExceptionGroup):
        leaves = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        if len(leaves) != 1:
            return exc
        exc = leaves[0]
    return exc


def unwrapping(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)``, except that an exception group holding one error raises that error, so
    the caller's ``except OSError`` (or ``KeyboardInterrupt``) sees it."""
    try:
        return fn(*args)
    except BaseExceptionGroup as group:
        leaf = single_error(group)
        if leaf is group:
            raise
        raise leaf from None


def run_trio(fn: Callable[..., Any], *args: object) -> Any:
    """``trio.run(fn, *args)`` through ``unwrapping``."""
    return unwrapping(trio.run, fn, *args)


def format_addr(host: str, port: int) -> str:
    """``host:port``, ``[v6]:port``, or ``:port`` for every address."""
    if not host:
        return f":{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_error(err: OSError, addr: str, flag: str) -> str:
    """One line for a failed bind of ``addr``, naming the flag that changes it."""
    if isinstance(err, socket.gaierror):
        return f"cannot listen on {addr}: the host does not resolve ({err.strerror}); give an IP with {flag}"
    if err.errno == errno.EADDRINUSE:
        return f"cannot listen on {addr}: the port is in use by another program; pick another with {flag}"
    if err.errno == errno.EACCES:
        return (f"cannot listen on {addr}: permission denied (ports below 1024 need root or "
                f"CAP_NET_BIND_SERVICE); grant it, or pick a port of 1024 or more with {flag}")
    if err.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {addr}: no interface of this machine has that address; fix {flag}"
    return f"cannot listen on {addr}: {err.strerror or err}; check {flag}"


class StartupError(click.ClickException):
    """An operator error found before serving: one line, exit status 2."""

    exit_code = 2


class OneLineGroup(click.Group):
    """A click group whose usage errors (bad flag values, unknown options) are one line:
    ``prog sub: Invalid value for '--x': ...; see 'prog sub -h'``, exit status 2."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            ctx = e.ctx
            where = ctx.command_path if ctx is not None else (prog_name or self.name or "")
            hint = f"; see '{where} -h'" if ctx is not None else ""
            click.echo(f"{where}: {e.format_message().rstrip('.')}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"{self.name}: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


__all__ = ["OneLineGroup", "StartupError", "format_addr", "listen_error", "run_trio", "single_error", "unwrapping"]
