"""Choosing the TLS context of a relay connection while ACME is at work.

A TLS-ALPN-01 validation (RFC 8737) is a TLS connection whose ClientHello offers exactly
``acme-tls/1``; it must get the challenge certificate, every other connection the relay's
own.  ``ssl``'s SNI callback cannot see ALPN, so while a TLS-ALPN-01 challenge is pending
(and only then: the steady state is untouched) the relay reads the ClientHello itself with
the sans-IO ``derpd.protocol.tls_hello`` parser, within ``HELLO_TIMEOUT`` seconds and
``MAX_HELLO_BYTES``, decides, and hands the bytes it read on to OpenSSL through
``derpd.transport``'s ``PrefixedStream``.  A validation connection only completes its handshake
and is closed.
"""

from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING

import trio

from ..protocol.tls_hello import MAX_HELLO_BYTES, HelloError, parse_client_hello
from ..transport.prefixed_stream import PrefixedStream
from .tls import ACME_TLS_ALPN

if TYPE_CHECKING:
    from .server import RelayServer

log = logging.getLogger("derpd.tls")

HELLO_TIMEOUT = 10.0


async def _read_hello(stream: trio.abc.Stream, timeout: float) -> tuple[bytes, bool, str | None]:
    """Reads until the ClientHello is complete.  Returns (bytes read, is an acme-tls/1
    validation, its SNI); a hello we cannot read is left for OpenSSL to refuse."""
    data = b""
    with trio.move_on_after(timeout):
        while True:
            chunk = await stream.receive_some(MAX_HELLO_BYTES)
            if not chunk:
                return data, False, None
            data += chunk
            if len(data) >= 5 and len(data) < 5 + int.from_bytes(data[3:5], "big") and len(data) < MAX_HELLO_BYTES:
                continue  # the first record is not complete yet: no need to parse (a drip-feeding peer)
            try:
                hello = parse_client_hello(data)
            except HelloError:
                return data, False, None
            if hello is not None:
                return data, hello.alpn == (ACME_TLS_ALPN,), hello.server_name
    return data, False, None


async def select_tls(server: RelayServer, stream: trio.abc.Stream,
                     remote: tuple[str, int]) -> tuple[trio.abc.Stream, ssl.SSLContext] | None:
    """The stream and context to serve this connection with, or None when it is done with
    (a TLS-ALPN-01 validation was answered) or cannot be served (no certificate yet)."""
    challenges = server.challenges
    if challenges is None or not challenges.tls_alpn01_pending():
        if server.ssl_context is None:
            server.stats.handshake_failures["no_certificate"] += 1
            log.debug("closing a connection from %s: no certificate yet (ACME has not obtained one)", remote[0])
            return None
        return stream, server.ssl_context
    data, validation, server_name = await _read_hello(stream, min(HELLO_TIMEOUT, server.settings.http_timeout))
    if validation:
        ctx = challenges.tls_alpn01_context(server_name)
        if ctx is None:
            server.stats.handshake_failures["acme_tls_alpn_unknown"] += 1
            log.debug("acme-tls/1 hello from %s for %r, which has no pending challenge", remote[0], server_name)
            return None
        ssl_stream = trio.SSLStream(PrefixedStream(stream, data), ctx, server_side=True)
        try:
            with trio.move_on_after(HELLO_TIMEOUT):
                await ssl_stream.do_handshake()
                log.info("answered a TLS-ALPN-01 validation from %s for %s", remote[0], server_name)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return None
    if server.ssl_context is None:
        server.stats.handshake_failures["no_certificate"] += 1
        log.debug("closing a connection from %s: no certificate yet (ACME has not obtained one)", remote[0])
        return None
    return PrefixedStream(stream, data), server.ssl_context
