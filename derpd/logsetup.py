"""Log levels shared by the derpd commands (serve, coordinator, dev).

Quiet by default, ``-v`` for notable events, ``-vv`` for debug lines.  The HTTP client library
logs one line per request (httpx at INFO, httpcore at DEBUG): a coordinator's probes, a relay's
heartbeats and admission checks.  Those are per-request details, shown at ``-vv`` only.
"""

from __future__ import annotations

import logging

PER_REQUEST_LOGGERS = ("httpx", "httpcore")


def per_request_logs(verbose: int) -> None:
    """Let the HTTP client's per-request lines through at ``-vv`` only."""
    level = logging.DEBUG if verbose >= 2 else logging.WARNING
    for name in PER_REQUEST_LOGGERS:
        logging.getLogger(name).setLevel(level)


__all__ = ["PER_REQUEST_LOGGERS", "per_request_logs"]
