"""
Application messages on the server engine, without sockets or real time:
the customize handler, relay (with device targeting and offline targets),
server push, blobs, broadcast to groups, and the chat example.
"""

from __future__ import annotations

import struct

import pytest
from _helpers import Client, connect, timers
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer
from zope.interface.verify import verifyObject

from esf import (
    ClientType,
    DisconnectedType,
    ErrorCode,
    LogonResult,
    MessageType,
    RequestError,
    ServerConfig,
    ServerEngine,
    WireConfig,
)
from esf.examples import chat
from esf.interfaces import (
    IBasicHandler,
    ICustomizeHandler,
    IEngineAware,
    IGroupManager,
)
from esf.tap import Options
from esf.wire import (
    Ack,
    BeingKickedOutNotify,
    BlobAssembler,
    BlobError,
    BlobFragment,
    DisconnectNotice,
    Empty,
    Error,
    Information,
    fragment_blob,
)

MODES = ["sync", "deferred", "coroutine"]


def _answer(mode: str, value, error: Exception | None = None):
    """
    C{value} (or C{error} raised) the way an application may give it.
    """
    if mode == "sync":
        if error is not None:
            raise error
        return value
    if mode == "deferred":
        return fail(error) if error is not None else succeed(value)
    assert mode == "coroutine"

    async def answer():
        await succeed(None)
        if error is not None:
            raise error
        return value

    return answer()


@implementer(ICustomizeHandler)
class Recorder:
    """
    Records what reaches the handler; answers as C{mode} says.  In mode
    C{"pending"} every call returns a new Deferred kept in C{pending}.
    """

    def __init__(self, mode: str = "sync", error: Exception | None = None, answer=None):
        self.mode = mode
        self.error = error
        self.answer = answer
        self.informations: list[tuple] = []
        self.queries: list[tuple] = []
        self.pending: list[Deferred] = []

    def _result(self, value):
        if self.mode == "pending":
            d = Deferred()
            self.pending.append(d)
            return d
        return _answer(self.mode, value, self.error)

    def handle_information(self, user_id, client_type, information_type, payload):
        self.informations.append((user_id, client_type, information_type, bytes(payload)))
        return self._result(None)

    def handle_query(self, user_id, client_type, information_type, payload):
        self.queries.append((user_id, client_type, information_type, bytes(payload)))
        return self._result(b"re:" + payload if self.answer is None else self.answer)


@implementer(IGroupManager)
class Groups:
    """
    Groups from a dict; members may broadcast to their group, and whoever
    is in C{allowed} (C{(user, group)} pairs) may too.
    """

    def __init__(self, groups: dict, allowed=(), mode: str = "sync"):
        self.groups = groups
        self.allowed = set(allowed)
        self.mode = mode
        self.pending: list[Deferred] = []

    def _result(self, value):
        if self.mode == "pending":
            d = Deferred()
            self.pending.append((d, value))
            return d
        return _answer(self.mode, value)

    def get_members(self, group_id):
        return self._result(list(self.groups.get(group_id, ())))

    def can_broadcast(self, user_id, group_id):
        ok = (user_id, group_id) in self.allowed or user_id in self.groups.get(group_id, ())
        return self._result(ok)


def make_engine(customize=None, groups=None, *, start=False, handler=None, **settings):
    engine = ServerEngine(
        ServerConfig(**settings),
        clock=task.Clock(),
        handler=handler,
        customize_handler=customize,
        group_manager=groups,
    )
    if start:
        engine.start()
    return engine


def session_of(client: Client):
    return client.protocol.session


def types(received) -> list[int]:
    return [r.message_type for r in received]


def assert_error(received, request_type, code, message_id, *, contains: str = ""):
    """
    C{received} is exactly one Error answering C{request_type} #C{message_id}.
    """
    assert len(received) == 1, received
    (r,) = received
    assert r.message_type == MessageType.ERROR, r
    assert r.message_id == message_id
    assert r.user_id == "_0"
    assert r.body.request_message_type == request_type
    assert r.body.code == code, r.body
    assert contains in r.body.text
    return r.body.text


def record_transmit_failed(engine) -> list[tuple]:
    failed: list[tuple] = []
    engine.transmit_failed.subscribe(lambda *args: failed.append(args))
    return failed


# -- the customize handler --------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dest", ["_0", ""])
def test_send_to_server(mode, dest):
    """
    A Send to the server reaches handle_information with the sender, its
    device kind, the information type and the payload; nothing is answered.
    """
    recorder = Recorder(mode)
    engine = make_engine(recorder)
    alice = connect(engine, "alice", ClientType.ANDROID)
    alice.send(MessageType.SEND, Information(7, b"hello"), dest=dest)
    assert recorder.informations == [("alice", ClientType.ANDROID, 7, b"hello")]
    assert isinstance(recorder.informations[0][1], ClientType)
    assert alice.take() == []
    assert session_of(alice).logged_on


@pytest.mark.parametrize("mode", MODES)
def test_send_certainly_to_server(mode):
    recorder = Recorder(mode)
    engine = make_engine(recorder)
    alice = connect(engine, "alice")
    alice.send(MessageType.SEND_CERTAINLY, Information(7, b"x"), message_id=41)
    assert recorder.informations == [("alice", ClientType.DOTNET, 7, b"x")]
    (ack,) = alice.take()
    assert (ack.message_type, ack.message_id, ack.body) == (MessageType.ACK, 41, Ack(7))
    assert (ack.user_id, ack.dest_user_id) == ("_0", "alice")


def test_send_certainly_acked_once_handler_finished():
    """
    The Ack waits for the handler's Deferred.
    """
    recorder = Recorder("pending")
    engine = make_engine(recorder)
    alice = connect(engine, "alice")
    alice.send(MessageType.SEND_CERTAINLY, Information(3, b"a"), message_id=1)
    alice.send(MessageType.SEND_CERTAINLY, Information(4, b"b"), message_id=2)
    assert len(recorder.pending) == 2
    assert alice.take() == []
    recorder.pending[1].callback(None)
    assert [(r.message_id, r.body) for r in alice.take()] == [(2, Ack(4))]
    recorder.pending[0].callback(None)
    assert [(r.message_id, r.body) for r in alice.take()] == [(1, Ack(3))]


def test_send_certainly_without_message_id():
    """
    A SendCertainly needs a MessageID to be acknowledged with: without one
    it is a bad request, which with MessageID 0 cannot be answered.
    """
    recorder = Recorder()
    engine = make_engine(recorder)
    alice = connect(engine, "alice")
    alice.send(MessageType.SEND_CERTAINLY, Information(3, b"a"))
    assert recorder.informations == []
    assert alice.take() == []
    assert session_of(alice).logged_on


@pytest.mark.parametrize("mode", MODES)
def test_request_to_server(mode):
    recorder = Recorder(mode)
    engine = make_engine(recorder)
    alice = connect(engine, "alice", ClientType.IOS)
    alice.send(MessageType.REQUEST, Information(9, b"ping"), message_id=77)
    assert recorder.queries == [("alice", ClientType.IOS, 9, b"ping")]
    (response,) = alice.take()
    assert response.message_type == MessageType.RESPONSE
    assert response.message_id == 77
    assert response.body == Information(9, b"re:ping")
    assert (response.user_id, response.dest_user_id) == ("_0", "alice")


def test_request_answered_with_none_is_empty():
    engine = make_engine(Recorder(answer=None))
    engine.customize_handler.handle_query = lambda *args: None
    alice = connect(engine, "alice")
    alice.send(MessageType.REQUEST, Information(9, b"ping"), message_id=3)
    assert [r.body for r in alice.take()] == [Information(9, b"")]


def test_request_answer_too_large():
    """
    An answer that does not fit one frame is Error(TooLarge), not a crash.
    """
    engine = make_engine(Recorder(answer=b"x" * 5000), wire=WireConfig(11, 4096))
    alice = connect(engine, "alice")
    alice.send(MessageType.REQUEST, Information(9, b""), message_id=3)
    assert_error(alice.take(), MessageType.REQUEST, ErrorCode.TOO_LARGE, 3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("message_type", [MessageType.REQUEST, MessageType.SEND_CERTAINLY])
def test_raising_handler(mode, message_type):
    """
    An exception in the handler is Error(HandlerError) carrying its type and
    message, never a traceback; the session stays up.
    """
    recorder = Recorder(mode, error=KeyError("no such order: 17"))
    engine = make_engine(recorder)
    alice = connect(engine, "alice")
    alice.send(message_type, Information(9, b"q"), message_id=5)
    text = assert_error(alice.take(), message_type, ErrorCode.HANDLER_ERROR, 5)
    assert "KeyError" in text and "no such order: 17" in text
    assert "Traceback" not in text and "File " not in text
    assert len(text) <= 200
    assert engine.counters["handler_errors"] == 1
    assert session_of(alice).logged_on
    # The session goes on working.
    recorder.error = None
    alice.send(MessageType.REQUEST, Information(9, b"q"), message_id=6)
    assert [r.message_type for r in alice.take()] == [MessageType.RESPONSE]


def test_raising_handler_one_way():
    """
    A raising handler of a plain Send has nobody to tell: it is logged and
    counted, nothing goes back.
    """
    recorder = Recorder(error=RuntimeError("boom"))
    engine = make_engine(recorder)
    alice = connect(engine, "alice")
    alice.send(MessageType.SEND, Information(9, b"q"))
    assert alice.take() == []
    assert engine.counters["handler_errors"] == 1
    assert session_of(alice).logged_on


def test_long_handler_error_is_cut():
    engine = make_engine(Recorder(error=ValueError("x" * 5000)))
    alice = connect(engine, "alice")
    alice.send(MessageType.REQUEST, Information(9, b"q"), message_id=5)
    text = assert_error(alice.take(), MessageType.REQUEST, ErrorCode.HANDLER_ERROR, 5)
    assert text.startswith("ValueError: xxx") and len(text) == 200


@pytest.mark.parametrize("message_type", [MessageType.REQUEST, MessageType.SEND_CERTAINLY])
def test_no_handler(message_type):
    """
    Without a customize handler a request is refused, never left unanswered.
    """
    engine = make_engine()
    alice = connect(engine, "alice")
    alice.send(message_type, Information(1, b""), message_id=8)
    assert_error(alice.take(), message_type, ErrorCode.HANDLER_ERROR, 8, contains="no customize")


def test_no_handler_one_way():
    engine = make_engine()
    alice = connect(engine, "alice")
    alice.send(MessageType.SEND, Information(1, b""))
    assert alice.take() == []
    assert engine.counters["unhandled"] == 1


@pytest.mark.parametrize(
    "message_type", [MessageType.SEND, MessageType.REQUEST, MessageType.SEND_CERTAINLY]
)
def test_malformed_body_to_server(message_type):
    recorder = Recorder()
    engine = make_engine(recorder)
    alice = connect(engine, "alice")
    alice.send(message_type, b"\x01\x02", message_id=4)
    assert_error(alice.take(), message_type, ErrorCode.BAD_REQUEST, 4)
    assert recorder.informations == recorder.queries == []
    assert session_of(alice).logged_on


def test_request_without_message_id_is_not_handled():
    recorder = Recorder()
    engine = make_engine(recorder)
    alice = connect(engine, "alice")
    alice.send(MessageType.REQUEST, Information(1, b""))
    assert recorder.queries == []
    assert alice.take() == []


# -- relay ------------------------------------------------------------------------

RELAYED = [
    (MessageType.SEND, Information(5, b"hi bob"), 0),
    (MessageType.REQUEST, Information(5, b"question"), 11),
    (MessageType.SEND_CERTAINLY, Information(5, b"surely"), 13),
    (MessageType.BLOB, BlobFragment(5, 99, 0, False, b"part"), 0),
    (MessageType.PING_BY_SERVER, Empty(), 15),
]
# Answers (Response, Ack, PingAck, Error) are relayed only to the device
# whose request they answer: tests/test_hardening.py.


@pytest.mark.parametrize(
    "message_type, body, message_id", RELAYED, ids=[t.name for t, _, _ in RELAYED]
)
def test_relay_is_byte_identical(message_type, body, message_id):
    """
    A message addressed to a user is written, byte for byte as the sender
    sent it, to every device of that user; the sender hears nothing and the
    server's handler sees nothing.
    """
    recorder = Recorder()
    engine = make_engine(recorder)
    alice = connect(engine, "alice", ClientType.IOS)
    bob_pc = connect(engine, "bob", ClientType.DOTNET)
    bob_phone = connect(engine, "bob", ClientType.ANDROID)
    bob_pc.take()  # MyDeviceOnline
    sent = alice.send(message_type, body, message_id=message_id, dest="bob")
    for bob in (bob_pc, bob_phone):
        (received,) = bob.take()
        assert received.raw == sent
        assert (received.user_id, received.dest_user_id) == ("alice", "bob")
        assert received.client_type == ClientType.IOS
    assert alice.take() == []
    assert recorder.informations == recorder.queries == []
    # Nothing went wrong: the only counts are of what was relayed.
    assert all(key.startswith("relayed_") for key in engine.counters), engine.counters


def test_relay_does_not_parse_bodies():
    """
    The relay path does not decode the body: even one the receiver will
    reject goes through unchanged.
    """
    engine = make_engine()
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    for message_type in (MessageType.SEND, MessageType.REQUEST, MessageType.BLOB):
        sent = alice.send(message_type, b"\x01", dest="bob", message_id=2)
        assert bob.transport.value().endswith(sent)
    assert alice.take() == []


def test_relay_to_one_device():
    """
    C{"bob#5"} is bob's Android device (ClientType 5) only.
    """
    engine = make_engine()
    alice = connect(engine, "alice")
    bob_pc = connect(engine, "bob", ClientType.DOTNET)
    bob_phone = connect(engine, "bob", ClientType.ANDROID)
    bob_pc.take()
    sent = alice.send(MessageType.SEND, Information(1, b"to the phone"), dest="bob#5")
    assert [r.raw for r in bob_phone.take()] == [sent]
    assert bob_pc.take() == []
    sent = alice.send(
        MessageType.REQUEST, Information(1, b"to the pc"), dest="bob#0", message_id=3
    )
    assert [r.raw for r in bob_pc.take()] == [sent]
    assert bob_phone.take() == []
    assert alice.take() == []


def test_relay_to_absent_device():
    """
    A device that is not online is an offline target, even when the user
    is online with another device.
    """
    engine = make_engine()
    failed = record_transmit_failed(engine)
    alice = connect(engine, "alice")
    bob = connect(engine, "bob", ClientType.DOTNET)
    sent = alice.send(MessageType.REQUEST, Information(1, b""), dest="bob#4", message_id=3)
    assert_error(alice.take(), MessageType.REQUEST, ErrorCode.USER_OFFLINE, 3)
    assert failed == [("alice", "bob#4", MessageType.REQUEST, sent)]
    assert bob.take() == []


@pytest.mark.parametrize("dest", ["bob#x", "#5", "bob#", "bob#\u00b2", "bob#\u0665", "*"])
def test_relay_to_what_is_not_a_user(dest):
    """
    DestUserIDs that name no user or device are bad requests (and a
    non-ASCII digit after C{#} is no device kind).
    """
    engine = make_engine()
    alice = connect(engine, "alice")
    bob = connect(engine, "bob", 5)
    alice.send(MessageType.SEND_CERTAINLY, Information(1, b""), dest=dest, message_id=3)
    assert_error(alice.take(), MessageType.SEND_CERTAINLY, ErrorCode.BAD_REQUEST, 3)
    assert bob.take() == []
    assert session_of(alice).logged_on


@pytest.mark.parametrize("user_id", ["bob#5", "#", "a#b"])
def test_device_mark_refused_in_user_ids(user_id):
    engine = make_engine()
    client = Client(engine)
    client.logon(user_id)
    (reply, notice) = client.take()
    assert reply.body.result == LogonResult.FAILED
    assert "#" in reply.body.failure_cause
    assert notice.body.reason == DisconnectedType.LOGON_FAILED


def test_relay_sender_is_verified():
    """
    A frame whose UserID is not the session's user is not relayed: the
    session ends.
    """
    engine = make_engine()
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    alice.send(MessageType.SEND, Information(1, b"forged"), dest="bob", user_id="carol")
    assert bob.take() == []
    (notice,) = alice.take()
    assert notice.body.reason == DisconnectedType.MESSAGE_WITH_WRONG_USER_ID
    assert alice.closing


def test_runs_of_sends_in_one_read():
    """
    One read holding runs of Sends to an online user, to an offline user, to
    the server and to a device kind that is away, then a frame with another
    sender's UserID: each run gets what a frame of it would, in order; the
    online receiver gets its frames in one write; the forged frame ends the
    session and nothing after it is relayed.
    """
    recorder = Recorder()
    engine = make_engine(recorder)
    failed = record_transmit_failed(engine)
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    writes = []
    bob.transport.write = lambda data, write=bob.transport.write: (
        writes.append(data),
        write(data),
    )[1]

    def sends(dest, n, **header):
        return [
            alice.frame(MessageType.SEND, Information(n, b"%d" % i), dest=dest, **header)
            for i in range(n)
        ]

    to_bob = sends("bob", 3)
    to_carol = sends("carol", 2)
    to_server = sends("_0", 2)
    to_device = sends("bob#3", 2)
    again = sends("bob", 2)
    forged = sends("bob", 1, user_id="mallory")
    after = sends("bob", 1)
    alice.send_raw(b"".join(to_bob + to_carol + to_server + to_device + again + forged + after))

    assert [r.raw for r in bob.take()] == to_bob + again
    assert writes == [b"".join(to_bob + again)]
    assert [f[1] for f in failed] == ["carol", "carol", "bob#3", "bob#3"]
    assert [f[3] for f in failed] == to_carol + to_device
    assert [(i[0], i[2], i[3]) for i in recorder.informations] == [
        ("alice", 2, b"0"),
        ("alice", 2, b"1"),
    ]
    (notice,) = alice.take()
    assert notice.body.reason == DisconnectedType.MESSAGE_WITH_WRONG_USER_ID
    assert engine.counters["relayed_messages.send"] == 5


@pytest.mark.parametrize(
    "message_type, body, message_id",
    [
        (MessageType.REQUEST, Information(5, b"q"), 11),
        (MessageType.SEND_CERTAINLY, Information(5, b"s"), 12),
        (MessageType.PING_BY_SERVER, Empty(), 14),
    ],
)
def test_request_to_offline_user(message_type, body, message_id):
    """
    A message that waits for an answer gets Error(UserOffline); the
    transmit_failed event carries the frame's bytes for an offline store.
    """
    engine = make_engine()
    failed = record_transmit_failed(engine)
    alice = connect(engine, "alice")
    sent = alice.send(message_type, body, dest="carol", message_id=message_id)
    assert_error(alice.take(), message_type, ErrorCode.USER_OFFLINE, message_id, contains="carol")
    assert failed == [("alice", "carol", message_type, sent)]
    assert engine.counters["transmit_failed"] == 1


@pytest.mark.parametrize(
    "message_type, body",
    [
        (MessageType.SEND, Information(5, b"one way")),
        (MessageType.BLOB, BlobFragment(5, 1, 0, True, b"blob")),
    ],
)
def test_one_way_to_offline_user(message_type, body):
    """
    A one-way message to an offline user is counted and reported, and
    nothing goes back to the sender.
    """
    engine = make_engine()
    failed = record_transmit_failed(engine)
    alice = connect(engine, "alice")
    for _n in range(3):
        sent = alice.send(message_type, body, dest="carol")
    assert alice.take() == []
    assert engine.counters["transmit_failed"] == 3
    assert failed[-1] == ("alice", "carol", message_type, sent)
    assert len(failed) == 3
    assert session_of(alice).logged_on


def test_user_goes_offline():
    engine = make_engine()
    failed = record_transmit_failed(engine)
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    alice.send(MessageType.SEND, Information(1, b"1"), dest="bob")
    assert len(bob.take()) == 1
    bob.lose()
    alice.send(MessageType.SEND, Information(1, b"2"), dest="bob")
    assert len(failed) == 1


def test_relay_keeps_order_of_10000_messages():
    """
    10,000 messages of every relayed kind, arriving in a few large chunks
    cut anywhere, reach the receiver in order and unchanged.
    """
    # 5,000 of them are requests that wait for answers: room for all.
    engine = make_engine(max_unanswered_requests=10_000)
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    kinds = [
        (MessageType.SEND, 0),
        (MessageType.SEND_CERTAINLY, 1),
        (MessageType.REQUEST, 1),
        (MessageType.SEND, 1),
    ]
    frames = []
    for n in range(10_000):
        message_type, with_id = kinds[n % len(kinds)]
        body = Information(n, n.to_bytes(4, "little") * (n % 7))
        frames.append(alice.frame(message_type, body, dest="bob", message_id=n * with_id))
    stream = b"".join(frames)
    cuts = [0, 1, 100_003, len(stream) // 2 + 5, len(stream) - 3, len(stream)]
    for start, end in zip(cuts, cuts[1:]):
        alice.send_raw(stream[start:end])
    received = bob.take()
    assert len(received) == 10_000
    assert [r.raw for r in received] == frames
    assert alice.take() == []


def test_relay_order_per_sender():
    """
    Two senders interleaved: each one's messages arrive in its own order.
    """
    engine = make_engine()
    alice = connect(engine, "alice")
    carol = connect(engine, "carol")
    bob = connect(engine, "bob")
    for n in range(200):
        sender = alice if n % 3 else carol
        sender.send(MessageType.SEND, Information(n, b""), dest="bob")
    received = bob.take()
    for sender in ("alice", "carol"):
        numbers = [r.body.information_type for r in received if r.user_id == sender]
        assert numbers == sorted(numbers) and len(numbers) > 50


# -- server push -----------------------------------------------------------------


def test_engine_send():
    engine = make_engine()
    bob_pc = connect(engine, "bob", ClientType.DOTNET)
    bob_phone = connect(engine, "bob", ClientType.ANDROID)
    bob_pc.take()
    assert engine.send("bob", 9, b"news") == 2
    for bob in (bob_pc, bob_phone):
        (r,) = bob.take()
        assert (r.message_type, r.message_id) == (MessageType.SEND, 0)
        assert r.body == Information(9, b"news")
        assert (r.user_id, r.dest_user_id) == ("_0", "bob")
    assert engine.send("bob", 9, b"phone", client_type=ClientType.ANDROID) == 1
    assert bob_pc.take() == [] and len(bob_phone.take()) == 1
    assert engine.send("carol", 9, b"x") == 0
    assert engine.counters["transmit_failed"] == 1


def _server_query(engine, bob, *args, **kwargs):
    results: list = []
    d = engine.query("bob", 21, b"how are you", *args, **kwargs)
    d.addBoth(results.append)
    (request,) = bob.take()
    assert request.message_type == MessageType.REQUEST
    assert request.message_id != 0
    assert request.body == Information(21, b"how are you")
    assert (request.user_id, request.dest_user_id) == ("_0", "bob")
    return request, results


def test_engine_query_answered():
    engine = make_engine()
    bob = connect(engine, "bob")
    request, results = _server_query(engine, bob)
    assert results == []
    bob.send(MessageType.RESPONSE, Information(21, b"fine"), message_id=request.message_id)
    assert results == [b"fine"]
    assert timers(engine) == []  # the timeout is cancelled
    assert len(engine.pending) == 0


def test_engine_query_error():
    engine = make_engine()
    bob = connect(engine, "bob")
    request, results = _server_query(engine, bob)
    bob.send(
        MessageType.ERROR,
        Error(MessageType.REQUEST, ErrorCode.NOT_AUTHORIZED, "not telling"),
        message_id=request.message_id,
    )
    (failure,) = results
    failure.trap(RequestError)
    assert failure.value.code == ErrorCode.NOT_AUTHORIZED
    assert failure.value.text == "not telling"


def test_engine_query_times_out():
    # The reaper runs from the first connection: bob stays on past the
    # query timeout only with a longer heartbeat timeout.
    engine = make_engine(heartbeat_timeout=120)
    bob = connect(engine, "bob")
    request, results = _server_query(engine, bob)
    engine.clock.advance(29.9)
    assert results == []
    engine.clock.advance(0.1)
    (failure,) = results
    failure.trap(RequestError)
    assert failure.value.code == ErrorCode.TIMEOUT
    # A late answer is dropped.
    bob.send(MessageType.RESPONSE, Information(21, b"late"), message_id=request.message_id)
    assert len(results) == 1 and bob.take() == []
    assert session_of(bob).logged_on


def test_engine_query_timeout_setting():
    engine = make_engine(query_timeout=5)
    bob = connect(engine, "bob")
    _, results = _server_query(engine, bob)
    engine.clock.advance(4.9)
    assert results == []
    engine.clock.advance(0.1)
    assert results[0].value.code == ErrorCode.TIMEOUT
    _, results = _server_query(engine, bob, timeout=1)
    engine.clock.advance(1)
    assert results[0].value.code == ErrorCode.TIMEOUT


def test_engine_query_session_ends():
    engine = make_engine()
    bob = connect(engine, "bob")
    _, results = _server_query(engine, bob)
    bob.lose()
    (failure,) = results
    assert failure.value.code == ErrorCode.USER_OFFLINE
    assert timers(engine) == []  # the timeout is cancelled


def test_engine_query_offline():
    engine = make_engine()
    results: list = []
    engine.query("bob", 1).addErrback(results.append)
    assert results[0].value.code == ErrorCode.USER_OFFLINE


def test_engine_query_answer_from_another_session_is_ignored():
    engine = make_engine()
    bob = connect(engine, "bob")
    carol = connect(engine, "carol")
    request, results = _server_query(engine, bob)
    carol.send(MessageType.RESPONSE, Information(21, b"forged"), message_id=request.message_id)
    assert results == []
    bob.send(MessageType.RESPONSE, Information(21, b"real"), message_id=request.message_id)
    assert results == [b"real"]


def test_engine_query_one_device():
    engine = make_engine()
    bob_pc = connect(engine, "bob", ClientType.DOTNET)
    bob_phone = connect(engine, "bob", ClientType.ANDROID)
    bob_pc.take()
    engine.query("bob", 1, b"", client_type=ClientType.ANDROID)
    assert bob_pc.take() == []
    assert types(bob_phone.take()) == [MessageType.REQUEST]


def test_engine_query_malformed_answer():
    engine = make_engine()
    bob = connect(engine, "bob")
    request, results = _server_query(engine, bob)
    bob.send(MessageType.RESPONSE, b"\x01", message_id=request.message_id)
    assert results[0].value.code == ErrorCode.BAD_REQUEST


# -- blobs -------------------------------------------------------------------------


def send_blob(
    client, payload, *, blob_id=1, information_type=8, size=3000, dest="_0", message_id=0
):
    """
    Send a payload as blob fragments; the last carries C{message_id}.
    """
    fragments = fragment_blob(information_type, blob_id, payload, size)
    for fragment in fragments:
        client.send(
            MessageType.BLOB,
            fragment,
            dest=dest,
            message_id=message_id if fragment.is_last else 0,
        )
    return fragments


@pytest.mark.parametrize("mode", MODES)
def test_blob_to_server(mode):
    """
    Fragments to the server are reassembled and handed over as one payload;
    the last fragment's MessageID gets the Ack.
    """
    recorder = Recorder(mode)
    engine = make_engine(recorder)
    alice = connect(engine, "alice", ClientType.ANDROID)
    payload = bytes(range(256)) * 40
    fragments = send_blob(alice, payload, message_id=77)
    assert len(fragments) == 4
    assert recorder.informations == [("alice", ClientType.ANDROID, 8, payload)]
    (ack,) = alice.take()
    assert (ack.message_type, ack.message_id, ack.body) == (MessageType.ACK, 77, Ack(8))
    assert session_of(alice).blobs.pending == 0


def test_blob_to_server_without_ack():
    recorder = Recorder()
    engine = make_engine(recorder)
    alice = connect(engine, "alice")
    send_blob(alice, b"abc" * 2000)
    assert len(recorder.informations) == 1
    assert alice.take() == []


def test_blob_ack_waits_for_handler():
    recorder = Recorder("pending")
    engine = make_engine(recorder)
    alice = connect(engine, "alice")
    send_blob(alice, b"abc", message_id=5)
    assert alice.take() == []
    recorder.pending[0].callback(None)
    assert [r.body for r in alice.take()] == [Ack(8)]


def test_blob_interleaved():
    recorder = Recorder()
    engine = make_engine(recorder)
    alice = connect(engine, "alice")
    one = fragment_blob(1, 10, b"a" * 100, 30)
    two = fragment_blob(2, 20, b"b" * 100, 30)
    for a, b in zip(one, two):
        alice.send(MessageType.BLOB, a)
        alice.send(MessageType.BLOB, b)
    assert [(t, p) for _, _, t, p in recorder.informations] == [(1, b"a" * 100), (2, b"b" * 100)]


def test_blob_raising_handler():
    engine = make_engine(Recorder(error=ValueError("bad blob")))
    alice = connect(engine, "alice")
    send_blob(alice, b"x" * 10, message_id=5)
    assert_error(alice.take(), MessageType.BLOB, ErrorCode.HANDLER_ERROR, 5, contains="bad blob")


def test_blob_no_handler():
    engine = make_engine()
    alice = connect(engine, "alice")
    send_blob(alice, b"x" * 10000, message_id=5)
    assert_error(alice.take(), MessageType.BLOB, ErrorCode.HANDLER_ERROR, 5)


def test_blob_too_large():
    """
    A blob that grows past max_blob_size is dropped with TooLarge and its
    bytes are released.
    """
    recorder = Recorder()
    engine = make_engine(recorder, max_blob_size=5000)
    alice = connect(engine, "alice")
    fragments = fragment_blob(8, 1, b"x" * 9000, 2000)
    for n, fragment in enumerate(fragments[:2]):
        alice.send(MessageType.BLOB, fragment, message_id=n + 1)
    assert alice.take() == []
    assert session_of(alice).blobs.buffered == 4000
    alice.send(MessageType.BLOB, fragments[2], message_id=3)
    assert_error(alice.take(), MessageType.BLOB, ErrorCode.TOO_LARGE, 3, contains="5000")
    assert session_of(alice).blobs.buffered == 0
    assert session_of(alice).blobs.pending == 0
    # The rest of that blob no longer belongs to anything.
    alice.send(MessageType.BLOB, fragments[3], message_id=4)
    assert_error(alice.take(), MessageType.BLOB, ErrorCode.BAD_REQUEST, 4)
    assert recorder.informations == []
    assert engine.counters["blob_errors"] == 2
    assert session_of(alice).logged_on


def test_blob_exactly_max_size():
    recorder = Recorder()
    engine = make_engine(recorder, max_blob_size=5000)
    alice = connect(engine, "alice")
    send_blob(alice, b"x" * 5000, size=2000, message_id=1)
    assert types(alice.take()) == [MessageType.ACK]
    send_blob(alice, b"x" * 5000, size=5000, message_id=2)
    assert types(alice.take()) == [MessageType.ACK]


def test_blob_single_fragment_too_large():
    """
    The size bound holds for a blob of a single fragment too.
    """
    recorder = Recorder()
    engine = make_engine(recorder, max_blob_size=100)
    alice = connect(engine, "alice")
    alice.send(MessageType.BLOB, BlobFragment(8, 1, 0, True, b"x" * 101), message_id=1)
    assert_error(alice.take(), MessageType.BLOB, ErrorCode.TOO_LARGE, 1)
    assert recorder.informations == []


def test_blob_concurrency_bound():
    recorder = Recorder()
    engine = make_engine(recorder)
    alice = connect(engine, "alice")
    assert engine.config.max_concurrent_blobs == 4
    for blob_id in range(1, 5):
        alice.send(MessageType.BLOB, BlobFragment(8, blob_id, 0, False, b"x"), message_id=blob_id)
    assert alice.take() == []
    alice.send(MessageType.BLOB, BlobFragment(8, 5, 0, False, b"x"), message_id=5)
    assert_error(alice.take(), MessageType.BLOB, ErrorCode.RATE_LIMITED, 5)
    assert session_of(alice).blobs.pending == 4
    # A blob of one fragment takes no room and is not limited.
    alice.send(MessageType.BLOB, BlobFragment(8, 6, 0, True, b"y"), message_id=6)
    assert types(alice.take()) == [MessageType.ACK]
    # Finishing one makes room for another.
    alice.send(MessageType.BLOB, BlobFragment(8, 1, 1, True, b"x"), message_id=7)
    alice.send(MessageType.BLOB, BlobFragment(8, 5, 0, False, b"x"), message_id=8)
    assert types(alice.take()) == [MessageType.ACK]
    assert session_of(alice).blobs.pending == 4


def test_blob_concurrency_setting_is_per_session():
    engine = make_engine(Recorder(), max_concurrent_blobs=1)
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    for client in (alice, bob):
        client.send(MessageType.BLOB, BlobFragment(8, 1, 0, False, b"x"), message_id=1)
        assert client.take() == []
    alice.send(MessageType.BLOB, BlobFragment(8, 2, 0, False, b"x"), message_id=2)
    assert_error(alice.take(), MessageType.BLOB, ErrorCode.RATE_LIMITED, 2)


def _idle(engine, until, *clients):
    """
    Advance the clock to C{until} in 5 s steps, the clients heartbeating.
    """
    while engine.clock.seconds() < until:
        engine.clock.advance(min(5, until - engine.clock.seconds()))
        for client in clients:
            client.send(MessageType.HEARTBEAT)


def test_blob_idle_timeout():
    """
    An incomplete blob without a new fragment for blob_idle_timeout is
    dropped by the heartbeat scan (at most a quarter of the heartbeat
    timeout later); a later fragment is then a bad request.
    """
    recorder = Recorder()
    engine = make_engine(recorder, start=True)
    alice = connect(engine, "alice")
    blobs = lambda: session_of(alice).blobs  # noqa: E731
    alice.send(MessageType.BLOB, BlobFragment(8, 1, 0, False, b"a" * 10), message_id=1)
    _idle(engine, 55, alice)
    alice.send(MessageType.BLOB, BlobFragment(8, 1, 1, False, b"b" * 10), message_id=2)
    _idle(engine, 112.5, alice)
    assert blobs().pending == 1 and blobs().buffered == 20
    _idle(engine, 55 + 60 + engine.config.heartbeat_timeout / 4, alice)
    assert blobs().pending == 0 and blobs().buffered == 0
    assert session_of(alice).logged_on
    alice.take()
    alice.send(MessageType.BLOB, BlobFragment(8, 1, 2, True, b"c"), message_id=3)
    assert_error(alice.take(), MessageType.BLOB, ErrorCode.BAD_REQUEST, 3, contains="not started")
    assert recorder.informations == []


def test_blob_idle_timeout_setting():
    engine = make_engine(Recorder(), start=True, blob_idle_timeout=5)
    alice = connect(engine, "alice")
    engine.clock.advance(5)
    alice.send(MessageType.BLOB, BlobFragment(8, 1, 0, False, b"a"))
    engine.clock.advance(2.5)  # the scan at 7.5 s keeps it
    assert session_of(alice).blobs.pending == 1
    engine.clock.advance(7.5)  # the scan at 15 s drops it
    assert session_of(alice).blobs.pending == 0


@pytest.mark.parametrize(
    "second",
    [
        BlobFragment(8, 1, 2, True, b"skipped one"),
        BlobFragment(8, 1, 0, True, b"again"),
        BlobFragment(9, 1, 1, True, b"other type"),
    ],
    ids=["gap", "repeat", "type-change"],
)
def test_blob_out_of_order(second):
    recorder = Recorder()
    engine = make_engine(recorder)
    alice = connect(engine, "alice")
    alice.send(MessageType.BLOB, BlobFragment(8, 1, 0, False, b"first"), message_id=1)
    alice.send(MessageType.BLOB, second, message_id=2)
    assert_error(alice.take(), MessageType.BLOB, ErrorCode.BAD_REQUEST, 2)
    assert session_of(alice).blobs.pending == 0
    assert recorder.informations == []


def test_blob_not_started():
    engine = make_engine(Recorder())
    alice = connect(engine, "alice")
    alice.send(MessageType.BLOB, BlobFragment(8, 1, 3, False, b"x"), message_id=1)
    assert_error(alice.take(), MessageType.BLOB, ErrorCode.BAD_REQUEST, 1)


def test_blob_malformed_fragment():
    engine = make_engine(Recorder())
    alice = connect(engine, "alice")
    alice.send(MessageType.BLOB, b"\x08\x00\x00\x00\x01", message_id=1)
    assert_error(alice.take(), MessageType.BLOB, ErrorCode.BAD_REQUEST, 1)


def test_blobs_released_when_session_ends():
    engine = make_engine(Recorder())
    alice = connect(engine, "alice")
    alice.send(MessageType.BLOB, BlobFragment(8, 1, 0, False, b"x" * 1000))
    session = session_of(alice)
    assert session.blobs.buffered == 1000
    alice.lose()
    assert session.blobs is None


def test_blob_relayed_to_user_is_not_reassembled():
    recorder = Recorder()
    engine = make_engine(recorder, max_blob_size=10)
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    payload = b"z" * 100
    fragments = send_blob(alice, payload, size=30, dest="bob", message_id=9)
    received = bob.take()
    assert [r.body for r in received] == fragments
    assert b"".join(r.body.payload for r in received) == payload
    assert received[-1].message_id == 9
    assert alice.take() == [] and recorder.informations == []
    assert session_of(alice).blobs is None


# -- the blob assembler and fragment_blob --------------------------------------------


def test_fragment_blob():
    fragments = fragment_blob(3, 7, b"abcdefghij", 4)
    assert fragments == [
        BlobFragment(3, 7, 0, False, b"abcd"),
        BlobFragment(3, 7, 1, False, b"efgh"),
        BlobFragment(3, 7, 2, True, b"ij"),
    ]
    assert fragment_blob(3, 7, b"abcdefgh", 4)[-1] == BlobFragment(3, 7, 1, True, b"efgh")
    assert fragment_blob(3, 7, b"", 4) == [BlobFragment(3, 7, 0, True, b"")]
    for fragment in fragments:
        assert BlobFragment.decode(fragment.encode()) == fragment
    assert fragments[0].encode() == struct.pack("<iIIB", 3, 7, 0, 0) + b"abcd"
    with pytest.raises(ValueError):
        fragment_blob(3, 7, b"abc", 0)


@given(
    payload=st.binary(max_size=3000),
    size=st.integers(1, 1000),
    information_type=st.integers(-(2**31), 2**31 - 1),
    blob_id=st.integers(0, 2**32 - 1),
)
def test_fragment_and_reassemble(payload, size, information_type, blob_id):
    fragments = fragment_blob(information_type, blob_id, payload, size)
    assert all(len(f.payload) <= size for f in fragments)
    assert [f.fragment_index for f in fragments] == list(range(len(fragments)))
    assert [f.is_last for f in fragments] == [False] * (len(fragments) - 1) + [True]
    assembler = BlobAssembler(max_blob_size=3000)
    results = [assembler.add(BlobFragment.decode(f.encode()), 0) for f in fragments]
    assert results[:-1] == [None] * (len(fragments) - 1)
    assert results[-1] == payload
    assert assembler.pending == assembler.buffered == 0


def test_assembler_bounds():
    assembler = BlobAssembler(max_blob_size=10, max_concurrent=2, idle_timeout=5)
    assert assembler.add(BlobFragment(1, 1, 0, False, b"12345"), 0) is None
    assert assembler.add(BlobFragment(1, 2, 0, False, b"1"), 0) is None
    assert (assembler.pending, assembler.buffered) == (2, 6)
    with pytest.raises(BlobError) as e:
        assembler.add(BlobFragment(1, 3, 0, False, b"1"), 0)
    assert e.value.code == ErrorCode.RATE_LIMITED
    with pytest.raises(BlobError) as e:
        assembler.add(BlobFragment(1, 1, 1, False, b"123456"), 1)
    assert e.value.code == ErrorCode.TOO_LARGE
    assert (assembler.pending, assembler.buffered) == (1, 1)
    with pytest.raises(BlobError) as e:
        assembler.add(BlobFragment(1, 9, 0, True, b"x" * 11), 1)
    assert e.value.code == ErrorCode.TOO_LARGE
    assert assembler.add(BlobFragment(1, 9, 0, True, b"x" * 10), 1) == b"x" * 10


def test_assembler_expire():
    assembler = BlobAssembler(idle_timeout=5)
    assembler.add(BlobFragment(1, 1, 0, False, b"a"), 0)
    assembler.add(BlobFragment(1, 2, 0, False, b"b"), 3)
    assert assembler.expire(5) == []
    assert assembler.expire(5.5) == [1]
    assert assembler.pending == 1
    assembler.add(BlobFragment(1, 2, 1, False, b"c"), 8)
    assert assembler.expire(12) == []
    assert assembler.expire(13.1) == [2]
    assert assembler.pending == assembler.buffered == 0
    assembler.add(BlobFragment(1, 3, 0, False, b"d"), 20)
    assembler.clear()
    assert assembler.pending == 0


def test_assembler_order():
    assembler = BlobAssembler()
    with pytest.raises(BlobError) as e:
        assembler.add(BlobFragment(1, 1, 1, False, b"a"), 0)
    assert e.value.code == ErrorCode.BAD_REQUEST
    assembler.add(BlobFragment(1, 1, 0, False, b"a"), 0)
    with pytest.raises(BlobError) as e:
        assembler.add(BlobFragment(2, 1, 1, False, b"a"), 0)
    assert e.value.code == ErrorCode.BAD_REQUEST
    assert assembler.pending == 0


# -- broadcast ---------------------------------------------------------------------


def test_broadcast_to_1000_members():
    """
    A broadcast to a group of 1,000 online members reaches the 999 others
    exactly once, and not the sender; the sender gets the Ack.
    """
    members = [f"m{n}" for n in range(1000)]
    engine = make_engine(groups=Groups({"big": members}))
    # From many hosts: one host may only log on so often.
    clients = [
        connect(engine, user, host=f"10.1.{n // 100}.{n % 100 + 1}")
        for n, user in enumerate(members)
    ]
    sender = clients[500]
    sent = sender.send(MessageType.BROADCAST, Information(3, b"to all"), dest="big", message_id=9)
    for client in clients:
        received = client.take()
        if client is sender:
            assert [(r.message_type, r.message_id, r.body) for r in received] == [
                (MessageType.ACK, 9, Ack(3))
            ]
        else:
            assert [r.raw for r in received] == [sent]


def test_broadcast_reaches_every_device_but_none_of_the_senders():
    engine = make_engine(groups=Groups({"g": ["alice", "bob", "carol"]}))
    alice_pc = connect(engine, "alice", ClientType.DOTNET)
    alice_phone = connect(engine, "alice", ClientType.ANDROID)
    bob_pc = connect(engine, "bob", ClientType.DOTNET)
    bob_phone = connect(engine, "bob", ClientType.IOS)
    dave = connect(engine, "dave")
    for client in (alice_pc, bob_pc):
        client.take()
    sent = alice_pc.send(MessageType.BROADCAST, Information(3, b"hi"), dest="g")
    assert [r.raw for r in bob_pc.take()] == [sent]
    assert [r.raw for r in bob_phone.take()] == [sent]
    assert alice_phone.take() == [] and alice_pc.take() == [] and dave.take() == []


def test_broadcast_to_a_member_named_with_a_device_mark():
    """
    A group manager may name one device of a member (C{"bob#5"}, as a
    DestUserID does): only that device gets the Broadcast.
    """
    engine = make_engine(groups=Groups({"g": ["alice", "bob#5", "zed#5"]}))
    alice = connect(engine, "alice")
    bob_pc = connect(engine, "bob", ClientType.DOTNET)
    bob_phone = connect(engine, "bob", ClientType.ANDROID)
    bob_pc.take()
    sent = alice.send(MessageType.BROADCAST, Information(3, b"hi"), dest="g", message_id=5)
    assert [r.raw for r in bob_phone.take()] == [sent]
    assert bob_pc.take() == []
    assert types(alice.take()) == [MessageType.ACK]


def test_a_broadcast_body_too_short_for_its_type_is_refused():
    engine = make_engine(groups=Groups({"g": ["alice", "bob"]}))
    alice, bob = connect(engine, "alice"), connect(engine, "bob")
    alice.send_raw(alice.frame(MessageType.BROADCAST, b"\x01\x02", dest="g", message_id=6))
    (error,) = alice.take()
    assert (error.message_type, error.body.code) == (MessageType.ERROR, ErrorCode.BAD_REQUEST)
    assert bob.take() == []


def test_broadcast_refused():
    engine = make_engine(groups=Groups({"g": ["bob"]}))
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    alice.send(MessageType.BROADCAST, Information(3, b"hi"), dest="g", message_id=4)
    assert_error(alice.take(), MessageType.BROADCAST, ErrorCode.NOT_AUTHORIZED, 4)
    assert bob.take() == []
    # Without a MessageID the refusal is not answered.
    alice.send(MessageType.BROADCAST, Information(3, b"hi"), dest="g")
    assert alice.take() == [] and bob.take() == []


@pytest.mark.parametrize("dest", ["g", "*"])
def test_broadcast_without_group_manager(dest):
    engine = make_engine()
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    alice.send(MessageType.BROADCAST, Information(3, b"hi"), dest=dest, message_id=4)
    assert_error(alice.take(), MessageType.BROADCAST, ErrorCode.NOT_AUTHORIZED, 4)
    assert bob.take() == []


@pytest.mark.parametrize("dest", ["_0", ""])
def test_broadcast_to_server(dest):
    engine = make_engine(groups=Groups({"_0": ["alice", "bob"]}, allowed={("alice", "_0")}))
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    alice.send(MessageType.BROADCAST, Information(3, b"hi"), dest=dest, message_id=4)
    assert_error(alice.take(), MessageType.BROADCAST, ErrorCode.NOT_AUTHORIZED, 4)
    assert bob.take() == []


def test_broadcast_to_everyone():
    """
    C{*} is every online user, for those the group manager permits.
    """
    engine = make_engine(groups=Groups({}, allowed={("admin", "*")}))
    admin = connect(engine, "admin")
    others = [connect(engine, user) for user in ("alice", "bob", "carol")]
    sent = admin.send(MessageType.BROADCAST, Information(3, b"hear ye"), dest="*", message_id=2)
    assert [r.body for r in admin.take()] == [Ack(3)]
    for client in others:
        assert [r.raw for r in client.take()] == [sent]
    others[0].send(MessageType.BROADCAST, Information(3, b"me too"), dest="*", message_id=3)
    assert_error(others[0].take(), MessageType.BROADCAST, ErrorCode.NOT_AUTHORIZED, 3)
    assert others[1].take() == [] and admin.take() == []


def test_broadcast_skips_offline_members_and_unknown_groups():
    groups = Groups({"g": ["alice", "bob", "zed"]}, allowed={("alice", "none")})
    engine = make_engine(groups=groups)
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    sent = alice.send(MessageType.BROADCAST, Information(3, b""), dest="g", message_id=2)
    assert [r.raw for r in bob.take()] == [sent]
    assert types(alice.take()) == [MessageType.ACK]
    alice.send(MessageType.BROADCAST, Information(3, b""), dest="none", message_id=3)
    assert types(alice.take()) == [MessageType.ACK]
    assert bob.take() == []


@pytest.mark.parametrize("mode", ["deferred", "coroutine"])
def test_broadcast_asynchronous_group_manager(mode):
    engine = make_engine(groups=Groups({"g": ["alice", "bob"]}, mode=mode))
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    sent = alice.send(MessageType.BROADCAST, Information(3, b"x"), dest="g", message_id=2)
    assert [r.raw for r in bob.take()] == [sent]
    assert [r.body for r in alice.take()] == [Ack(3)]


def test_broadcast_waits_for_group_manager():
    """
    Nothing is delivered or acknowledged until the group manager answers.
    """
    groups = Groups({"g": ["alice", "bob"]}, mode="pending")
    engine = make_engine(groups=groups)
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    sent = alice.send(MessageType.BROADCAST, Information(3, b"x"), dest="g", message_id=2)
    ((allowed, ok),) = groups.pending
    assert ok is True
    allowed.callback(True)
    assert bob.take() == [] and alice.take() == []
    members, value = groups.pending[1]
    members.callback(value)
    assert [r.raw for r in bob.take()] == [sent]
    assert [r.body for r in alice.take()] == [Ack(3)]


def test_broadcast_group_manager_fails():
    groups = Groups({"g": ["alice", "bob"]})
    groups.get_members = lambda group_id: fail(LookupError("directory down"))
    engine = make_engine(groups=groups)
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    alice.send(MessageType.BROADCAST, Information(3, b"x"), dest="g", message_id=2)
    assert_error(
        alice.take(), MessageType.BROADCAST, ErrorCode.HANDLER_ERROR, 2, contains="directory down"
    )
    assert bob.take() == []


def test_broadcast_malformed_body():
    engine = make_engine(groups=Groups({"g": ["alice", "bob"]}))
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    alice.send(MessageType.BROADCAST, b"\x01", dest="g", message_id=2)
    assert_error(alice.take(), MessageType.BROADCAST, ErrorCode.BAD_REQUEST, 2)
    assert bob.take() == []


# -- the chat example -----------------------------------------------------------------


def test_chat_handler_wiring():
    """
    C{--handler esf.examples.chat:handler} gives one object that is every
    kind of handler.
    """
    options = Options()
    options.parseOptions(["--handler", "esf.examples.chat:handler"])
    [app] = options["handlers"]
    assert app is chat.handler
    applications = options["applications"]
    assert applications.handler is applications.customize_handler is app
    assert applications.group_manager is app and applications.engine_aware == (app,)
    for interface in (IBasicHandler, ICustomizeHandler, IGroupManager, IEngineAware):
        assert verifyObject(interface, app)


@pytest.fixture
def chat_engine():
    app = chat.ChatApplication()
    engine = ServerEngine(
        ServerConfig(), clock=task.Clock(), handler=app, customize_handler=app, group_manager=app
    )
    app.initialize(engine)
    return app, engine


def _chat(client, information_type, text, message_id=0):
    client.send(
        MessageType.SEND_CERTAINLY if message_id else MessageType.SEND,
        Information(information_type, text.encode("utf-8")),
        message_id=message_id,
    )


def test_chat_rooms(chat_engine):
    app, engine = chat_engine
    alice, bob, carol = (connect(engine, u) for u in ("alice", "bob", "carol"))
    _chat(alice, chat.JOIN, "lobby")
    _chat(bob, chat.JOIN, "lobby", message_id=1)
    assert [r.body for r in bob.take()] == [Ack(chat.JOIN)]
    assert app.get_members("lobby") == ["alice", "bob"]
    said = alice.send(
        MessageType.BROADCAST, Information(chat.SAY, b"hello"), dest="lobby", message_id=2
    )
    assert [r.raw for r in bob.take()] == [said]
    assert [r.body for r in alice.take()] == [Ack(chat.SAY)]
    assert carol.take() == []
    # Not a member: refused.
    carol.send(MessageType.BROADCAST, Information(chat.SAY, b"hi?"), dest="lobby", message_id=3)
    assert_error(carol.take(), MessageType.BROADCAST, ErrorCode.NOT_AUTHORIZED, 3)
    # Leaving.
    _chat(bob, chat.LEAVE, "lobby")
    alice.send(MessageType.BROADCAST, Information(chat.SAY, b"alone"), dest="lobby")
    assert bob.take() == []
    # Going offline leaves every room; the last one out removes it.
    alice.lose()
    assert app.rooms == {}


def test_chat_bad_room(chat_engine):
    app, engine = chat_engine
    alice = connect(engine, "alice")
    for n, room in enumerate(["", "*", "_0", "a-very-long-room"], 1):
        _chat(alice, chat.JOIN, room, message_id=n)
        assert_error(alice.take(), MessageType.SEND_CERTAINLY, ErrorCode.HANDLER_ERROR, n)
    assert app.rooms == {}


def test_chat_echo(chat_engine):
    _, engine = chat_engine
    alice = connect(engine, "alice")
    alice.send(MessageType.REQUEST, Information(chat.ECHO, b"ping \xff"), message_id=4)
    (r,) = alice.take()
    assert (r.message_type, r.message_id, r.body) == (
        MessageType.RESPONSE,
        4,
        Information(chat.ECHO, b"ping \xff"),
    )
    alice.send(MessageType.REQUEST, Information(99, b""), message_id=5)
    assert_error(alice.take(), MessageType.REQUEST, ErrorCode.HANDLER_ERROR, 5, contains="99")


def test_chat_kick(chat_engine):
    app, engine = chat_engine
    admin, alice, bob = (connect(engine, u) for u in ("admin", "alice", "bob"))
    _chat(bob, chat.JOIN, "lobby")
    # Not an administrator: refused, nobody kicked.
    _chat(alice, chat.COMMAND, "/kick bob", message_id=1)
    assert_error(
        alice.take(), MessageType.SEND_CERTAINLY, ErrorCode.HANDLER_ERROR, 1, contains="admin"
    )
    assert engine.user_manager.is_user_online("bob")
    # The administrator kicks.
    _chat(admin, chat.COMMAND, "/kick bob spamming the lobby", message_id=2)
    assert [r.body for r in admin.take()] == [Ack(chat.COMMAND)]
    kicked, notice = bob.take()
    assert kicked.body == BeingKickedOutNotify("admin", "spamming the lobby")
    assert notice.body == DisconnectNotice(DisconnectedType.BEING_KICKED_OUT, notice.body.text)
    assert bob.closing
    assert not engine.user_manager.is_user_online("bob")
    assert "lobby" not in app.rooms
    # Nobody to kick, or no command at all.
    _chat(admin, chat.COMMAND, "/kick bob", message_id=3)
    assert_error(
        admin.take(), MessageType.SEND_CERTAINLY, ErrorCode.HANDLER_ERROR, 3, contains="not online"
    )
    _chat(admin, chat.COMMAND, "/ban bob", message_id=4)
    assert_error(
        admin.take(), MessageType.SEND_CERTAINLY, ErrorCode.HANDLER_ERROR, 4, contains="usage"
    )
    # KickOut (108) follows the same rule.
    assert app.can_kick_out("admin", "alice", None)
    assert not app.can_kick_out("alice", "admin", None)


def test_chat_broadcast_to_everyone(chat_engine):
    _, engine = chat_engine
    admin, alice, bob = (connect(engine, u) for u in ("admin", "alice", "bob"))
    said = admin.send(MessageType.BROADCAST, Information(chat.SAY, b"maintenance"), dest="*")
    assert [r.raw for r in alice.take()] == [said]
    assert [r.raw for r in bob.take()] == [said]
    alice.send(MessageType.BROADCAST, Information(chat.SAY, b"me too"), dest="*", message_id=1)
    assert_error(alice.take(), MessageType.BROADCAST, ErrorCode.NOT_AUTHORIZED, 1)
