"""stund: a STUN server (RFC 8489/5389, RFC 3489 classic, RFC 5780) on Trio, Tailscale-compatible."""

from .client import StunResult, StunTimeout, stun_query
from .message import ProtocolError, RemoteProtocolError, StunError
from .server import serve_stun

__all__ = ["serve_stun", "stun_query", "StunResult", "StunTimeout", "StunError", "ProtocolError", "RemoteProtocolError"]
