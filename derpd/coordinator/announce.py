"""The node side of self-registration: ``derpd serve --coordinator URL1,URL2,...``.

The node POSTs its DERPNode entry (see :mod:`derpd.coordinator.registration`) to
``<coordinator>/v1/nodes`` of every coordinator listed, with ``Authorization: Bearer
<token>``, then repeats it as a heartbeat: every ``interval`` seconds (``derpd serve
--heartbeat-interval``) until a coordinator answers, then at the pace that coordinator asks
for in its answer (``heartbeat_interval``, a third of its ``node_ttl``), each coordinator
at its own pace.  The entry is built
by a callable at each send, so it always carries what the relay serves now (the
``CertName`` pin of the current certificate); :meth:`Announcer.notify` sends it at once
to every coordinator (the relay calls it after a certificate reload), not at the next
heartbeat.

A 4xx other than 429 is a configuration mistake: it is logged once, with the
coordinator's explanation, and retried at the normal pace (the operator may fix the
coordinator side).  Transport errors are retried with exponential backoff capped at
``interval``.  Connections to each coordinator are pooled and kept alive.

The hook the relay needs is small: ``Announcer(urls, token, node_info)``, a task running
:meth:`Announcer.run`, and ``notify`` in its reload path.

Maintenance: :meth:`Announcer.drain` adds ``"Draining": true`` to the entry and sends it to
every coordinator at once (each takes the node out of its map); ``drain(False)`` ends it.
:meth:`Announcer.wait_drain_announced` waits until every coordinator has answered the
change (or failed to), and says which did not take it.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from .httpclient import HTTPClient, HTTPError

log = logging.getLogger("derpd.coordinator.announce")

NodeInfo = Callable[[], dict[str, Any]]


def registration_url(coordinator_url: str) -> str:
    """Returns ``<coordinator>/v1/nodes`` for a coordinator base URL (with or without a path)."""
    base = coordinator_url.rstrip("/")
    for suffix in ("/v1/nodes", "/derpmap/default"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base + "/v1/nodes"


def split_coordinator_urls(text: str) -> list[str]:
    """Returns the URLs of ``--coordinator URL1,URL2,...`` (empty entries dropped, order kept).

    Raises:
        ValueError: an entry is not an http:// or https:// URL.
    """
    urls = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.startswith(("http://", "https://")):
            raise ValueError(f"--coordinator: {part!r} is not a URL; give http(s)://HOST[:PORT], "
                             "several separated by commas")
        if part not in urls:
            urls.append(part)
    return urls


class AnnounceRefused(HTTPError):
    """The coordinator answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


async def announce_once(coordinator_url: str, token: str, node_info: dict[str, Any], *,
                        client: HTTPClient | None = None) -> dict[str, Any]:
    """Sends one registration.

    Returns:
        The coordinator's JSON answer (``{"ok": true, "node_ttl": ..., ...}``).
    Raises:
        HTTPError: transport failure, or a non-200 answer (message = the coordinator's error).
    """
    own = client is None
    http = client or HTTPClient(keepalive=False, max_response_bytes=64 * 1024)
    try:
        resp = await http.request(registration_url(coordinator_url), "POST", body=json.dumps(node_info).encode(),
                                  headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    finally:
        if own:
            await http.aclose()
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


#: the slowest heartbeat a coordinator may ask for
MAX_HEARTBEAT_INTERVAL = 3600.0


def asked_interval(answer: dict[str, Any], own: float) -> float | None:
    """The heartbeat interval a coordinator's answer asks for, bounded to [min(1 s, ``own``),
    1 h] so a hostile or broken coordinator cannot make the relay flood it; None if the
    answer names none (an older coordinator: keep ``own``)."""
    value = answer.get("heartbeat_interval")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    return min(max(float(value), min(1.0, own)), MAX_HEARTBEAT_INTERVAL)


class Announcer:
    """Registers one node with every coordinator listed and keeps it registered."""

    def __init__(self, urls: Sequence[str], token: str, node_info: NodeInfo, *, interval: float = 15.0) -> None:
        self.urls = list(urls)
        self.token = token
        self.node_info = node_info
        self.interval = interval
        self.sent = 0  # successful registrations, all coordinators together
        self.draining = False
        self._wake = [trio.Event() for _ in self.urls]
        #: per coordinator: the heartbeat interval in force (``interval`` until it answers)
        self.intervals = [interval] * len(self.urls)
        # per coordinator, since the last drain(): None (no answer yet), "" (taken) or why not
        self._drain_result: list[str | None] = [None] * len(self.urls)
        self._drain_answered = trio.Event()

    def notify(self) -> None:
        """The node's entry changed (a new certificate): send it to every coordinator now."""
        for event in self._wake:
            event.set()

    def drain(self, draining: bool = True) -> None:
        """Announce (or, with False, end) a maintenance drain to every coordinator now."""
        self.draining = draining
        self._drain_result = [None] * len(self.urls)
        self._drain_answered = trio.Event()
        if not self.urls:
            self._drain_answered.set()
        self.notify()

    async def wait_drain_announced(self) -> list[tuple[str, str]]:
        """Waits until every coordinator has answered the last :meth:`drain` (a refusal or a
        transport error counts as an answer; a 429 is retried first).  Bound it with a timeout.

        Returns:
            ``(url, why)`` for each coordinator that did not take it (none: every one did).
        """
        await self._drain_answered.wait()
        return [(url, why) for url, why in zip(self.urls, self._drain_result) if why]

    def drain_pending(self) -> list[str]:
        """The coordinators that have not answered the last :meth:`drain` yet."""
        return [url for url, why in zip(self.urls, self._drain_result) if why is None]

    def _drain_answer(self, index: int, info: dict[str, Any], why: str) -> None:
        if bool(info.get("Draining")) != self.draining or self._drain_result[index] is not None:
            return  # an answer to an entry sent before the last drain(), or already known
        self._drain_result[index] = why
        if all(r is not None for r in self._drain_result):
            self._drain_answered.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Announces until cancelled.  ``started`` comes after the first attempt with each
        coordinator, successful or not, so a coordinator that is down does not block the relay."""
        client = HTTPClient(timeout=max(5.0, min(self.interval, 10.0)), max_response_bytes=64 * 1024)
        try:
            async with trio.open_nursery() as nursery:
                for i, url in enumerate(self.urls):
                    await nursery.start(self._announce_to, i, url, client)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()

    async def _announce_to(self, index: int, url: str, client: HTTPClient,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        backoff = min(1.0, self.interval)
        last_error = ""
        while True:
            self._wake[index] = trio.Event()
            delay = self.intervals[index]
            info = self.node_info()
            if self.draining:
                info = {**info, "Draining": True}
            try:
                with trio.fail_after(max(5.0, min(self.interval, 10.0))):
                    answer = await announce_once(url, self.token, info, client=client)
                self.sent += 1
                asked = asked_interval(answer, self.interval)
                if asked is not None and asked != self.intervals[index]:
                    log.info("coordinator %s asks for a heartbeat every %g s", url, asked)
                    self.intervals[index] = delay = asked
                self._drain_answer(index, info, "")
                if last_error:
                    log.info("registered with coordinator %s again", url)
                elif not started:
                    log.info("registered %s with coordinator %s", info.get("Name"), url)
                last_error = ""
                backoff = min(1.0, self.interval)
            except (HTTPError, trio.TooSlowError) as exc:
                msg = str(exc) or "timed out"
                if isinstance(exc, AnnounceRefused):
                    delay = 1.0 if exc.status == 429 else self.intervals[index]  # up; it told us what is wrong
                    if exc.status != 429:
                        self._drain_answer(index, info, msg)
                else:
                    self._drain_answer(index, info, msg)
                    delay = backoff
                    backoff = min(backoff * 2, self.interval)
                if msg != last_error:
                    log.warning("registration with coordinator %s failed: %s; retrying every %.0f s at most",
                                url, msg, self.interval)
                last_error = msg
            if not started:
                started = True
                task_status.started()
            with trio.move_on_after(delay * random.uniform(0.9, 1.0)):
                await self._wake[index].wait()


async def announce_forever(
    coordinator_url: str,
    token: str,
    node_info: dict[str, Any],
    *,
    interval: float = 15.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Registers a fixed entry with one coordinator and heartbeats every ``interval`` seconds."""
    await Announcer([coordinator_url], token, lambda: node_info, interval=interval).run(task_status=task_status)


def certificate_is_trusted(cert_path: Path, key_path: Path, hostname: str, *, cafile: str | None = None) -> bool:
    """True if the certificate chain in ``cert_path`` verifies for ``hostname`` (a DNS name or
    an IP literal) against the system's roots (or ``cafile``), as a client checks it: such a
    certificate needs no ``sha256-raw:`` pin in the map, and it is not self-signed.

    The check is a TLS handshake in memory between a server holding the chain and a client
    with the roots, so it follows the same rules as any OpenSSL client.
    """
    import ssl

    try:
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(cert_path, key_path)
        client_ctx = ssl.create_default_context(cafile=cafile) if cafile else ssl.create_default_context()
    except (OSError, ssl.SSLError, ValueError):
        return False
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):  # a TLS 1.3 handshake takes two flights each way
        done = 0
        for side, out, peer_in in ((client, c_out, s_in), (server, s_out, c_in)):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLError, ValueError):
                return False
            peer_in.write(out.read())
        if done == 2:
            return True
    return False
