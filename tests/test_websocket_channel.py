"""
The WebSocket channel on an in-memory transport, driven byte by byte with
the RFC 6455 codec in L{wsclient}: what needs a transport the test
controls (the transport pausing its producer, frames that announce more
than they hold, fragments, pings) or frames autobahn's client would not
send.  The engine's time is a L{task.Clock}.
"""

from __future__ import annotations

import gc
import weakref

import pytest
from _helpers import Client, LogCapture, make_engine, timers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from wsclient import client_frame, handshake, server_frames
from zope.interface.verify import verifyObject

from esf import WebSocketFactory, WebSocketProtocol
from esf.interfaces import IChannel
from esf.server._counters import Count
from esf.wire import (
    DisconnectedType,
    DisconnectNotice,
    FrameDecoder,
    Information,
    Logon,
    LogonReply,
    LogonResult,
    MessageType,
    encode_frame,
)

# Every test here runs with the compiled loops and with the pure-Python code
# alone (compiled_loops, tests/conftest.py).
pytestmark = pytest.mark.usefixtures("compiled_loops")

MAX = 4096
TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 1, 2, 8, 9, 10, 0


class Page:
    """
    One WebSocket connection to the engine on a L{StringTransport}.
    """

    def __init__(self, engine, factory, port=6001, host_ip="10.0.0.9", **handshake_args):
        self.engine = engine
        self.wire = engine.config.wire
        peer = IPv4Address("TCP", host_ip, port)
        self.transport = StringTransport(peerAddress=peer)
        self.protocol = factory.buildProtocol(peer)
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(handshake(**handshake_args))
        self.user_id = ""
        self._read = 0

    def response(self):
        return server_frames(self.transport.value())[0]

    def messages(self):
        """
        The WebSocket frames the server wrote since the last call.
        """
        frames = server_frames(self.transport.value())[1]
        new, self._read = frames[self._read :], len(frames)
        return new

    def esf(self, messages=None):
        """
        The binary messages among C{messages}, each decoded as one frame.
        """
        out = []
        for opcode, payload in messages if messages is not None else self.messages():
            if opcode == BINARY:
                [frame] = FrameDecoder(self.wire).feed(payload)
                out.append(frame)
        return out

    def send(self, opcode, payload=b"", **kwargs):
        self.protocol.dataReceived(client_frame(opcode, payload, **kwargs))

    def frame(self, message_type, body=b"", **kwargs):
        kwargs.setdefault("user_id", self.user_id)
        kwargs.setdefault("dest_user_id", "_0")
        return encode_frame(self.wire, message_type, body, client_type=3, **kwargs)

    def logon(self, user_id):
        self.user_id = user_id
        self.send(BINARY, self.frame(MessageType.LOGON, Logon(1, "", "pw").encode(), message_id=1))
        [reply] = self.esf()
        assert LogonReply.decode(reply.body).result == LogonResult.SUCCEED
        return self

    def lose(self):
        self.protocol.connectionLost(Failure(ConnectionDone()))


def close_code(payload):
    return int.from_bytes(payload[:2], "big")


@pytest.fixture
def engine():
    return make_engine(max_message_size=MAX)


@pytest.fixture
def pages(engine):
    """
    Makes L{Page}s on one factory and, at the end, loses their connections
    and cancels autobahn's timers (they run on the global reactor).
    """
    factory = WebSocketFactory(engine)
    made = []

    def page(**kwargs):
        made.append(Page(engine, factory, port=6001 + len(made), **kwargs))
        return made[-1]

    yield page
    for p in made:
        if p.protocol.state != p.protocol.STATE_CLOSED:
            p.lose()
        for name in ("openHandshakeTimeoutCall", "closeHandshakeTimeoutCall"):
            call = getattr(p.protocol, name, None)
            if call is not None:
                call.cancel()


def test_factory_makes_autobahn_safe(engine):
    factory = WebSocketFactory(engine, ["https://chat.example.com"])
    config = engine.config
    assert factory.maxMessagePayloadSize == factory.maxFramePayloadSize == MAX
    assert factory.openHandshakeTimeout == config.logon_timeout
    assert factory.closeHandshakeTimeout == config.close_timeout
    assert factory.failByDrop is False
    assert factory.autoPingInterval == 0
    assert factory.webStatus is False
    assert factory.versions == [13]
    assert factory.server is None
    assert factory.perMessageCompressionAccept(["offer"]) is None  # no compression
    assert factory.trustXForwardedFor == 0
    assert factory.maxConnections == 0  # no limit configured
    assert WebSocketFactory(make_engine(max_connections=7)).maxConnections == 7


def test_channel_interface(pages):
    page = pages()
    assert verifyObject(IChannel, page.protocol)
    assert page.protocol.address == "10.0.0.9:6001"
    assert page.transport.producer is page.protocol
    assert page.transport.streaming


def test_handshake_response(pages):
    page = pages()
    response = page.response().decode()
    assert response.startswith("HTTP/1.1 101")
    assert "Sec-WebSocket-Protocol: esf.v1\r\n" in response
    assert "Server:" not in response
    assert "AutobahnPython" not in response


def test_session_starts_after_the_handshake(engine):
    page = Page.__new__(Page)  # a connection that has not shaken hands yet
    factory = WebSocketFactory(engine)
    page.transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", 6100))
    page.protocol = factory.buildProtocol(None)
    page.protocol.makeConnection(page.transport)
    try:
        assert not engine.sessions
        page.protocol.dataReceived(handshake()[:40])
        assert not engine.sessions
        page.protocol.dataReceived(handshake()[40:])
        assert len(engine.sessions) == 1
    finally:
        page.protocol.connectionLost(Failure(ConnectionDone()))
    assert not engine.sessions


def test_handshake_is_bounded(engine, pages):
    logs = LogCapture().start()
    try:
        page = pages(extra=["X-Padding: " + "a" * 20000])
    finally:
        logs.stop()
    assert page.transport.value().startswith(b"HTTP/1.1 431")
    assert page.transport.disconnecting
    assert not engine.sessions
    [event] = logs.esf("websocket_refused")
    assert "handshake of more than" in event["why"]


def test_fragmented_message_is_one_frame(pages):
    alice = pages().logon("alice")
    heartbeat = alice.frame(MessageType.HEARTBEAT)
    alice.send(BINARY, heartbeat[:10], fin=False)
    alice.send(CONTINUATION, heartbeat[10:11], fin=False)
    assert alice.esf() == []
    alice.send(CONTINUATION, heartbeat[11:], fin=True)
    [echo] = alice.esf()
    assert echo.message_type == MessageType.HEARTBEAT


def test_oversized_frame_is_refused_before_its_payload(engine, pages):
    """
    A frame that announces more than the maximum: the notice and close 1009
    go out at its header, and none of its payload is kept.
    """
    alice = pages().logon("alice")
    alice.protocol.dataReceived(client_frame(BINARY, b"x" * 10, length=10 * MAX))
    messages = alice.messages()
    [notice] = alice.esf(messages)
    body = DisconnectNotice.decode(notice.body)
    assert body.reason == DisconnectedType.MESSAGE_TOO_LARGE
    assert (messages[-1][0], close_code(messages[-1][1])) == (CLOSE, 1009)
    assert messages[-1][1][2:] == b"MESSAGE_TOO_LARGE"
    assert not engine.user_manager.is_user_online("alice")
    # The rest of the announced payload arrives and is dropped.
    for _ in range(9):
        alice.protocol.dataReceived(b"\x00" * MAX)
    assert not alice.protocol._message
    assert alice.messages() == []


def test_fragments_adding_up_past_the_maximum(pages):
    alice = pages().logon("alice")
    chunk = b"\x00" * (MAX // 4)
    alice.send(BINARY, chunk, fin=False)
    for _ in range(3):
        alice.send(CONTINUATION, chunk, fin=False)
    assert alice.messages() == []  # exactly MAX so far
    alice.send(CONTINUATION, b"\x00", fin=False)
    messages = alice.messages()
    [notice] = alice.esf(messages)
    assert DisconnectNotice.decode(notice.body).reason == DisconnectedType.MESSAGE_TOO_LARGE
    assert close_code(messages[-1][1]) == 1009


def test_many_tiny_fragments_cost_one_buffer(pages):
    alice = pages().logon("alice")
    heartbeat = alice.frame(MessageType.HEARTBEAT)
    alice.send(BINARY, heartbeat[:1], fin=False)
    for i in range(1, len(heartbeat) - 1):
        alice.send(CONTINUATION, heartbeat[i : i + 1], fin=False)
    assert isinstance(alice.protocol._message, bytearray)
    assert alice.protocol.message_data == []  # autobahn keeps nothing of it
    alice.send(CONTINUATION, heartbeat[-1:], fin=True)
    [echo] = alice.esf()
    assert echo.message_type == MessageType.HEARTBEAT


def test_text_message_is_refused_at_its_first_fragment(pages):
    alice = pages().logon("alice")
    alice.send(TEXT, b"{", fin=False)
    messages = alice.messages()
    [notice] = alice.esf(messages)
    assert DisconnectNotice.decode(notice.body).reason == DisconnectedType.INVALID_MESSAGE
    assert close_code(messages[-1][1]) == 1003
    alice.send(CONTINUATION, b"}" * 1000, fin=True)
    assert alice.messages() == []


def test_websocket_protocol_errors_end_the_session_with_a_reason(engine, pages):
    """
    A breach of WebSocket itself (here an unmasked frame) is autobahn's to
    answer (close 1002); the session ends as InvalidMessage with its reason.
    """
    logs = LogCapture().start()
    try:
        alice = pages().logon("alice")
        heartbeat = alice.frame(MessageType.HEARTBEAT)
        alice.protocol.dataReceived(bytes([0x82, len(heartbeat)]) + heartbeat)
        messages = alice.messages()
        assert (messages[-1][0], close_code(messages[-1][1])) == (CLOSE, 1002)
        alice.lose()
    finally:
        logs.stop()
    [event] = logs.esf("session_ended")
    assert event["reason"] == "INVALID_MESSAGE"
    assert "WebSocket protocol error: unmasked" in event["text"]
    assert not engine.sessions


# -- whole messages without autobahn (esf.server._websocket_frames.MessageParser) ------------------------


def _sends(page, dest, count, size=20):
    """C{count} Send frames from C{page} to C{dest}, of growing bodies."""
    return [
        page.frame(
            MessageType.SEND,
            Information(n, bytes([n % 256]) * (size + n)).encode(),
            dest_user_id=dest,
        )
        for n in range(count)
    ]


def _received(bob):
    return [f.raw for f in bob.take() if f.message_type == MessageType.SEND]


def test_a_read_of_many_messages_is_relayed_as_sent(engine, pages):
    """
    Messages of 7- and 16-bit lengths, each with its own mask, taken
    without autobahn's frame parser, in one read or cut anywhere: every
    frame arrives as it was sent, in order.
    """
    alice = pages().logon("alice")
    bob = Client(engine)
    bob.logon("bob")
    bob.take()
    frames = _sends(alice, "bob", 40, size=10) + _sends(alice, "bob", 3, size=300)

    def autobahn_frame_parser():
        raise AssertionError("whole binary messages are not autobahn's to parse")

    alice.protocol.processData = autobahn_frame_parser
    stream = b"".join(
        client_frame(BINARY, f, mask=bytes([n, 1, 2, 3])) for n, f in enumerate(frames)
    )
    alice.protocol.dataReceived(stream)
    assert _received(bob) == frames
    assert alice.protocol.data == b""  # nothing left for autobahn
    # Reads that end inside a message, as most do under load (even inside
    # a header): still none of it for autobahn.
    for cut in (1, 2, 3, 7, 100, 333):
        for offset in range(0, len(stream), cut):
            alice.protocol.dataReceived(stream[offset : offset + cut])
        assert _received(bob) == frames, cut


def test_a_message_trickled_in_byte_by_byte_is_gathered_in_place(engine, pages):
    """
    A whole message that comes a byte per read is gathered in one buffer,
    not copied again with each byte (which would cost its size squared).
    """
    alice = pages().logon("alice")
    bob = Client(engine)
    bob.logon("bob")
    bob.take()
    [frame] = _sends(alice, "bob", 1, size=MAX - 100)
    message = client_frame(BINARY, frame)
    buffers: list = []  # each buffer the message was gathered in, kept alive
    for i in range(len(message)):
        alice.protocol.dataReceived(message[i : i + 1])
        tail = alice.protocol._parser.pending
        if tail is not None and not any(tail is b for b in buffers):
            buffers.append(tail)
    assert _received(bob) == [frame]
    # One for the first byte, one for the 16-bit length, one for the rest.
    assert len(buffers) <= 3


def test_control_frames_and_fragments_amid_whole_messages(engine, pages):
    """
    What is not a whole binary message (a ping, a fragmented message) is
    autobahn's, in its place in the stream; the whole messages around it
    are taken as they come.
    """
    alice = pages().logon("alice")
    bob = Client(engine)
    bob.logon("bob")
    bob.take()
    one, two, three, four = _sends(alice, "bob", 4)
    alice.messages()
    alice.protocol.dataReceived(
        client_frame(BINARY, one)
        + client_frame(PING, b"are you there")
        + client_frame(BINARY, two)
        + client_frame(BINARY, three[:7], fin=False)
        + client_frame(CONTINUATION, three[7:], fin=True)
        + client_frame(BINARY, four)
    )
    assert _received(bob) == [one, two, three, four]
    assert alice.messages() == [(PONG, b"are you there")]


def test_a_bad_frame_after_whole_messages_ends_the_session_after_them(engine, pages):
    alice = pages().logon("alice")
    bob = Client(engine)
    bob.logon("bob")
    bob.take()
    one, two = _sends(alice, "bob", 2)
    unmasked = bytes([0x82, len(two)]) + two
    alice.protocol.dataReceived(client_frame(BINARY, one) + unmasked)
    assert _received(bob) == [one]
    messages = alice.messages()
    assert (messages[-1][0], close_code(messages[-1][1])) == (CLOSE, 1002)
    # A 16-bit length that a 7-bit one would have held: refused too.
    carol = pages().logon("carol")
    heartbeat = carol.frame(MessageType.HEARTBEAT)
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(heartbeat))
    carol.protocol.dataReceived(bytes([0x82, 0xFE, 0, len(heartbeat)]) + mask + masked)
    messages = carol.messages()
    assert (messages[-1][0], close_code(messages[-1][1])) == (CLOSE, 1002)


def test_a_whole_message_over_the_limit_is_refused(engine, pages):
    alice = pages().logon("alice")
    largest = alice.frame(
        MessageType.SEND, b"x" * (MAX - len(alice.frame(MessageType.SEND))), dest_user_id="bob"
    )
    assert len(largest) == MAX
    alice.protocol.dataReceived(client_frame(BINARY, largest + b"!"))  # one byte over
    messages = alice.messages()
    [notice] = alice.esf(messages)
    assert DisconnectNotice.decode(notice.body).reason == DisconnectedType.MESSAGE_TOO_LARGE
    assert close_code(messages[-1][1]) == 1009


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cuts=st.lists(st.integers(min_value=1, max_value=4000), max_size=40),
    sizes=st.lists(st.integers(0, 400), min_size=1, max_size=25),
)
def test_any_chunking_relays_the_same_frames(engine, pages, cuts, sizes):
    """
    The same stream of whole messages, pings and fragmented messages, cut
    into reads anywhere (down to single bytes): the same frames arrive, in
    order, and the same pongs go back.
    """
    alice = pages().logon(f"alice{len(engine.sessions)}")
    bob = Client(engine)
    bob.logon(f"bob{len(engine.sessions)}")
    bob.take()
    alice.messages()
    frames = [
        alice.frame(
            MessageType.SEND,
            Information(n, bytes([n % 256]) * size).encode(),
            dest_user_id=bob.user_id,
        )
        for n, size in enumerate(sizes)
    ]
    stream = b""
    for n, frame in enumerate(frames):
        mask = bytes([n % 256, 7, 11, 13])
        if n % 5 == 3:
            stream += client_frame(BINARY, frame[:5], fin=False, mask=mask)
            stream += client_frame(PING, bytes([n % 256]), mask=mask)
            stream += client_frame(CONTINUATION, frame[5:], fin=True, mask=mask)
        else:
            stream += client_frame(BINARY, frame, mask=mask)
    offset = 0
    for cut in cuts:
        if offset >= len(stream):
            break
        alice.protocol.dataReceived(stream[offset : offset + cut])
        offset += cut
    if offset < len(stream):
        alice.protocol.dataReceived(stream[offset:])
    assert _received(bob) == frames
    assert alice.messages() == [(PONG, bytes([n % 256])) for n in range(len(frames)) if n % 5 == 3]
    bob.lose()
    alice.lose()


@pytest.fixture
def roomy_pages():
    """
    Pages on an engine whose messages may be 1 MiB but whose memory budget
    holds only 100,000 bytes.
    """
    engine = make_engine(max_message_size=1024 * 1024)
    engine.budget.limit = 100_000
    factory = WebSocketFactory(engine)
    made = []

    def page():
        made.append(Page(engine, factory, port=7001 + len(made)))
        return made[-1]

    yield engine, page
    for p in made:
        if p.protocol.state != p.protocol.STATE_CLOSED:
            p.lose()
        for name in ("openHandshakeTimeoutCall", "closeHandshakeTimeoutCall"):
            call = getattr(p.protocol, name, None)
            if call is not None and call.active():
                call.cancel()


def test_messages_being_received_count_in_the_memory_budget(roomy_pages):
    """
    What a WebSocket session holds of messages not yet whole counts in the
    server's memory budget, as a TCP session's partial frame does: whether
    cut off by a read's end or arriving in fragments.  Past the budget, a
    session holding more than 64 KiB of one ends MessageTooLarge (close
    1009); the others are not touched, and nothing stays counted.
    """
    engine, page = roomy_pages
    alice, bob = page().logon("alice"), page().logon("bob")
    big = alice.frame(MessageType.SEND, Information(1, bytes(70_000)).encode(), dest_user_id="bob")
    whole = client_frame(BINARY, big)
    alice.protocol.dataReceived(whole[:30_000])  # cut off by the read's end
    assert engine.budget.used == 30_000 - 14  # the payload so far (a 14-byte header)
    alice.protocol.dataReceived(whole[30_000:])
    assert engine.budget.used == 0
    [relayed] = bob.esf()
    assert relayed.raw == big
    # In fragments: 70,000 bytes held by alice's session fit the budget ...
    alice.send(BINARY, big[:40_000], fin=False)
    alice.send(CONTINUATION, big[40_000:69_000], fin=False)
    assert engine.budget.used == 69_000
    # ... but bob's 66,000 more do not: his session ends, not alice's.
    bob.messages()
    bob.send(BINARY, big[:66_000], fin=False)
    messages = bob.messages()
    [notice] = bob.esf(messages)
    assert DisconnectNotice.decode(notice.body).reason == DisconnectedType.MESSAGE_TOO_LARGE
    assert close_code(messages[-1][1]) == 1009
    assert not engine.user_manager.is_user_online("bob")
    assert engine.user_manager.is_user_online("alice")
    assert engine.budget.used == 69_000  # bob's bytes no longer counted
    alice.send(CONTINUATION, big[69_000:], fin=True)
    assert engine.budget.used == 0
    alice.lose()
    assert engine.budget.used == 0


def test_batched_output_is_one_message_per_frame(engine, pages):
    """
    The engine writes a read's output to a peer at once; over WebSocket
    every frame in it is its own message.
    """
    alice = pages().logon("alice")
    bob = Client(engine)
    bob.logon("bob")
    bob.take()
    one = bob.frame(MessageType.SEND, Information(1, b"one"), dest="alice")
    two = bob.frame(MessageType.SEND, Information(2, b"two"), dest="alice")
    bob.send_raw(one + two)
    messages = alice.messages()
    assert [(opcode, payload) for opcode, payload in messages] == [(BINARY, one), (BINARY, two)]


def _page_that_does_not_read():
    """
    alice, on WebSocket, stops reading (her transport paused the producer),
    and bob sends her 10 KB, past half her 8 KiB output bound.
    """
    engine = make_engine(max_message_size=MAX, max_output_buffer=8 * 1024)
    factory = WebSocketFactory(engine)
    alice = Page(engine, factory).logon("alice")
    bob = Client(engine)
    bob.logon("bob")
    alice.protocol.pauseProducing()  # as the transport does when its buffer is full
    for _ in range(10):
        bob.send(MessageType.SEND, Information(1, b"p" * 1000), dest="alice")
    return engine, alice


def test_slow_reader_is_bounded(engine, pages):
    """
    A page that does not read: the transport pauses its producer, the
    session counts what waits, and once it has stayed past half the output
    bound for the drain timeout it ends with ChannelCacheOverflow and close
    1008 (a burst alone does not end it).
    """
    engine, alice = _page_that_does_not_read()
    assert engine.user_manager.is_user_online("alice")
    engine.clock.advance(engine.config.output_drain_timeout)
    assert not engine.user_manager.is_user_online("alice")
    messages = alice.messages()
    notice = alice.esf(messages)[-1]
    assert DisconnectNotice.decode(notice.body).reason == DisconnectedType.CHANNEL_CACHE_OVERFLOW
    assert close_code(messages[-1][1]) == 1008
    alice.lose()


def test_a_websocket_sender_is_held_back_while_its_receiver_is_behind():
    """
    Push back works for a sender on WebSocket as on TCP: while its receiver
    is backed up, the server stops reading the page, and reads it again
    once the receiver has drained; nothing is lost.
    """
    engine = make_engine(max_message_size=MAX, max_output_buffer=8 * 1024)
    factory = WebSocketFactory(engine)
    alice = Page(engine, factory).logon("alice")
    bob = Client(engine)
    bob.logon("bob")
    bob.take()
    bob.protocol.pauseProducing()  # bob's transport is full
    sent = [alice.frame(MessageType.SEND, Information(n, bytes(1000)).encode(), dest_user_id="bob")
            for n in range(12)]  # fmt: skip
    for frame in sent:
        alice.send(BINARY, frame)
    assert alice.transport.producerState == "paused"
    assert engine.counters[Count.SENDERS_PAUSED] == 1
    bob.protocol.resumeProducing()  # bob drained
    assert alice.transport.producerState == "producing"
    assert [r.raw for r in bob.take()] == sent
    assert engine.user_manager.is_user_online("bob")


def test_no_pongs_for_a_peer_that_does_not_read(pages):
    alice = pages().logon("alice")
    alice.protocol.pauseProducing()
    for _ in range(50):
        alice.send(PING, b"p" * 125)
    assert alice.messages() == []
    alice.protocol.resumeProducing()
    alice.send(PING, b"again")
    assert alice.messages() == [(PONG, b"again")]


def test_writes_after_the_peer_closed_are_dropped(engine, pages):
    """
    Between the peer's close frame and the end of the connection the
    session is still bound; what is relayed to it meanwhile goes nowhere
    (and raises nothing).
    """
    alice = pages().logon("alice")
    bob = Client(engine)
    bob.logon("bob")
    alice.send(CLOSE, (1000).to_bytes(2, "big"))
    assert close_code(alice.messages()[-1][1]) == 1000
    logs = LogCapture().start()
    try:
        bob.send(MessageType.SEND, Information(1, b"late"), dest="alice")
    finally:
        logs.stop()
    assert alice.messages() == []
    assert not logs.failures()
    alice.lose()
    assert not engine.user_manager.is_user_online("alice")


def test_close_code_follows_the_notice(engine, pages):
    """
    Every server-initiated end: the notice's reason picks the close code,
    and the close frame's reason names it.
    """
    cases = [
        (lambda e: e.kick_out("alice", "bye"), 1000, "BEING_KICKED_OUT"),
        (lambda e: e.stop(), 1001, "SERVER_SHUTDOWN"),
    ]
    for _i, (act, code, name) in enumerate(cases):
        alice = pages().logon("alice")
        act(engine)
        messages = alice.messages()
        assert DisconnectNotice.decode(alice.esf(messages)[-1].body).reason.name == name
        assert (close_code(messages[-1][1]), messages[-1][1][2:].decode()) == (code, name)
        alice.lose()


def test_logon_timeout_closes_with_notice(engine, pages):
    page = pages()
    engine.clock.advance(engine.config.logon_timeout)
    messages = page.messages()
    [notice] = page.esf(messages)
    assert DisconnectNotice.decode(notice.body).reason == DisconnectedType.LOGON_TIMEOUT
    assert close_code(messages[-1][1]) == 1000


def test_heartbeat_timeout_closes_with_notice(engine, pages):
    alice = pages().logon("alice")
    engine.clock.advance(engine.config.heartbeat_timeout * 1.5 + 1)
    messages = alice.messages()
    assert DisconnectNotice.decode(alice.esf(messages)[-1].body).reason == (
        DisconnectedType.HEARTBEAT_TIMEOUT
    )
    assert close_code(messages[-1][1]) == 1000


def test_protocol_class(engine):
    assert WebSocketFactory(engine).protocol is WebSocketProtocol


def test_messages_before_a_bad_one_in_the_same_read_count(engine, pages):
    """
    The frames of one read go to the session together; a bad message among
    them ends the session only after the ones before it were handled.
    """
    alice = pages().logon("alice")
    bob = pages().logon("bob")
    send = alice.frame(MessageType.SEND, Information(1, b"first").encode(), dest_user_id="bob")
    heartbeat = alice.frame(MessageType.HEARTBEAT)
    alice.protocol.dataReceived(
        client_frame(BINARY, send) + client_frame(BINARY, heartbeat) + client_frame(TEXT, b"x")
        + client_frame(BINARY, send)
    )  # fmt: skip
    [relayed] = bob.esf()
    assert Information.decode(relayed.body) == Information(1, b"first")
    messages = alice.messages()
    echo, notice = alice.esf(messages)
    assert echo.message_type == MessageType.HEARTBEAT
    assert DisconnectNotice.decode(notice.body).reason == DisconnectedType.INVALID_MESSAGE
    assert close_code(messages[-1][1]) == 1003


def test_large_frames_go_through_autobahns_framing(engine, pages):
    """
    Output over 64 KiB is framed by autobahn (8-byte lengths); smaller
    output by the adapter, both as plain binary frames, one per ESF frame.
    """
    big = make_engine(max_message_size=256 * 1024)
    factory = WebSocketFactory(big)
    alice = Page(big, factory, port=7001).logon("alice")
    bob = Page(big, factory, port=7002).logon("bob")
    try:
        for size in (10, 200, 70_000, 200_000):
            data = alice.frame(
                MessageType.SEND, Information(1, b"z" * size).encode(), dest_user_id="bob"
            )
            alice.send(BINARY, data)
            [(opcode, payload)] = bob.messages()
            assert (opcode, payload) == (BINARY, data), size
    finally:
        for page in (alice, bob):
            page.lose()
            call = page.protocol.closeHandshakeTimeoutCall
            if call is not None:
                call.cancel()


def test_web_demo_hands_the_connection_over_from_twisted_web():
    """
    Through C{--web-demo}'s site, twisted.web parses the handshake and then
    hands the connection over: its idle timer must not close a WebSocket
    session later, and the WebSocket protocol becomes the transport's
    producer.
    """
    from esf.server._web_demo import web_demo_site

    engine = make_engine(max_message_size=MAX, heartbeat_interval=100, heartbeat_timeout=1000)
    site = web_demo_site(engine)
    peer = IPv4Address("TCP", "10.0.0.9", 6200)
    transport = StringTransport(peerAddress=peer)
    channel = site.buildProtocol(peer)
    channel.callLater = engine.clock.callLater  # twisted.web's timers on the test clock
    transport.protocol = channel  # as a real transport has it; autobahn replaces it
    channel.makeConnection(transport)
    channel.dataReceived(handshake())
    assert transport.value().startswith(b"HTTP/1.1 101")
    [session] = engine.sessions
    protocol = session.channel
    assert isinstance(protocol, WebSocketProtocol)
    assert transport.producer is protocol
    try:
        protocol.dataReceived(
            client_frame(BINARY, encode_frame(engine.config.wire, MessageType.LOGON, Logon(1, "", "pw").encode(),
                                              client_type=3, message_id=1, user_id="alice", dest_user_id="_0"))
        )  # fmt: skip
        assert engine.user_manager.is_user_online("alice")
        engine.clock.advance(site.timeOut + 1)  # twisted.web's idle timeout
        assert not transport.disconnecting and not transport.disconnected
        assert engine.user_manager.is_user_online("alice")
    finally:
        protocol.connectionLost(Failure(ConnectionDone()))


def test_a_slow_reader_that_left_is_freed_at_once():
    """
    Once a page that did not read is gone, its session (and the backlog it
    counted) is freed as the last reference goes, without waiting for a
    garbage collection: the channel lets go of it when the connection is
    lost.
    """
    engine, alice = _page_that_does_not_read()
    session = weakref.ref(alice.protocol.session)
    protocol = weakref.ref(alice.protocol)
    transport = weakref.ref(alice.transport)
    engine.clock.advance(engine.config.output_drain_timeout)
    assert not engine.user_manager.is_user_online("alice")
    alice.lose()
    assert engine.budget.used == 0
    assert alice.protocol.closeHandshakeTimeoutCall is None  # cancelled
    gc.disable()
    try:
        del alice
        assert session() is None
    finally:
        gc.enable()
    gc.collect()  # autobahn's protocol holds itself (in a Deferred of its own)
    assert protocol() is None and transport() is None


def _refused_origin(page_of):
    page = page_of(origin="http://evil.example")
    assert page.transport.value().startswith(b"HTTP/1.1 403")
    return page


def _closed_by_the_peer(page_of):
    page = page_of().logon("alice")
    page.send(CLOSE, (1000).to_bytes(2, "big"))
    assert close_code(page.messages()[-1][1]) == 1000  # answered
    return page


def _too_large_a_handshake(page_of):
    page = page_of(extra=["X-Padding: " + "a" * 20000])
    assert page.transport.value().startswith(b"HTTP/1.1 431")
    return page


@pytest.mark.parametrize("end", [_refused_origin, _closed_by_the_peer, _too_large_a_handshake])
def test_a_connection_closed_gracefully_is_aborted_if_it_does_not_go(engine, pages, end):
    """
    autobahn closes gracefully, with no timer of its own, after the peer's
    close frame and after a refused handshake; a TLS connection then waits
    for the peer's close_notify, a TCP one for a peer that does not read to
    take its last bytes.  A peer that does neither (a StringTransport never
    goes by itself) is aborted after the close timeout, as on TCP: it kept
    its descriptor, and a refused handshake its place under
    --websocket-max-handshakes, for good.
    """
    logs = LogCapture().start()
    try:
        page = end(pages)
        transport = page.transport
        assert transport.disconnecting and not transport.disconnected
        engine.clock.advance(engine.config.close_timeout - 0.01)
        assert not transport.disconnected
        engine.clock.advance(0.01)
        assert transport.disconnected  # aborted
        page.lose()
    finally:
        logs.stop()
    assert not engine.sessions
    assert len(logs.esf("websocket_close_timed_out")) == 1


def test_a_connection_that_goes_in_time_leaves_no_timer(engine, pages):
    page = _closed_by_the_peer(pages)
    assert timers(engine)
    page.lose()
    assert not timers(engine)  # nothing holds the protocol


def _flooded_past_the_close(page_of):
    page = page_of()
    page.protocol.dataReceived(client_frame(PING, b"") * 17)  # ended: NotLoggedOn
    page.protocol.dataReceived(client_frame(PING, b"") * 100)  # 64 more, then no more
    assert page.transport.disconnecting
    return page


@pytest.mark.parametrize("end", [_refused_origin, _closed_by_the_peer, _flooded_past_the_close])
def test_what_comes_once_the_connection_is_closing_is_dropped(engine, pages, end):
    """
    Once the connection is being closed (its transport losing it), nothing
    more of the peer's is parsed, nor kept.  A TLS transport still delivers
    what the peer sends until its close_notify: autobahn appended each read
    to one buffer, copying it whole (100 MiB sent in 32 KiB reads after a
    close frame took 197 s of CPU and held 100 MiB).
    """
    page = end(pages)
    page.messages()  # what came before
    chunk = client_frame(PING, b"p" * 125) * 200
    for _ in range(100):
        page.protocol.dataReceived(chunk)
    assert len(page.protocol.data) < len(chunk)
    assert page.messages() == []  # no pongs
