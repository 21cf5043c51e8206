"""The coordinator's state file: registrations and the last published map, kept across restarts.

One JSON file, ``coordinator-state.json`` in the state directory, written atomically
(a temporary file in the same directory, flushed to disk, then renamed over the old one),
so a crash leaves either the old or the new file, never half of one.

The directory is ``--state-dir``, else systemd's ``$STATE_DIRECTORY`` (``StateDirectory=``
in the unit), else a per-user directory (``$XDG_STATE_HOME/derpd`` or
``~/.local/state/derpd``).  A directory that cannot be created or written is a start-up
error (:class:`StateDirError`); a file that cannot be read or parsed is logged, renamed
aside (``coordinator-state.json.bad-<unix time>``) and the coordinator starts without it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("derpd.coordinator")

STATE_FILE = "coordinator-state.json"


class StateDirError(Exception):
    """The state directory cannot be used; the message says which and how to fix it."""


def default_state_dir() -> Path:
    """Returns ``$STATE_DIRECTORY`` (its first entry), else the per-user state directory."""
    systemd = os.environ.get("STATE_DIRECTORY", "")
    if systemd:
        return Path(systemd.split(":")[0])
    xdg = os.environ.get("XDG_STATE_HOME", "")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "derpd"


class StateStore:
    """Reads and writes the state file in one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE
        self._warned = False

    def check(self) -> None:
        """Creates the directory if needed and proves it is writable.

        Raises:
            StateDirError: with one line saying what to do.
        """
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            probe = self.directory / f".{STATE_FILE}.check-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StateDirError(
                f"cannot write the state directory {self.directory}: {exc.strerror or exc}; "
                "pass a writable --state-dir DIR") from None

    def load(self) -> dict[str, Any] | None:
        """Returns the saved document, or None when there is none or it is unusable (set aside)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._set_aside(f"cannot read it: {exc.strerror or exc}")
            return None
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("version") != 1:
                raise ValueError("not a version 1 state document")
        except (ValueError, RecursionError) as exc:
            self._set_aside(f"it is not a state document ({str(exc)[:100]})")
            return None
        return doc

    def _set_aside(self, why: str) -> None:
        aside = self.path.with_name(f"{STATE_FILE}.bad-{int(time.time())}")
        try:
            os.replace(self.path, aside)
            where = f"moved to {aside}"
        except OSError as exc:
            where = f"and could not be moved aside: {exc.strerror or exc}"
        log.error("state file %s ignored, %s; %s; starting from the config and new registrations",
                  self.path, why, where)

    def save(self, data: bytes) -> bool:
        """Writes ``data`` atomically.  A failure is logged (once until it works again).

        Returns:
            True if the file now holds ``data``.
        """
        tmp = self.path.with_name(f".{STATE_FILE}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            _fsync_dir(self.directory)
        except OSError as exc:
            if not self._warned:
                log.error("cannot write the state file %s: %s; the map is served from memory until "
                          "this works again", self.path, exc.strerror or exc)
            self._warned = True
            try:
                tmp.unlink()
            except OSError:
                pass
            return False
        if self._warned:
            log.warning("state file %s written again", self.path)
        self._warned = False
        return True


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
