"""derpd: a Tailscale-compatible DERP relay on Trio."""

__version__ = "0.1.0"
