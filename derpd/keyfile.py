"""derper's key file (``-c PATH``): ``{"PrivateKey": "privkey:<hex>"}`` (spec 1.3).

A missing file is created with a fresh key, mode 0600, parent directories included, written
atomically.  An existing file is never overwritten: if it is unreadable or malformed the
error says which file and what is wrong.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .keys import KeyFormatError, NodePrivate


class KeyFileError(Exception):
    """The key file cannot be used; the message names the file and the fix."""


def load_or_create(path: Path) -> tuple[NodePrivate, bool]:
    """Returns ``(key, created)``.

    Raises:
        KeyFileError: the file exists but cannot be read or parsed, or cannot be created.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        key = NodePrivate.generate()
        write_new(path, key)
        return key, True
    except OSError as e:
        raise KeyFileError(f"cannot read the key file {path}: {e.strerror}") from e
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise KeyFileError(f"{path} is not JSON: expected {{\"PrivateKey\": \"privkey:<64 hex>\"}}") from e
    if not isinstance(obj, dict):
        raise KeyFileError(f"{path} must hold a JSON object with a PrivateKey field")
    text = None
    for k, v in obj.items():  # Go's JSON decoder matches field names case-insensitively
        if k.lower() == "privatekey":
            text = v
    if not isinstance(text, str):
        raise KeyFileError(f"{path} has no PrivateKey string; expected \"privkey:<64 hex>\"")
    try:
        return NodePrivate.parse(text), False
    except KeyFormatError as e:
        raise KeyFileError(f"{path}: PrivateKey is not valid ({e})") from e


def key_file_json(key: NodePrivate) -> str:
    return json.dumps({"PrivateKey": str(key)}, indent="\t") + "\n"


def write_new(path: Path, key: NodePrivate) -> None:
    """Create ``path`` (mode 0600) atomically; never replaces an existing file.

    Raises:
        KeyFileError: the file exists, or the directory is not writable.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".derpd-key-")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(key_file_json(key))
            os.link(tmp, path)  # fails if path exists: never overwrite
        finally:
            os.unlink(tmp)
    except FileExistsError as e:
        raise KeyFileError(f"{path} already exists; not overwriting it") from e
    except OSError as e:
        raise KeyFileError(f"cannot create the key file {path}: {e.strerror}") from e
