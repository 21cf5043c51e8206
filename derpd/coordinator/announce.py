"""The node side of self-registration: ``derpd serve --coordinator URL ...``.

The node POSTs its DERPNode entry (see :mod:`derpd.coordinator.registration`) to
``<coordinator>/v1/nodes`` with ``Authorization: Bearer <token>``, then repeats it every
``interval`` seconds as a heartbeat.  A 4xx other than 429 is a configuration mistake:
it is logged once, with the coordinator's explanation, and retried at the normal pace
(the operator may fix the coordinator side).  Transport errors are retried with
exponential backoff capped at ``interval``.
"""

from __future__ import annotations

import json
import logging
import random
from typing import Any

import trio

from .httpclient import HTTPError, request

log = logging.getLogger("derpd.coordinator.announce")


def registration_url(coordinator_url: str) -> str:
    """Returns ``<coordinator>/v1/nodes`` for a coordinator base URL (with or without a path)."""
    base = coordinator_url.rstrip("/")
    for suffix in ("/v1/nodes", "/derpmap/default"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base + "/v1/nodes"


async def announce_once(coordinator_url: str, token: str, node_info: dict[str, Any]) -> dict[str, Any]:
    """Sends one registration.

    Returns:
        The coordinator's JSON answer (``{"ok": true, "node_ttl": ..., ...}``).
    Raises:
        HTTPError: transport failure, or a non-200 answer (message = the coordinator's error).
    """
    body = json.dumps(node_info).encode()
    resp = await request(registration_url(coordinator_url), "POST", body=body, headers={
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
    })
    try:
        doc = json.loads(resp.body) if resp.body else {}
    except ValueError:
        doc = {}
    if resp.status != 200:
        detail = doc.get("error") if isinstance(doc, dict) else None
        field = doc.get("field") if isinstance(doc, dict) else None
        msg = f"coordinator answered {resp.status}: {detail or resp.body[:200]!r}"
        if field:
            msg += f" (field {field})"
        raise AnnounceRefused(resp.status, msg)
    return doc if isinstance(doc, dict) else {}


class AnnounceRefused(HTTPError):
    """The coordinator answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


async def announce_forever(
    coordinator_url: str,
    token: str,
    node_info: dict[str, Any],
    *,
    interval: float = 15.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Registers the node and heartbeats every ``interval`` seconds until cancelled.

    ``task_status.started()`` is called after the first attempt, successful or not, so a
    coordinator that is down does not block the relay from starting.
    """
    started = False
    backoff = min(1.0, interval)
    last_error = ""
    while True:
        delay = interval
        try:
            with trio.fail_after(max(5.0, interval)):
                await announce_once(coordinator_url, token, node_info)
            if last_error:
                log.info("registered with coordinator %s again", coordinator_url)
            elif not started:
                log.info("registered %s with coordinator %s", node_info.get("Name"), coordinator_url)
            last_error = ""
            backoff = min(1.0, interval)
        except (HTTPError, trio.TooSlowError) as exc:
            msg = str(exc) or "timed out"
            if isinstance(exc, AnnounceRefused):
                delay = interval  # the coordinator is up; it told us what is wrong
            else:
                delay = backoff
                backoff = min(backoff * 2, interval)
            if msg != last_error:
                log.warning("registration with coordinator %s failed: %s; retrying every %.0f s at most",
                            coordinator_url, msg, interval)
            last_error = msg
        if not started:
            started = True
            task_status.started()
        await trio.sleep(delay * random.uniform(0.9, 1.0))
