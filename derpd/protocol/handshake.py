"""The DERP login, as sans-IO state machines for both ends.

Theory of operation
-------------------
::

    server                                  client
    ServerHandshake.server_key_frame() ──▶  ClientHandshake: ServerKey event
                                       ◀──  client_info_frame(server_key)
    next_event() → ClientAuthenticated      (fast start: the client already knew the key from
    [admission, register the client]        the TLS meta-certificate and sent ClientInfo
    server_info_frame(client_key)      ──▶  without waiting; it still receives ServerKey)
                                            next_event() → LoginComplete

ServerInfo must be the very first frame after ServerKey (P-3): the server registers the client
*before* writing ServerInfo, but starts its send loop only after, so nothing can overtake it.

The first frame a server reads must be ClientInfo; anything else aborts the login.  The
ClientInfo box is opened with the server's private key and the key the client claims, so a
client proves it owns its key.  The all-zero key is refused outright (P-8).

Nonces come from ``nonce()`` (24 random bytes by default) and can be injected for tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from ..keys import KEY_LEN, NONCE_LEN, BoxOpenError, KeyFormatError, NodePrivate, NodePublic, SealedBox
from .errors import LocalProtocolError, RemoteProtocolError
from .frames import (
    CLIENT_MAX_FRAME_LEN,
    CLIENT_READ_LIMITS,
    MAGIC,
    SERVER_READ_LIMITS,
    FrameDecoder,
    FrameType,
    encode_frame,
)
from .messages import ClientInfo, ServerInfo

__all__ = [
    "NEED_DATA",
    "ClientAuthenticated",
    "ClientHandshake",
    "LoginComplete",
    "ServerHandshake",
    "ServerKeyReceived",
]


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
_DEFAULT_SERVER_INFO = ServerInfo().to_json()  # what nearly every login sends: encoded once


# Nonces are cut from a pool of random bytes filled 256 nonces at a time: one getrandom()
# system call per 256 logins instead of one per login.  A forked child starts with an empty
# pool, so no two processes ever hand out the same nonce.
_NONCES_PER_FILL = 256
_nonce_pool: list = [b"", 0]


def _random_nonce() -> bytes:
    pool, at = _nonce_pool
    if at >= len(pool):
        pool, at = os.urandom(NONCE_LEN * _NONCES_PER_FILL), 0
        _nonce_pool[0] = pool
    _nonce_pool[1] = at + NONCE_LEN
    return pool[at : at + NONCE_LEN]


def _empty_nonce_pool() -> None:
    _nonce_pool[:] = [b"", 0]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_empty_nonce_pool)


@dataclass(frozen=True, slots=True)
class ClientAuthenticated:
    """The server opened a valid ClientInfo."""

    key: NodePublic
    info: ClientInfo


@dataclass(frozen=True, slots=True)
class ServerKeyReceived:
    key: NodePublic


@dataclass(frozen=True, slots=True)
class LoginComplete:
    server_key: NodePublic
    info: ServerInfo


class ServerHandshake:
    """Server side of the login.  ``decoder`` keeps any bytes after ClientInfo for the
    steady state, so fast-start clients that pipeline frames lose nothing."""

    __slots__ = ("_key", "_nonce", "decoder", "client", "_box")

    def __init__(self, private_key: NodePrivate, *, nonce: Callable[[], bytes] = _random_nonce) -> None:
        self._key = private_key
        self._nonce = nonce
        self.decoder = FrameDecoder(SERVER_READ_LIMITS)
        self.client: ClientAuthenticated | None = None
        self._box: SealedBox | None = None  # one key agreement per login, for both directions

    def server_key_frame(self) -> bytes:
        return encode_frame(FrameType.SERVER_KEY, MAGIC + self._key.public.raw)

    def receive_data(self, data: bytes) -> None:
        self.decoder.receive_data(data)

    def next_event(self) -> ClientAuthenticated | _NeedData:
        """Returns ``ClientAuthenticated`` once a valid ClientInfo arrived.

        Raises:
            RemoteProtocolError: reasons ``bad_frame_type``, ``bad_client_info``,
                ``zero_key``, ``small_order_key``, ``box_open_failed``, ``frame_too_large``, ``truncated_frame``,
                ``eof``.
        """
        if self.client is not None:
            raise LocalProtocolError("the login is already complete")
        # The first frame must be ClientInfo (spec 5.11); check the type byte as soon as it
        # arrives, before the decoder would skip an unknown type by streaming.
        head = self.decoder.buffered()[:1]
        if head and head[0] != FrameType.CLIENT_INFO:
            raise RemoteProtocolError(f"expected ClientInfo, got frame type {head[0]:#x}", "bad_frame_type")
        frame = self.decoder.next_frame()
        if frame is None:
            if self.decoder.eof:
                raise RemoteProtocolError("connection closed before ClientInfo", "eof")
            return NEED_DATA
        ftype, payload = frame
        if ftype != FrameType.CLIENT_INFO:
            raise RemoteProtocolError(f"expected ClientInfo, got frame type {ftype:#x}", "bad_frame_type")
        if len(payload) < KEY_LEN + NONCE_LEN:
            raise RemoteProtocolError(f"ClientInfo of {len(payload)} bytes", "bad_client_info")
        client_key = NodePublic(payload[:KEY_LEN])
        if client_key.is_zero():
            raise RemoteProtocolError("ClientInfo with the zero key", "zero_key")
        try:
            self._box = self._key.box(client_key)
        except KeyFormatError as e:  # a point of small order: no shared secret (derper would accept it)
            raise RemoteProtocolError("ClientInfo with a key of small order", "small_order_key") from e
        try:
            plaintext = self._box.open(payload[KEY_LEN:])
        except BoxOpenError as e:
            raise RemoteProtocolError("ClientInfo box does not open", "box_open_failed") from e
        self.client = ClientAuthenticated(client_key, ClientInfo.from_json(plaintext))
        return self.client

    def server_info_frame(self, info: ServerInfo | None = None) -> bytes:
        """Raises: LocalProtocolError before the client is authenticated."""
        if self.client is None:
            raise LocalProtocolError("ServerInfo before ClientInfo")
        assert self._box is not None
        plain = _DEFAULT_SERVER_INFO if info is None else info.to_json()
        sealed = self._box.seal(plain, self._nonce())
        return encode_frame(FrameType.SERVER_INFO, sealed)


class ClientHandshake:
    """Client side of the login.

    Without fast start: feed bytes until ``ServerKeyReceived``, send
    ``client_info_frame(event.key)``, feed until ``LoginComplete``.  With fast start, pass
    ``server_key`` and send ``client_info_frame()`` right away; the ServerKey that still
    arrives is checked against it.
    """

    __slots__ = ("_key", "_info", "_nonce", "decoder", "server_key", "_sent_info", "_done", "_box")

    def __init__(
        self,
        private_key: NodePrivate,
        info: ClientInfo,
        *,
        server_key: NodePublic | None = None,
        nonce: Callable[[], bytes] = _random_nonce,
    ) -> None:
        self._key = private_key
        self._info = info
        self._nonce = nonce
        self.decoder = FrameDecoder(CLIENT_READ_LIMITS, max_unknown=CLIENT_MAX_FRAME_LEN)
        self.server_key = server_key
        self._sent_info = False
        self._done = False
        self._box: SealedBox | None = None

    def receive_data(self, data: bytes) -> None:
        self.decoder.receive_data(data)

    def client_info_frame(self, server_key: NodePublic | None = None) -> bytes:
        """Raises: LocalProtocolError when no server key is known yet, or sent twice."""
        key = server_key or self.server_key
        if key is None:
            raise LocalProtocolError("ClientInfo needs the server key")
        if self._sent_info:
            raise LocalProtocolError("ClientInfo was already sent")
        if self._box is None or key != self.server_key:
            self._box = self._key.box(key)  # fast start: the key came from the caller
        self.server_key = key
        self._sent_info = True
        sealed = self._box.seal(self._info.to_json(), self._nonce())
        return encode_frame(FrameType.CLIENT_INFO, self._key.public.raw + sealed)

    def next_event(self) -> ServerKeyReceived | LoginComplete | _NeedData:
        """Raises:
        RemoteProtocolError: a bad ServerKey (``bad_server_key``), a server key that differs
            from the fast-start one (``server_key_mismatch``), a ServerInfo that does not
            open or parse (``bad_server_info``), an unexpected frame, or EOF (``eof``).
        """
        while True:
            frame = self.decoder.next_frame()
            if frame is None:
                if self.decoder.eof:
                    raise RemoteProtocolError("connection closed during login", "eof")
                return NEED_DATA
            ftype, payload = frame
            if ftype == FrameType.SERVER_KEY:
                if len(payload) < 40 or payload[:8] != MAGIC:
                    raise RemoteProtocolError("malformed ServerKey", "bad_server_key")
                key = NodePublic(payload[8:40])
                if self._sent_info:
                    if key != self.server_key:
                        raise RemoteProtocolError("ServerKey differs from the expected key", "server_key_mismatch")
                    continue  # fast start: the key was already known
                try:
                    self._box = self._key.box(key)  # here, so a bad key is the server's error
                except KeyFormatError as e:
                    raise RemoteProtocolError("ServerKey of small order", "bad_server_key") from e
                self.server_key = key
                return ServerKeyReceived(key)
            if ftype == FrameType.SERVER_INFO:
                if not self._sent_info or self.server_key is None:
                    raise RemoteProtocolError("ServerInfo before ClientInfo", "bad_frame_type")
                if len(payload) < NONCE_LEN:
                    raise RemoteProtocolError("short ServerInfo", "bad_server_info")
                try:
                    assert self._box is not None
                    plaintext = self._box.open(payload)
                except BoxOpenError as e:
                    raise RemoteProtocolError("ServerInfo box does not open", "bad_server_info") from e
                self._done = True
                return LoginComplete(self.server_key, ServerInfo.from_json(plaintext))
            raise RemoteProtocolError(f"unexpected frame type {ftype:#x} during login", "bad_frame_type")
