"""Fuzz target: the STUN codec (strict and lenient parsing, every attribute decoder) and the
server's per-datagram decision.  Only ``stund.message.RemoteProtocolError`` may escape from
the codec; ``stund.binding.answer`` must never raise; and whatever the compiled answering
thread answers itself (``stund._mmsg.answer``, when built) is ``answer``'s reply, byte for
byte."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _modules() -> None:
    import stund.binding  # noqa: F401
    import stund.message  # noqa: F401


def one_input(data: bytes) -> None:
    from stund import message as m
    from stund.binding import answer

    try:
        from stund import _mmsg
    except ImportError:  # no C compiler when the package was built: the Python checks only
        _mmsg = None

    for ip, port, tailscale_only in ((b"\xc0\x00\x02\x01", 54321, False), (bytes(15) + b"\x01", 1, True)):
        want = answer(data, ip, port, tailscale_only=tailscale_only)
        if _mmsg is not None and (got := _mmsg.answer(data, ip, port, tailscale_only)) is not None:
            assert (got[0], ("tailscale", "rfc5389", "rfc3489")[got[1]]) == (want.data, want.kind), data.hex()
    for strict in (True, False):
        try:
            msg = m.parse_message(data, strict=strict)
        except m.RemoteProtocolError:
            continue
        for attr in msg.attributes:
            for decode in (m.decode_address, m.decode_error_code, m.decode_unknown_attributes,
                           m.decode_change_request, m.decode_response_port,
                           lambda v: m.decode_xor_address(v, msg.transaction_id)):
                try:
                    decode(attr.value)
                except m.RemoteProtocolError:
                    pass


if __name__ == "__main__":
    from _harness import main

    main("stun", one_input, _modules)
