"""Go's ``flag`` syntax, read exactly, and rewritten into one canonical form for click.

derper's operators write its flags the way Go's ``flag`` package reads them: ``-name`` and
``--name`` are the same, a value follows as ``-name=value`` or as the next argument (whatever it
looks like, ``-1`` included), a boolean never takes the next argument (``-name`` alone means
true, ``-name=false`` false), and parsing stops at the first argument that is not a flag or at
``--``.  click reads ``-certmode=manual`` as ``-c ertmode=manual``, so ``normalise`` reads a
Go-style argv first, with a table of the flags the command knows, and returns an argv click
cannot misread: ``--name=value`` for every value, the bare ``--flag`` / ``--no-flag`` for
booleans.

Also here, Go's value syntaxes (``strconv.ParseBool``, ``ParseInt`` with base 0,
``ParseFloat``, ``time.ParseDuration``), since derper's values are written in them.

Pure: no I/O; the caller maps ``GoFlagError`` to its one-line error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction


class GoFlagError(ValueError):
    """A command line Go's flag package would refuse (or one we refuse); one line."""


# ----------------------------------------------------------------------------- values

_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def parse_bool(text: str) -> bool:
    """``strconv.ParseBool``: exactly 1 t T TRUE true True / 0 f F FALSE false False."""
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean (use true or false)")


_GO_INT = re.compile(r"[+-]?(0[xX][0-9a-fA-F_]+|0[oO][0-7_]+|0[bB][01_]+|0[0-7_]*|[1-9][0-9_]*)")


def parse_int(text: str) -> int:
    """``strconv.ParseInt(text, 0, 64)``: decimal, ``0x``/``0o``/``0b`` and a leading ``0`` for
    octal (so ``010`` is 8, as derper reads it); single underscores between digits."""
    if not _GO_INT.fullmatch(text) or text.endswith("_") or "__" in text:
        raise ValueError(f"{text!r} is not an integer")
    sign = -1 if text.startswith("-") else 1
    body = text.lstrip("+-")
    if len(body) > 1 and body[0] == "0" and body[1] not in "xXoObB":
        body = "0o" + body[1:]
    value = sign * int(body, 0)
    if not -(1 << 63) <= value < 1 << 63:
        raise ValueError(f"{text!r} is out of range")
    return value


def parse_float(text: str) -> float:
    """``strconv.ParseFloat(text, 64)``: decimal or hex floats, ``inf``/``infinity`` in any case
    (NaN refused: no flag means anything by it)."""
    hexa = text.lstrip("+-")[:2].lower() == "0x"
    if not text or not text.isascii() or text.strip() != text:
        raise ValueError(f"{text!r} is not a number")
    try:
        value = float.fromhex(text.replace("_", "")) if hexa else float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if math.isnan(value):
        raise ValueError(f"{text!r} is not a number")
    return value


_UNITS_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "μs": 1_000, "ms": 1_000_000, "s": 10**9, "m": 60 * 10**9,
             "h": 3600 * 10**9}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Go's ``time.ParseDuration`` (``500ms``, ``2s``, ``10m``, ``1h30m``, ``-1.5h``; ``0``), in
    seconds as Go's ``Duration.Seconds()`` gives them (whole nanoseconds); a plain number is taken
    as seconds (derpd's own older syntax)."""
    t = text
    sign = 1
    if t[:1] in ("+", "-"):
        sign = -1 if t[0] == "-" else 1
        t = t[1:]
    if re.fullmatch(r"\d+\.?\d*|\.\d+", t):
        return sign * float(t)
    total_ns, pos = 0, 0
    while pos < len(t):
        m = _DURATION_PART.match(t, pos)
        if m is None:
            break
        total_ns += int(Fraction(m.group(1)) * _UNITS_NS[m.group(2)])
        pos = m.end()
    if not t or pos != len(t):
        raise ValueError(f"{text!r} is not a duration (write it like 2s, 500ms, 10m or 1h30m)")
    if total_ns >= 1 << 63:
        raise ValueError(f"{text!r} is out of range")
    whole, ns = divmod(total_ns, 10**9)
    return sign * (whole + ns / 1e9)


# ----------------------------------------------------------------------------- argv


@dataclass(frozen=True, slots=True)
class Flag:
    """How one flag name is read and what click gets for it.

    kind ``"bool"``: no argument; click gets ``on`` for true and ``off`` for false (nothing when
    ``off`` is None: the flag's default is false).  Booleans sharing ``dest`` are one setting,
    the last one on the command line wins (as in Go).
    kind ``"value"``: one value; click gets ``option=value`` (``option value`` for a
    short-only option).  ``check`` may refuse a value with a one-line reason.
    kind ``"count"``: ``-v``, repeatable, and ``-vv`` as derpd always accepted it.
    kind ``"help"``: ``-h``, ``-help``, ``--help``.
    """

    kind: str
    on: str = ""
    off: str | None = None
    dest: str = ""
    check: Callable[[str], str | None] | None = None


def normalise(argv: list[str], flags: Mapping[str, Flag]) -> tuple[list[str], list[str]]:
    """Read ``argv`` as Go's ``flag.Parse`` would, with ``flags`` keyed by name (no dashes).

    Returns ``(canonical, rest)``: the argv for click and the arguments left after parsing
    stopped (at the first non-flag argument, or after ``--``).

    Raises:
        GoFlagError: bad flag syntax, an unknown flag, a boolean with a non-boolean value, a
            flag missing its value, or a value a ``check`` refuses.
    """
    out: list[str] = []
    bools: dict[str, str | None] = {}  # dest -> the option string to emit, in first-seen order
    args = list(argv)
    while args:
        s = args[0]
        if len(s) < 2 or s[0] != "-":
            break
        dashes = 2 if s[1] == "-" else 1
        if dashes == 2 and len(s) == 2:
            args.pop(0)
            break
        name = s[dashes:]
        if not name or name[0] in "-=":
            raise GoFlagError(f"bad flag syntax: {s}")
        args.pop(0)
        value: str | None = None
        if "=" in name[1:]:
            name, value = name.split("=", 1)
        flag = flags.get(name)
        if flag is None and dashes == 1 and len(name) > 1 and set(name) == {"v"}:
            count = flags.get("v")
            if count is not None and count.kind == "count" and value is None:
                out.extend([count.on] * len(name))
                continue
        if flag is None:
            raise GoFlagError(f"flag provided but not defined: -{name}")
        if flag.kind == "help":
            out.append(flag.on)
            continue
        if flag.kind == "count":
            if value is not None:
                raise GoFlagError(f"-{name} takes no value; repeat it instead (-v -v)")
            out.append(flag.on)
            continue
        if flag.kind == "bool":
            on = True
            if value is not None:
                try:
                    on = parse_bool(value)
                except ValueError:
                    raise GoFlagError(f"invalid boolean value {value!r} for -{name}: use true or false") from None
            if flag.check is not None:
                problem = flag.check("true" if on else "false")
                if problem:
                    raise GoFlagError(problem)
            dest = flag.dest or flag.on
            bools.pop(dest, None)  # keep the last occurrence's place
            bools[dest] = flag.on if on else flag.off
            continue
        if value is None:
            if not args:
                raise GoFlagError(f"flag needs an argument: -{name}")
            value = args.pop(0)
        if flag.check is not None:
            problem = flag.check(value)
            if problem:
                raise GoFlagError(problem)
        if flag.on.startswith("--"):
            out.append(f"{flag.on}={value}")
        elif flag.on:
            out.extend([flag.on, value])
    out.extend(opt for opt in bools.values() if opt is not None)
    return out, args
