"""Hypothesis state machines: the frame decoder, the login, the HTTP front door and the STUN
codec take valid traffic and garbage in any order and chunking, and raise nothing but their
own protocol error."""

from __future__ import annotations

import h11
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from derpd.keys import NodePrivate
from derpd.protocol import errors
from derpd.protocol.frames import SERVER_READ_LIMITS, FrameDecoder, encode_frame
from derpd.protocol.handshake import NEED_DATA, ClientAuthenticated, ClientHandshake, ServerHandshake
from derpd.protocol.messages import ClientInfo, parse_client_frame
from derpd.protocol.upgrade import Response, route_request
from stund import message as stun

SETTINGS = settings(max_examples=60, stateful_step_count=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
KNOWN = sorted(SERVER_READ_LIMITS)
valid_frame = st.sampled_from(KNOWN).flatmap(
    lambda t: st.binary(max_size=min(SERVER_READ_LIMITS[t], 300)).map(lambda p: (t, p)))
unknown_frame = st.sampled_from([0x0B, 0x0F, 0x13, 0x14, 0x99, 0xFF]).flatmap(
    lambda t: st.binary(max_size=300).map(lambda p: (t, p)))


class FrameDecoderMachine(RuleBasedStateMachine):
    """Valid frames come out exactly as sent, whatever the chunking; after garbage, only
    RemoteProtocolError may be raised."""

    def __init__(self) -> None:
        super().__init__()
        self.dec = FrameDecoder(SERVER_READ_LIMITS)
        self.pending = b""
        self.expected: list[tuple[int, bytes]] = []
        self.got: list[tuple[int, bytes]] = []
        self.poisoned = False
        self.dead = False

    def _feed(self, data: bytes, eof: bool = False) -> None:
        if self.dead or not (data or eof):
            return
        try:
            self.dec.receive_data(data)
            frames = self.dec.frames()
            for ftype, payload in frames:
                try:
                    parse_client_frame(ftype, payload)
                except errors.RemoteProtocolError:
                    pass
            self.got += frames
        except errors.RemoteProtocolError:
            assert self.poisoned or eof
            self.dead = True

    @rule(frame=valid_frame | unknown_frame, cut=st.integers(0, 400))
    def send_frame(self, frame, cut):
        ftype, payload = frame
        if ftype in SERVER_READ_LIMITS and not self.poisoned:
            self.expected.append((ftype, payload))
        wire = self.pending + encode_frame(ftype, payload)
        self._feed(wire[:cut])
        self.pending = wire[cut:]

    @rule()
    def flush(self):
        self._feed(self.pending)
        self.pending = b""

    @rule(garbage=st.binary(min_size=1, max_size=64))
    def garbage(self, garbage):
        self.poisoned = True
        self._feed(self.pending + garbage)
        self.pending = b""

    @precondition(lambda self: not self.poisoned)
    @invariant()
    def frames_arrive_in_order(self):
        assert self.got == self.expected[: len(self.got)]

    def teardown(self):
        self._feed(self.pending)
        self._feed(b"", eof=True)
        if not self.poisoned and not self.dead:
            assert self.got == self.expected


class LoginMachine(RuleBasedStateMachine):
    """The server's login: a real ClientInfo, garbage, EOF and the logged-in stream, in any
    order and chunking."""

    server_key = NodePrivate.generate()

    def __init__(self) -> None:
        super().__init__()
        self.hs = ServerHandshake(self.server_key)
        self.client = NodePrivate.generate()
        self.done = False
        self.dead = False
        self.clean = True

    def _step(self, data: bytes) -> None:
        if self.dead:
            return
        try:
            if self.done:
                self.hs.receive_data(data)
                for ftype, payload in self.hs.decoder.frames():
                    parse_client_frame(ftype, payload)
                return
            self.hs.receive_data(data)
            event = self.hs.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, ClientAuthenticated) and self.clean
                assert event.key == self.client.public
                self.hs.server_info_frame()
                self.done = True
        except errors.RemoteProtocolError:
            self.dead = True

    @rule(cut=st.integers(0, 200))
    def client_info(self, cut):
        wire = ClientHandshake(self.client, ClientInfo(), server_key=self.server_key.public).client_info_frame()
        self._step(wire[:cut])
        self._step(wire[cut:])

    @rule(garbage=st.binary(max_size=80))
    def garbage(self, garbage):
        if not self.done:
            self.clean = False
        self._step(garbage)

    @rule()
    def eof(self):
        self._step(b"")
        if not self.done:
            assert self.dead  # EOF before ClientInfo is a protocol error, never a hang

    @rule()
    def server_info_before_login_is_our_misuse(self):
        if not self.done:
            try:
                self.hs.server_info_frame()
            except errors.LocalProtocolError:
                return
            raise AssertionError("ServerInfo before ClientInfo must be refused")


http_line = st.sampled_from([
    b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n",
    b"GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /generate_204 HTTP/1.1\r\nHost: x\r\nX-Tailscale-Challenge: a\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
    b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nSec-WebSocket-Key: x\r\n"
    b"Sec-WebSocket-Protocol: derp\r\n\r\n",
])


class HttpFrontDoorMachine(RuleBasedStateMachine):
    """h11 with the relay's head limit, then ``route_request``: requests and garbage in any
    chunking raise only h11.RemoteProtocolError, and every request gets a route."""

    def __init__(self) -> None:
        super().__init__()
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        self.dead = False

    def _feed(self, data: bytes) -> None:
        if self.dead:
            return
        try:
            self.conn.receive_data(data)
            while True:
                event = self.conn.next_event()
                if isinstance(event, h11.Request):
                    route = route_request(event)
                    if isinstance(route, Response):
                        route.to_h11()
                elif event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                    return
        except h11.RemoteProtocolError:
            self.dead = True
        except RuntimeError:  # h11 refuses more data after the peer closed: our misuse, stop
            self.dead = True

    @rule(request=http_line, cut=st.integers(0, 120))
    def request(self, request, cut):
        self._feed(request[:cut])
        self._feed(request[cut:])

    @rule(garbage=st.binary(max_size=200))
    def garbage(self, garbage):
        self._feed(garbage)

    @rule(n=st.integers(1, 40_000))
    def huge_header(self, n):
        self._feed(b"GET / HTTP/1.1\r\nX: " + b"a" * n)

    @rule()
    def eof(self):
        self._feed(b"")
        self.dead = True


attribute = st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=40)).map(lambda t: stun.Attribute(*t))


class StunCodecMachine(RuleBasedStateMachine):
    """Build messages, encode them, corrupt them: parsing gives back what was encoded, and
    corrupted bytes raise only stund's RemoteProtocolError."""

    def __init__(self) -> None:
        super().__init__()
        self.attrs: list[stun.Attribute] = []
        self.wire = stun.encode_message(stun.Method.BINDING, stun.MessageClass.REQUEST, bytes(12))

    @rule(attr=attribute)
    def add_attribute(self, attr):
        if attr.type == stun.AttrType.FINGERPRINT or len(self.attrs) > 8:
            return
        self.attrs.append(attr)

    @rule(txid=st.binary(min_size=12, max_size=12), cls=st.sampled_from(list(stun.MessageClass)))
    def encode(self, txid, cls):
        self.wire = stun.encode_message(stun.Method.BINDING, cls, txid, self.attrs)
        msg = stun.parse_message(self.wire)
        assert msg.transaction_id == txid and msg.cls == cls
        assert [a for a in msg.attributes if a.type != stun.AttrType.FINGERPRINT][: len(self.attrs)] == self.attrs

    @rule(pos=st.integers(0, 400), value=st.integers(0, 255), cut=st.integers(0, 400))
    def corrupt(self, pos, value, cut):
        data = bytearray(self.wire[:cut] if cut < len(self.wire) else self.wire)
        if data:
            data[pos % len(data)] = value
        for strict in (True, False):
            try:
                stun.parse_message(bytes(data), strict=strict)
            except stun.RemoteProtocolError:
                pass


TestFrameDecoder = FrameDecoderMachine.TestCase
TestLogin = LoginMachine.TestCase
TestHttpFrontDoor = HttpFrontDoorMachine.TestCase
TestStunCodec = StunCodecMachine.TestCase
for _case in (TestFrameDecoder, TestLogin, TestHttpFrontDoor, TestStunCodec):
    _case.settings = SETTINGS
del _case
