"""Typed protocol errors, in the style of h11.

``LocalProtocolError`` means *we* misused the API (a bug on our side).
``RemoteProtocolError`` means the peer sent something invalid; it carries a short,
closed-vocabulary ``reason`` that the I/O layer uses as a metric label and in its log line.
The I/O layer catches only ``RemoteProtocolError``; a Hypothesis test proves that garbage
input raises nothing else.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class of every DERP protocol error."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer violated the protocol.

    Attributes:
        reason: a short snake_case label for metrics (``frame_too_large``, ``bad_client_info``...).
    """

    def __init__(self, message: str, reason: str = "protocol_error") -> None:
        super().__init__(message)
        self.reason = reason
