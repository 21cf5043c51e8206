"""Curve25519 node keys, their text forms, and NaCl box as DERP uses it.

A DERP client is addressed by its 32-byte node public key.  The relay's own
identity is a node key too.  Text forms (spec 1.2):

    nodekey:<64 hex>   typed public key (JSON, logs)
    privkey:<64 hex>   typed private key (derper's key file)
    <64 hex>           untyped public key (Derp-Public-Key header, meta-cert CN)

Sealed boxes are ``nonce(24) || tag(16) || ciphertext`` (spec 1.4), which is
what PyNaCl's ``Box.encrypt`` returns.  The nonce can be injected so tests are
deterministic.

The key agreement (X25519, then HSalsa20: NaCl's ``crypto_box_beforenm``) runs once per
login.  With the compiled speed-ups it is OpenSSL's X25519 (through cryptography) and
``_speedups.box_key``, a little faster than libsodium's; otherwise libsodium's.  Both refuse
a peer key of small order, and tests/derpd/test_keys.py checks that they agree.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass, field

import nacl.bindings
import nacl.exceptions
import nacl.utils
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from .accel import speedups

_box_key = getattr(speedups, "box_key", None)  # None: libsodium does the whole key agreement

KEY_LEN = 32
NONCE_LEN = 24

_NODE_PREFIX = "nodekey:"
_PRIV_PREFIX = "privkey:"
_HEXDIGITS = frozenset("0123456789abcdefABCDEF")
_ZERO_KEY = bytes(KEY_LEN)


class KeyFormatError(ValueError):
    """A key's text or bytes are malformed."""


def _parse_hex(text: str, prefix: str) -> bytes:
    if not text.startswith(prefix):
        raise KeyFormatError(f"key must start with {prefix!r}")
    body = text[len(prefix):]
    if len(body) != 2 * KEY_LEN or not _HEXDIGITS.issuperset(body):
        raise KeyFormatError(f"key must be {prefix!r} followed by {2 * KEY_LEN} hex digits")
    return bytes.fromhex(body)


@dataclass(frozen=True, slots=True)
class NodePublic:
    """A 32-byte Curve25519 public key that names a DERP client or server."""

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != KEY_LEN:
            raise KeyFormatError(f"a public key is {KEY_LEN} bytes")

    @classmethod
    def parse(cls, text: str) -> NodePublic:
        """Parse ``nodekey:<hex>``.

        Raises:
            KeyFormatError: the prefix or the hex digits are wrong.
        """
        return cls(_parse_hex(text, _NODE_PREFIX))

    @classmethod
    def from_hex(cls, text: str) -> NodePublic:
        """Parse an untyped 64-hex-digit key (as in ``Derp-Public-Key``)."""
        return cls(_parse_hex(text, ""))

    def is_zero(self) -> bool:
        return self.raw == bytes(KEY_LEN)

    def __repr__(self) -> str:
        return f"NodePublic({self})"

    def hex(self) -> str:
        return self.raw.hex()

    def __str__(self) -> str:
        return _NODE_PREFIX + self.raw.hex()

    def short(self) -> str:
        """A short form for log lines: ``[abcde]`` (first 5 hex digits)."""
        return "[" + self.raw.hex()[:5] + "]"


@dataclass(frozen=True, slots=True)
class NodePrivate:
    """A 32-byte Curve25519 private key."""

    raw: bytes
    _public: NodePublic = field(init=False, repr=False, compare=False)
    _x25519: X25519PrivateKey | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != KEY_LEN:
            raise KeyFormatError(f"a private key is {KEY_LEN} bytes")
        # computed once: the relay's key is used for every login
        object.__setattr__(self, "_public", NodePublic(nacl.bindings.crypto_scalarmult_base(self.raw)))
        object.__setattr__(self, "_x25519",
                           X25519PrivateKey.from_private_bytes(self.raw) if _box_key is not None else None)

    @classmethod
    def generate(cls) -> NodePrivate:
        """A fresh, clamped private key."""
        b = bytearray(os.urandom(KEY_LEN))
        b[0] &= 248
        b[31] = (b[31] & 127) | 64
        return cls(bytes(b))

    @classmethod
    def parse(cls, text: str) -> NodePrivate:
        """Parse ``privkey:<hex>`` (unclamped keys are accepted).

        Raises:
            KeyFormatError: the prefix or the hex digits are wrong.
        """
        return cls(_parse_hex(text, _PRIV_PREFIX))

    def __str__(self) -> str:
        return _PRIV_PREFIX + self.raw.hex()

    def __repr__(self) -> str:  # never print the secret by accident
        return f"NodePrivate(public={self.public})"

    def __reduce__(self):  # pickled as its bytes (to worker processes): the rest is derived
        return (NodePrivate, (self.raw,))

    @property
    def public(self) -> NodePublic:
        return self._public

    def box(self, peer: NodePublic) -> SealedBox:
        """A box for messages between this key and ``peer``.

        Raises:
            KeyFormatError: ``peer`` is the zero key (spec P-8) or another point of small order,
                for which the key agreement has no secret (libsodium refuses it).
        """
        raw = peer.raw
        if raw == _ZERO_KEY:
            raise KeyFormatError("the zero key cannot open or seal a box")
        x25519 = self._x25519
        try:
            if x25519 is not None and _box_key is not None:
                # OpenSSL refuses an all-zero shared secret: the peer is a point of small order
                return SealedBox(_box_key(x25519.exchange(X25519PublicKey.from_public_bytes(raw))))
            return SealedBox(nacl.bindings.crypto_box_beforenm(raw, self.raw))
        except (ValueError, nacl.exceptions.CryptoError) as e:
            raise KeyFormatError("a key of small order cannot open or seal a box") from e


class BoxOpenError(ValueError):
    """A sealed box did not open (short, forged, or for another key)."""


class SealedBox:
    """NaCl ``crypto_box`` between two keys, in DERP's ``nonce || box`` layout.  Holds the
    key agreement's result (the ``crypto_box_beforenm`` key), so each box costs only the
    XSalsa20-Poly1305 pass."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = key

    def seal(self, plaintext: bytes, nonce: bytes | None = None) -> bytes:
        if nonce is None:
            nonce = nacl.utils.random(NONCE_LEN)
        return nonce + nacl.bindings.crypto_box_afternm(plaintext, nonce, self._key)

    def open(self, sealed: bytes) -> bytes:
        """Returns the plaintext.

        Raises:
            BoxOpenError: too short or the tag does not verify.
        """
        if len(sealed) < NONCE_LEN + 16:
            raise BoxOpenError("sealed box too short")
        try:
            return nacl.bindings.crypto_box_open_afternm(sealed[NONCE_LEN:], sealed[:NONCE_LEN], self._key)
        except nacl.exceptions.CryptoError as e:
            raise BoxOpenError("box does not open") from e


def parse_mesh_key(text: str) -> bytes:
    """Parse a mesh key: 64 hex digits, surrounding whitespace trimmed.

    Raises:
        KeyFormatError: not exactly 64 hex digits, or all zero.
    """
    raw = _parse_hex(text.strip(), "")
    if raw == bytes(KEY_LEN):
        raise KeyFormatError("the mesh key must not be all zeros")
    return raw


def mesh_keys_equal(a: bytes | None, b: bytes | None) -> bool:
    """Constant-time comparison; a missing or zero key never matches."""
    if not a or not b or a == bytes(KEY_LEN):
        return False
    return hmac.compare_digest(a, b)
