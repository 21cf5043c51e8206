"""The contract between the compiled data plane (derpd/_dataplane.c) and Python: every name the
C uses on an object Python gave it is exported in ``_dataplane.CONTRACT`` and declared on the
Python side (``EngineConnection`` and the callbacks in derpd/relay/dataplane.py, the ssl
module), and ``ClientConnection`` provides what is declared.  A renamed attribute or callback
fails here, not at run time on the compiled path.  The last test runs packets, a duplicate and
a destination the engine does not own through the engine with connections that refuse every
attribute access: the engine reads nothing of a connection."""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any

import pytest

from derpd.metrics import RelayStats
from derpd.protocol.frames import FrameType, encode_frame
from derpd.protocol.messages import DISCO_MAGIC, DISCO_MIN_LEN
from derpd.relay.client_connection import ClientConnection
from derpd.relay.dataplane import EngineConnection
from derpd.relay.registry import Member
from tests.compiled import optional

_dataplane = optional("derpd._dataplane")

pytestmark = pytest.mark.skipif(_dataplane is None, reason="derpd._dataplane not built (no C compiler)")

SEND_LIMIT = 64 * 1024


def members(protocol: type) -> set[str]:
    """The attributes and methods a Protocol declares."""
    names = set(protocol.__annotations__)
    names |= {name for name, value in vars(protocol).items() if callable(value) and not name.startswith("_")}
    return names


def provides(cls: type, name: str) -> bool:
    return name in getattr(cls, "__slots__", ()) or hasattr(cls, name)


def test_every_name_the_c_takes_from_a_connection_is_declared():
    declared = members(EngineConnection)
    assert set(_dataplane.CONTRACT["connection"]) <= declared, "the C reads a connection attribute nobody declared"
    assert set(_dataplane.CONTRACT["add"]) <= declared, "Engine.add takes a connection attribute nobody declared"


@pytest.mark.parametrize("protocol", [EngineConnection, Member], ids=["EngineConnection", "Member"])
def test_client_connection_provides_what_the_data_plane_uses(protocol):
    missing = sorted(name for name in members(protocol) if not provides(ClientConnection, name))
    assert missing == [], f"ClientConnection lacks {missing} ({protocol.__name__})"


def test_the_engine_takes_exactly_the_callbacks_the_data_plane_gives():
    from derpd.relay.dataplane import DataPlane

    dp = DataPlane.__new__(DataPlane)
    dp.stats = RelayStats()
    given = dp.callbacks(print, print, time.monotonic)
    assert set(given) == set(_dataplane.CONTRACT["callbacks"])
    # and each is required: an Engine without one is refused at construction, by name
    for name in _dataplane.CONTRACT["callbacks"]:
        partial = {k: v for k, v in given.items() if k != name}
        with pytest.raises(TypeError, match=name):
            _dataplane.Engine({}, **partial, disco_magic=DISCO_MAGIC, disco_min_len=DISCO_MIN_LEN,
                              send_limit=SEND_LIMIT, depth=4, recv_size=65536)


def test_the_ssl_methods_the_engine_binds_exist():
    for cls, key in ((ssl.SSLObject, "ssl.SSLObject"), (ssl.MemoryBIO, "ssl.MemoryBIO")):
        missing = [name for name in _dataplane.CONTRACT[key] if not hasattr(cls, name)]
        assert missing == [], f"{key} has no {missing} in this Python's ssl module"


class Sealed:
    """A connection that refuses every attribute access: only the test's own callbacks look
    inside (through ``object.__getattribute__``)."""

    __slots__ = ("_key", "_saw", "_got")
    touched: list[str] = []

    def __init__(self, key: bytes) -> None:
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_saw", set())
        object.__setattr__(self, "_got", [])

    def __getattribute__(self, name: str) -> Any:
        Sealed.touched.append(name)
        raise AttributeError(f"the engine read {name!r} of a connection")


def inside(conn: Sealed, name: str) -> Any:
    return object.__getattribute__(conn, name)


def test_the_engine_reads_nothing_of_a_connection():
    key = [bytes([i]) * 32 for i in range(5)]
    active: dict[bytes, Sealed] = {}
    calls: list[tuple[str, Sealed]] = []
    stats = RelayStats()

    def watch(conn, src):
        calls.append(("watch", conn))
        inside(conn, "_saw").add(src)

    def enqueue(conn, src, frame, disco):
        calls.append(("enqueue", conn))
        if src not in inside(conn, "_saw"):
            watch(conn, src)
        inside(conn, "_got").append(frame)
        return False

    def note_activity(conn):
        calls.append(("note_activity", conn))

    def count(*counts):
        stats.packets_received += counts[0]
        stats.packets_sent += counts[3]

    engine = _dataplane.Engine(active, watch=watch, note_activity=note_activity, enqueue=enqueue, count=count,
                               drop=stats.drop, clock=lambda: 5.0, disco_magic=DISCO_MAGIC,
                               disco_min_len=DISCO_MIN_LEN, send_limit=SEND_LIMIT, depth=4, recv_size=65536)
    socks = []
    try:
        ends = {}
        for i in (1, 2):  # served by the engine
            ours, peer = socket.socketpair()
            ours.setblocking(False)
            peer.settimeout(5)
            socks += [ours, peer]
            conn = Sealed(key[i])
            slot = engine.add(ours.fileno(), conn, key[i], inside(conn, "_saw"))
            engine.resume(slot, b"")
            active[key[i]] = conn
            ends[i] = (conn, slot, peer)
        python_side = Sealed(key[3])  # a destination the engine does not own
        active[key[3]] = python_side
        a, a_slot, a_peer = ends[1]
        b, b_slot, b_peer = ends[2]
        active[key[1]] = Sealed(key[1])  # a is a duplicate, not the active one for its key
        wire = b"".join(encode_frame(FrameType.SEND_PACKET, dst + body)
                        for dst, body in ((key[2], b"one"), (key[2], DISCO_MAGIC + bytes(40)), (key[3], b"two")))
        a_peer.sendall(wire)
        for _ in range(200):
            engine.poll(False)
            if stats.packets_received == 3:
                break
        assert b_peer.recv(1000).startswith(encode_frame(FrameType.RECV_PACKET, key[1] + b"one"))
        assert len(inside(python_side, "_got")) == 1
        engine.send_control(b_slot, encode_frame(FrameType.KEEP_ALIVE, b""))
        assert engine.expire(1.0) is None
        engine.remove(a_slot)
        engine.remove(b_slot)
        assert Sealed.touched == [], f"the engine read {Sealed.touched} of a connection"
        assert ("watch", b) in calls and ("enqueue", python_side) in calls and ("note_activity", a) in calls
    finally:
        for s in socks:
            s.close()
