"""``--verify-clients``: ask the local tailscaled, over its LocalAPI unix socket, whether a node
key belongs to the tailnet -- derper's ``WhoIsNodeKey`` check.

The request is the one Tailscale's own LocalAPI client (``client/local``) sends::

    GET /localapi/v0/whois?addr=nodekey%3A<64 hex> HTTP/1.1
    Host: local-tailscaled.sock
    Tailscale-Cap: 138

over ``--socket`` (default ``/var/run/tailscale/tailscaled.sock``, as tailscale's
``paths.DefaultTailscaledSocket`` on Linux).  tailscaled answers 200 with a JSON
``WhoIsResponse`` for a node of the tailnet and 404 for a key it does not know.

Decisions (``Decision`` of ``derpd.admission``): 200 with a JSON object admits; 404 refuses
(``verify_denied``); any other status refuses (``verify_status``; a 400 about the ``addr``
parameter means tailscaled is too old, which is logged once); a body that is not a JSON object
refuses (``verify_bad_response``); no answer at all (socket missing, refused, timed out) is
``VerifyUnreachable``, which admission turns into a refusal: derper fails closed here, and so
does derpd.  Caching, the concurrency cap, the per-source caps and the metrics are admission's
(``VerifyClientURL`` with this module's ``query``).
"""

from __future__ import annotations

import json
import logging
import os
from urllib.parse import quote

import httpx

from .admission import Decision, VerifyClientURL, VerifyUnreachable
from .keys import NodePublic

log = logging.getLogger("derpd.admission")

LOCALAPI_HOST = "local-tailscaled.sock"
CAPABILITY_VERSION = 138  # tailcfg.CurrentCapabilityVersion at tailscale.com v1.98.10
MAX_ANSWER = 256 << 10  # a WhoIsResponse is a few KiB (node, user profile, capabilities)
TIMEOUT = 5.0


def default_socket() -> str:
    """tailscale's ``paths.DefaultTailscaledSocket()`` on Linux."""
    return "/var/run/tailscale/tailscaled.sock" if os.path.isdir("/var/run") else "tailscaled.sock"


def whois_target(key: NodePublic) -> str:
    return "/localapi/v0/whois?addr=" + quote(str(key), safe="")


def judge_whois(status: int, body: bytes) -> Decision:
    """tailscaled's answer to a whois by node key, judged as derper does.  Never raises."""
    if status == 404:
        return False, "verify_denied"
    if status != 200:
        return False, "verify_status"
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return False, "verify_bad_response"
    return (True, "") if isinstance(doc, dict) else (False, "verify_bad_response")


class LocalAPI:
    """A client of one tailscaled's LocalAPI socket (one pooled keep-alive connection set)."""

    def __init__(self, socket_path: str, *, timeout: float = TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None  # made in the running event loop, on first use
        self._too_old_logged = False

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=self.socket_path),
                base_url=f"http://{LOCALAPI_HOST}",
                timeout=httpx.Timeout(self.timeout),
                follow_redirects=False,
                trust_env=False,
                headers={"Tailscale-Cap": str(CAPABILITY_VERSION), "User-Agent": "derpd"},
            )
        return self._client

    async def get(self, target: str) -> tuple[int, bytes]:
        """GET ``target``; returns the status and at most ``MAX_ANSWER`` bytes of the body.

        Raises:
            VerifyUnreachable: no answer (no socket, connection refused or reset, timeout).
        """
        try:
            async with self._http().stream("GET", target) as response:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_ANSWER:
                        return response.status_code, b""  # judged as a bad answer
                return response.status_code, bytes(body)
        except httpx.TransportError as e:
            raise VerifyUnreachable(f"tailscaled LocalAPI at {self.socket_path}: {e or type(e).__name__}") from e

    async def query(self, key: NodePublic, ip: str) -> Decision:
        """The admission query: is ``key`` a node of this tailnet?  (``ip`` is not asked about.)"""
        status, body = await self.get(whois_target(key))
        if status == 400 and b"addr" in body and not self._too_old_logged:
            self._too_old_logged = True
            log.error("tailscaled at %s does not understand whois by node key: it is too old; upgrade it",
                      self.socket_path)
        return judge_whois(status, body)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def tailscaled_verifier(socket_path: str | None = None) -> VerifyClientURL:
    """``--verify-clients [--socket PATH]``: admission's cached, capped check asking tailscaled,
    failing closed as derper does."""
    api = LocalAPI(socket_path or default_socket())
    if not os.path.exists(api.socket_path):
        log.warning("--verify-clients: no tailscaled socket at %s yet; every client is refused until tailscaled "
                    "runs there (or pass --socket PATH)", api.socket_path)
    return VerifyClientURL(f"tailscaled at {api.socket_path}", fail_open=False, timeout=api.timeout,
                           query=api.query)
