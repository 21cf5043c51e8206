"""``DrainingSSLStream``: trio's SSLStream, but one ``receive_some`` returns every complete TLS
record already received, not just one.

Go clients write one TLS record per packet, and ``SSLObject.read`` decrypts one record per
call, so a plain ``SSLStream`` hands the relay's reader one packet per wakeup and loses all
batching (measured: 3.8-5.3x fewer packets/s over TLS than with draining, bench/README.md).
After trio's ``receive_some`` returns, this decrypts whatever more is already buffered in the
incoming BIO, without any further I/O, and returns it in the same call.

trio's SSLStream cannot be subclassed, so this wraps one and forwards everything else to it.
"""

from __future__ import annotations

import ssl
from typing import Any

import trio

_DRAIN_CHUNK = 65536


class DrainingSSLStream(trio.abc.Stream):
    def __init__(self, transport: trio.abc.Stream, context: ssl.SSLContext, **kwargs: Any) -> None:
        self.ssl = trio.SSLStream(transport, context, **kwargs)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.ssl.receive_some(max_bytes)
        # The SSLObject is private to trio; without it we simply do not drain.
        obj = getattr(self.ssl, "_ssl_object", None)
        if not data or obj is None:
            return data
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
        inner = self.ssl
        obj = getattr(inner, "_ssl_object", None)
        incoming = getattr(inner, "_incoming", None)
        outgoing = getattr(inner, "_outgoing", None)
        transport = inner.transport_stream
        if not (isinstance(obj, ssl.SSLObject) and isinstance(incoming, ssl.MemoryBIO)
                and isinstance(outgoing, ssl.MemoryBIO) and type(transport) is trio.SocketStream):
            return None
        if outgoing.pending or obj.version() is None:
            return None
        return transport.socket.fileno(), obj, incoming, outgoing

    async def wait_send_all_might_not_block(self) -> None:
        await self.ssl.wait_send_all_might_not_block()

    async def do_handshake(self) -> None:
        await self.ssl.do_handshake()

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self.ssl.getpeercert(binary_form)

    async def aclose(self) -> None:
        await self.ssl.aclose()
