"""``DrainingSSLStream``: trio's SSLStream, but one ``receive_some`` returns every complete TLS
record already received, not just one.

Go clients write one TLS record per packet, and ``SSLObject.read`` decrypts one record per
call, so a plain ``SSLStream`` hands the relay's reader one packet per wakeup and loses all
batching (measured: 3.8-5.3x fewer packets/s over TLS than with draining, bench/README.md).
After trio's ``receive_some`` returns, this decrypts whatever more is already buffered in the
incoming BIO, without any further I/O, and returns it in the same call.

trio's SSLStream cannot be subclassed, so this wraps one and forwards everything else to it.

trio's private attributes: draining and the compiled data plane's takeover need the
``ssl.SSLObject`` and the two ``ssl.MemoryBIO`` objects under a ``trio.SSLStream``, which trio
does not expose, and the takeover must know that trio holds no ciphertext back.  ``session_of``
and ``held_back`` below are the only code in derpd that touches trio's private attributes
(``TRIO_PRIVATE``); tests/derpd/test_tls_adapter.py runs them on a real ``trio.SSLStream`` and
fails, naming the trio version, when trio's internals change.  Should they change in
production, ``session_of`` returns None: the relay still works, without draining and with TLS
clients on the Python reader and writer.
"""

from __future__ import annotations

import ssl
from typing import Any, NamedTuple

import trio

_DRAIN_CHUNK = 65536

#: The private attributes of ``trio.SSLStream`` read here (as of trio 0.35): the SSLObject, the
#: BIO trio writes received ciphertext into, the BIO it sends from (``session_of``), and the
#: ciphertext it holds back until its first send (``held_back``).
TRIO_PRIVATE = ("_ssl_object", "_incoming", "_outgoing", "_delayed_outgoing")
_MISSING = object()


class SSLSession(NamedTuple):
    """The TLS session under a ``trio.SSLStream``."""

    obj: ssl.SSLObject
    incoming: ssl.MemoryBIO  # ciphertext received, not yet decrypted
    outgoing: ssl.MemoryBIO  # ciphertext made, not yet sent


def session_of(stream: trio.SSLStream) -> SSLSession | None:
    """The SSLObject and BIOs a ``trio.SSLStream`` uses, or None if trio keeps them elsewhere
    (then nothing may rely on them).  The one adapter to trio's private attributes."""
    obj, incoming, outgoing = (getattr(stream, name, None) for name in TRIO_PRIVATE[:3])
    if isinstance(obj, ssl.SSLObject) and isinstance(incoming, ssl.MemoryBIO) and isinstance(outgoing, ssl.MemoryBIO):
        return SSLSession(obj, incoming, outgoing)
    return None


def held_back(stream: trio.SSLStream) -> bytes | None:
    """Ciphertext trio has taken from the outgoing BIO but not sent: a TLS 1.3 server's session
    tickets wait there for its first send.  b"" when there is none; None when this trio keeps
    no such thing where we look (then nobody can tell, and nothing may write around trio)."""
    value = getattr(stream, TRIO_PRIVATE[3], _MISSING)
    if value is None:
        return b""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return None


class DrainingSSLStream(trio.abc.Stream):
    def __init__(self, transport: trio.abc.Stream, context: ssl.SSLContext, **kwargs: Any) -> None:
        self.ssl = trio.SSLStream(transport, context, **kwargs)
        # trio makes the SSLObject with the stream and keeps it (an unwrap, which derpd never
        # does, would end it); without it we simply do not drain
        self._session = session_of(self.ssl)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.ssl.receive_some(max_bytes)
        session = self._session
        if not data or session is None:
            return data
        obj = session.obj
        limit = (max_bytes or (1 << 20)) - len(data)
        chunks = [data]
        try:
            while limit > 0:
                more = obj.read(min(_DRAIN_CHUNK, limit))
                if not more:
                    break
                chunks.append(more)
                limit -= len(more)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, ssl.SSLZeroReturnError):
            pass  # nothing more buffered (or the peer's close_notify: the next call reports EOF)
        except ssl.SSLError:
            pass  # the next receive_some raises it through trio's usual path
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.ssl.send_all(data)

    def takeover(self) -> tuple[int, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO] | None:
        """For the relay's compiled data plane: the socket's descriptor, the SSLObject and its
        incoming and outgoing BIOs, once the handshake is done and nothing is waiting to be
        sent; from then on the caller reads and writes the session.  None when this stream
        cannot be taken over (not directly on a TCP socket, or trio's internals differ)."""
        session = self._session
        transport = self.ssl.transport_stream
        if session is None or type(transport) is not trio.SocketStream:
            return None
        if session.outgoing.pending or held_back(self.ssl) != b"" or session.obj.version() is None:
            return None
        return transport.socket.fileno(), session.obj, session.incoming, session.outgoing

    async def wait_send_all_might_not_block(self) -> None:
        await self.ssl.wait_send_all_might_not_block()

    async def do_handshake(self) -> None:
        await self.ssl.do_handshake()

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self.ssl.getpeercert(binary_form)

    async def aclose(self) -> None:
        await self.ssl.aclose()
