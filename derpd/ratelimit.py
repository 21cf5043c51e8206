"""Per-client receive rate limit (``--rate-config``) and the open-files watch.

Receive rate limit (spec 5.9, P-18)
-----------------------------------
derper's ``--rate-config`` file is JSON with two unsigned integers::

    {"PerClientRateLimitBytesPerSec": 1000000, "PerClientRateBurstBytes": 2000000}

A rate of 0 (or a missing field) disables limiting.  The burst is raised to at least 65568
(one maximal SendPacket payload: 32-byte key + 64 KiB packet), so a single frame can always
pass.  Every non-mesh connection gets a token bucket; after the reader has handled a batch of
frames it *waits* until the bucket covers the batch's payload bytes.  While it waits it does
not read, so the client is slowed by TCP back-pressure: nothing is dropped, and the limit is
not advertised in ServerInfo (advertising it would make Go clients drop instead).  Mesh peers
are exempt.  The file is reloaded on SIGHUP; every connection, old and new, shares one
``ClientRateLimits`` and so follows the new numbers at its next batch.

Memory per connection
---------------------
What one connection can make the relay hold is bounded, whatever the peer sends:

* the reader's buffer: one receive (256 KiB) plus at most one incomplete frame, itself at most
  32 + 64 KiB for SendPacket (256 KiB for ClientInfo, during login only); unknown frame types
  are skipped by streaming, never buffered;
* its send queues: ``queue_depth`` packets (default 32) of at most 64 KiB + 37 bytes, twice
  (disco and other), so about 4.2 MiB at the very worst and a few KiB for typical traffic;
* its control queue: PeerGone/PeerPresent frames of 38/56 bytes (one per peer event).

The rest of the budget is the open-files limit: one descriptor per connection.
``watch_open_files`` logs one clear line when the process nears it.
"""

from __future__ import annotations

import json
import logging
import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from .settings import SettingsError

if TYPE_CHECKING:
    from .metrics import RelayStats

log = logging.getLogger("derpd.limits")

MIN_BURST = 65536 + 32  # 65568: one maximal SendPacket payload
_RATE = "PerClientRateLimitBytesPerSec"
_BURST = "PerClientRateBurstBytes"
_U64_MAX = (1 << 64) - 1


class RateConfigError(SettingsError):
    """The rate-config file is unreadable or malformed; the message says how to fix it."""


@dataclass(frozen=True, slots=True)
class RateConfig:
    """Bytes per second (0 = unlimited) and the burst, already raised to ``MIN_BURST``."""

    bytes_per_sec: int = 0
    burst: int = MIN_BURST

    @property
    def enabled(self) -> bool:
        return self.bytes_per_sec > 0


def parse_rate_config(text: str | bytes) -> RateConfig:
    """Parse derper's rate-config JSON.  Field names match case-insensitively, like Go's
    ``encoding/json``; unknown fields are ignored.

    Returns:
        the config, with the burst raised to at least ``MIN_BURST``.
    Raises:
        RateConfigError: not a JSON object, or a field that is not a non-negative integer.
    """
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise RateConfigError(f"the rate config is not valid JSON ({e}); expected "
                              f'{{"{_RATE}": N, "{_BURST}": N}}') from e
    if not isinstance(obj, dict):
        raise RateConfigError(f'the rate config must be a JSON object like {{"{_RATE}": 1000000}}')
    values = {_RATE: 0, _BURST: 0}
    for key, value in obj.items():
        for name in values:
            if key.lower() == name.lower():
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U64_MAX:
                    raise RateConfigError(f"{name} must be a non-negative integer, not {value!r}")
                values[name] = value
    return RateConfig(values[_RATE], max(values[_BURST], MIN_BURST))


def load_rate_config(path: Path) -> RateConfig:
    """Raises: RateConfigError (unreadable or malformed file)."""
    try:
        text = path.read_bytes()
    except OSError as e:
        raise RateConfigError(f"cannot read the rate config {path}: {e.strerror}; check --rate-config") from e
    try:
        return parse_rate_config(text)
    except RateConfigError as e:
        raise RateConfigError(f"{path}: {e}") from e


class ClientRateLimits:
    """The relay-wide limit that every non-mesh connection's limiter follows."""

    __slots__ = ("config", "path", "stats", "_changed")

    def __init__(self, stats: RelayStats, config: RateConfig | None = None, path: Path | None = None) -> None:
        self.config = config or RateConfig()
        self.path = path
        self.stats = stats
        self._changed = trio.Event()

    def limiter(self) -> ByteRateLimiter:
        return ByteRateLimiter(self)

    def set(self, config: RateConfig) -> None:
        """Apply new numbers to every connection (a waiting reader re-plans its wait)."""
        self.config = config
        self._changed.set()
        self._changed = trio.Event()

    def reload(self) -> bool:
        """SIGHUP: read ``path`` again.  A bad file keeps the current limit and logs why.

        Returns True if the file was read and applied.
        """
        if self.path is None:
            return False
        try:
            config = load_rate_config(self.path)
        except RateConfigError as e:
            log.error("rate config not reloaded, keeping %s: %s", _describe(self.config), e)
            return False
        if config != self.config:
            log.warning("per-client receive rate limit now %s", _describe(config))
        self.set(config)
        return True


def _describe(config: RateConfig) -> str:
    if not config.enabled:
        return "off"
    return f"{config.bytes_per_sec} B/s, burst {config.burst} B"


class ByteRateLimiter:
    """One connection's token bucket.  ``wait(n)`` returns once ``n`` bytes are paid for.

    The bucket may go into debt by one batch: the reader has already read the batch, so it pays
    afterwards by sleeping ``debt / rate`` seconds before it reads again.  Over time a client
    gets ``rate`` bytes per second plus at most ``burst`` at once.
    """

    __slots__ = ("_limits", "_tokens", "_stamp")

    def __init__(self, limits: ClientRateLimits) -> None:
        self._limits = limits
        self._tokens = float(limits.config.burst)
        self._stamp = trio.current_time()

    async def wait(self, nbytes: int) -> bool:
        """Returns True if the reader had to wait (the client is over the limit)."""
        limits = self._limits
        config = limits.config
        if not config.enabled:
            return False
        now = trio.current_time()
        self._tokens = min(float(config.burst), self._tokens + (now - self._stamp) * config.bytes_per_sec) - nbytes
        self._stamp = now
        if self._tokens >= 0:
            return False
        limits.stats.rate_limit_waits += 1
        while self._tokens < 0:
            config = limits.config
            if not config.enabled:
                self._tokens = 0.0
                return True
            changed = limits._changed
            with trio.move_on_after(-self._tokens / config.bytes_per_sec):
                await changed.wait()  # a reload re-plans the wait with the new rate
            now = trio.current_time()
            self._tokens = min(float(config.burst), self._tokens + (now - self._stamp) * config.bytes_per_sec)
            self._stamp = now
        return True


# ------------------------------------------------------------------------------ open files

FD_WARN_FRACTION = 0.9
FD_REARM_FRACTION = 0.8
FD_CHECK_INTERVAL = 10.0


def open_fd_count() -> int | None:
    """Returns the number of open descriptors of this process (Linux), or None if unknown."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def open_files_limit() -> int | None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


class OpenFilesWatch:
    """Logs one line when open descriptors reach 90% of RLIMIT_NOFILE, and one more once they
    fall below 80% again (so a flapping count does not flood the log)."""

    __slots__ = ("warned",)

    def __init__(self) -> None:
        self.warned = False

    def check(self, used: int | None = None, limit: int | None = None) -> bool:
        """Returns True while over the warning threshold."""
        used = open_fd_count() if used is None else used
        limit = open_files_limit() if limit is None else limit
        if used is None or not limit:
            return False
        if not self.warned and used >= FD_WARN_FRACTION * limit:
            self.warned = True
            log.error("%d of %d open files in use: new connections will soon fail; raise the limit "
                      "(ulimit -n, systemd LimitNOFILE=) or spread clients over more relays", used, limit)
        elif self.warned and used < FD_REARM_FRACTION * limit:
            self.warned = False
            log.warning("open files back to %d of %d", used, limit)
        return self.warned


async def watch_open_files(interval: float = FD_CHECK_INTERVAL) -> None:
    """Check the open-files count every ``interval`` seconds, forever."""
    watch = OpenFilesWatch()
    while True:
        watch.check()
        await trio.sleep(interval)
