"""A sans-IO reader of a TLS ClientHello: the SNI name and the ALPN list, nothing else.

Python's ``ssl`` lets a server pick a certificate by SNI (``sni_callback``) but never shows
it the client's ALPN list, and ACME's TLS-ALPN-01 challenge (RFC 8737) must be answered with
a special certificate only on a connection that offers exactly ``acme-tls/1``.  The relay
owns its listener, so it reads the first bytes of a connection with this parser, chooses a
context, and hands the same bytes on to OpenSSL.

``parse_client_hello(data)`` is called again with everything received so far; it returns
``None`` while the hello is incomplete, a ``ClientHello`` once it is complete, and raises
``HelloError`` for anything that is not a well-formed ClientHello or that would need more
than ``MAX_HELLO_BYTES`` (the caller then lets OpenSSL refuse the connection as usual).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_HELLO_BYTES = 16 * 1024  # a hello with post-quantum key shares and padding is ~2 KiB
_RECORD_HANDSHAKE = 22
_HANDSHAKE_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_MAX_RECORDS = 16  # a hello split over more records than this is refused


class HelloError(ValueError):
    """Not a ClientHello we can read; ``reason`` is a short metric label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ClientHello:
    server_name: str | None
    alpn: tuple[bytes, ...]


class _Reader:
    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data, self.pos, self.end = data, pos, len(data) if end is None else end

    def take(self, n: int) -> bytes:
        if self.pos + n > self.end:
            raise HelloError("truncated_hello")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def sub(self, length_bytes: int) -> _Reader:
        n = self.uint(length_bytes)
        if self.pos + n > self.end:
            raise HelloError("truncated_hello")
        inner = _Reader(self.data, self.pos, self.pos + n)
        self.pos += n
        return inner

    @property
    def left(self) -> int:
        return self.end - self.pos


def _handshake_bytes(data: bytes, max_bytes: int) -> bytes | None:
    """Joins the payloads of the leading handshake records until one whole handshake message
    is there; None if more bytes are needed."""
    payload = bytearray()
    pos = 0
    for _ in range(_MAX_RECORDS):
        if len(payload) >= 4:
            need = 4 + int.from_bytes(payload[1:4], "big")
            if need > max_bytes:
                raise HelloError("hello_too_large")
            if len(payload) >= need:
                return bytes(payload[:need])
        if len(data) - pos < 5:
            break
        if data[pos] != _RECORD_HANDSHAKE or data[pos + 1] != 3:
            raise HelloError("not_tls")
        length = int.from_bytes(data[pos + 3:pos + 5], "big")
        if length == 0 or length > 16384:
            raise HelloError("bad_record")
        if len(data) - pos - 5 < length:
            break
        payload += data[pos + 5:pos + 5 + length]
        pos += 5 + length
    else:
        raise HelloError("hello_too_fragmented")
    if len(data) >= max_bytes + 5 * _MAX_RECORDS:
        raise HelloError("hello_too_large")
    return None


def parse_client_hello(data: bytes, max_bytes: int = MAX_HELLO_BYTES) -> ClientHello | None:
    """Returns the ClientHello's SNI and ALPN once ``data`` holds all of it, else None.

    Raises:
        HelloError: ``data`` does not start with a well-formed ClientHello within ``max_bytes``.
    """
    msg = _handshake_bytes(data, max_bytes)
    if msg is None:
        return None
    if msg[0] != _HANDSHAKE_CLIENT_HELLO:
        raise HelloError("not_client_hello")
    r = _Reader(msg, 4)
    r.take(2 + 32)  # legacy_version, random
    r.sub(1)  # legacy_session_id
    r.sub(2)  # cipher_suites
    r.sub(1)  # legacy_compression_methods
    server_name: str | None = None
    alpn: tuple[bytes, ...] = ()
    if r.left == 0:
        return ClientHello(None, ())
    exts = r.sub(2)
    seen: set[int] = set()
    while exts.left:
        ext_type = exts.uint(2)
        body = exts.sub(2)
        if ext_type in seen:
            raise HelloError("duplicate_extension")
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            names = body.sub(2)
            while names.left:
                name_type = names.uint(1)
                name = names.sub(2)
                if name_type == 0 and server_name is None:
                    raw = name.take(name.left)
                    try:
                        server_name = raw.decode("ascii").lower()
                    except UnicodeDecodeError:
                        raise HelloError("bad_server_name") from None
        elif ext_type == _EXT_ALPN:
            protos = body.sub(2)
            out = []
            while protos.left:
                proto = protos.sub(1)
                out.append(proto.take(proto.left))
            alpn = tuple(out)
    return ClientHello(server_name, alpn)
