"""
Tests of the relay policy: an application that provides L{IRelayPolicy}
decides which frames one user may relay to another, on every path a
frame takes (one to one, a group, the offline store, another node), and
its later answers keep each sender's frames in order within their bounds.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from _helpers import connect
from twisted.internet import task
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer
from zope.interface.verify import verifyObject

from esf import ErrorCode, MessageType, RelayRefused, RequestError, ServerConfig, engine_for
from esf.interfaces import IGroupManager, IRelayPolicy
from esf.offline import MemoryOfflineStore
from esf.server._application import Applications
from esf.server._counters import RELAYED_MESSAGES, Count
from esf.server._relay_policy import WAITING_COST, RelayGate
from esf.testing import MemoryServer
from esf.wire import BlobFragment, Empty, Information

T = MessageType


@implementer(IRelayPolicy)
class Hub:
    """
    An IoT hub's rule: devices (C{dev-...}) may talk to operators
    (C{op-...}) only, operators to anyone.  Records what it was asked.
    """

    def __init__(self):
        self.asked: list[tuple[str, str, int, int]] = []

    def may_relay(self, sender, receiver, message_type, information_type):
        self.asked.append((sender, receiver, message_type, information_type))
        return sender.startswith("op-") or receiver.startswith("op-")


#: For twistd's --handler (test_relay_policy:HUB).
HUB = Hub()


@implementer(IRelayPolicy)
class Later:
    """
    Answers every question with a new Deferred, kept with its arguments;
    records which were cancelled.
    """

    def __init__(self):
        self.pending: list[tuple[tuple, Deferred]] = []
        self.cancelled: list[tuple] = []

    def may_relay(self, sender, receiver, message_type, information_type):
        args = (sender, receiver, message_type, information_type)
        d = Deferred(lambda d: self.cancelled.append(args))
        self.pending.append((args, d))
        return d


@implementer(IRelayPolicy)
class Answers:
    """
    Answers (or raises) C{answer}, whatever it is asked.
    """

    def __init__(self, answer):
        self.answer = answer

    def may_relay(self, sender, receiver, message_type, information_type):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@implementer(IGroupManager)
class Room:
    """
    The group C{"room"} of everyone named; records can_broadcast's calls.
    """

    def __init__(self, *members):
        self.members = list(members)
        self.asked: list[tuple[str, str]] = []

    def get_members(self, group_id):
        return self.members if group_id == "room" else []

    def can_broadcast(self, user_id, group_id):
        self.asked.append((user_id, group_id))
        return True


def hub_engine(*applications, offline_store=None, **settings):
    engine = engine_for(
        *applications,
        config=ServerConfig(**settings),
        clock=task.Clock(),
        offline_store=offline_store,
    )
    engine.start()
    return engine


def sends(client):
    """
    The (sender, information type) of every Send or Broadcast C{client}
    received since last asked.
    """
    return [
        (f.user_id, f.body.information_type)
        for f in client.take()
        if f.message_type in (T.SEND, T.BROADCAST)
    ]


def error_of(replies):
    """
    The one Error among C{replies}: (request type, code, text, MessageID).
    """
    [error] = [r for r in replies if r.message_type == T.ERROR]
    return (error.body.request_message_type, error.body.code, error.body.text, error.message_id)


def test_the_policies_provide_the_interface():
    for policy in (Hub(), Later(), Answers(True)):
        assert verifyObject(IRelayPolicy, policy)


def test_without_a_policy_nothing_is_asked():
    engine = hub_engine()
    assert engine.relay_gate is None


# -- what is asked, and what a refusal gets ----------------------------------------------------


@pytest.mark.parametrize("message_id", [0, 7], ids=["one-way", "with-a-message-id"])
def test_a_send_is_allowed_or_refused(logs, message_id):
    """
    A device's Send to an operator goes through; one to another device is
    refused: with a MessageID it is answered Error(NotAuthorized) naming
    both, one-way it gets nothing.  Either way it is counted (and not as
    dropped) and logged, and the receiver gets nothing.
    """
    hub = Hub()
    engine = hub_engine(hub)
    dev7, dev8, op = (connect(engine, name) for name in ("dev-7", "dev-8", "op-ann"))
    dev7.send(T.SEND, Information(5, b"to op"), dest="op-ann", message_id=message_id)
    assert sends(op) == [("dev-7", 5)]
    dev7.send(T.SEND, Information(6, b"to dev"), dest="dev-8", message_id=message_id)
    assert sends(dev8) == []
    replies = dev7.take()
    if message_id:
        assert error_of(replies) == (
            T.SEND,
            ErrorCode.NOT_AUTHORIZED,
            "dev-7 may not send to dev-8",
            message_id,
        )
    else:
        assert replies == []
    assert hub.asked == [("dev-7", "op-ann", T.SEND, 5), ("dev-7", "dev-8", T.SEND, 6)]
    assert engine.counters[Count.RELAY_REFUSED] == 1
    assert engine.counters[Count.DROPPED] == 0
    assert engine.counters[RELAYED_MESSAGES[T.SEND]] == 1
    (event,) = logs.esf("relay_refused")
    assert (event["user_id"], event["dest"], event["reason"]) == (
        "dev-7",
        "dev-8",
        "dev-7 may not send to dev-8",
    )


def test_refused_frames_cost_the_work_budget_and_a_sender_that_keeps_at_it_is_ended():
    """
    Nothing holds back a sender whose frames the policy refuses (no
    receiver's flow control), and each costs the policy's call: a refused
    frame costs a unit of the sender's work budget, past it it is counted
    as refused work, and a session that keeps its budget spent so for
    work_refusal_limit is ended with a reason.  Allowed frames cost
    nothing.
    """
    hub = Hub()
    engine = hub_engine(hub, work_rate=100, work_burst=200, work_refusal_limit=2)
    dev7, op = connect(engine, "dev-7"), connect(engine, "op-ann")
    for _ in range(300):  # allowed: free
        dev7.send(T.SEND, Information(5, b"to op"), dest="op-ann")
    assert len(sends(op)) == 300 and engine.counters[Count.WORK_REFUSED] == 0
    for _ in range(300):  # refused: the first 200 paid for, the rest past the budget
        dev7.send(T.SEND, Information(6, b"to dev"), dest="dev-8")
    assert engine.counters[Count.RELAY_REFUSED] == 300
    assert engine.counters[Count.WORK_REFUSED] == 100
    for _ in range(30):  # three seconds of refused frames, faster than the rate
        engine.clock.advance(0.1)
        for _ in range(20):
            dev7.send(T.SEND, Information(6, b"to dev"), dest="dev-8")
    notice = dev7.take()[-1]
    assert notice.message_type == T.DISCONNECT_NOTICE
    assert notice.body.reason.name == "BEING_KICKED_OUT" and "budget" in notice.body.text


@pytest.mark.parametrize(
    "message_type, body, information_type",
    [
        (T.SEND_CERTAINLY, Information(11, b"x"), 11),
        (T.REQUEST, Information(12, b"?"), 12),
        (T.BLOB, BlobFragment(13, 1, 0, False, b"part"), 13),
        (T.PING_BY_SERVER, Empty(), 0),
    ],
    ids=["send-certainly", "request", "blob-fragment", "ping-by-server"],
)
def test_every_request_a_user_relays_is_judged(message_type, body, information_type):
    """
    SendCertainly, Request, a Blob fragment (its own information type)
    and a PingByServer to a user (information type 0) are asked about, and
    refused with Error(NotAuthorized, the policy's reason).
    """

    @implementer(IRelayPolicy)
    class Refuses(Hub):
        def may_relay(self, *args):
            super().may_relay(*args)
            raise RelayRefused("devices talk to operators only")

    policy = Refuses()
    engine = hub_engine(policy)
    dev7, dev8 = connect(engine, "dev-7"), connect(engine, "dev-8")
    dev7.send(message_type, body, dest="dev-8", message_id=3)
    assert error_of(dev7.take()) == (
        message_type,
        ErrorCode.NOT_AUTHORIZED,
        "devices talk to operators only",
        3,
    )
    assert dev8.take() == []
    assert policy.asked == [("dev-7", "dev-8", message_type, information_type)]


def test_every_fragment_of_a_blob_is_judged():
    hub = Hub()
    engine = hub_engine(hub)
    dev, op = connect(engine, "dev-7"), connect(engine, "op-ann")
    for index in range(3):
        dev.send(T.BLOB, BlobFragment(9, 4, index, index == 2, b"p"), dest="op-ann")
    assert [f.message_type for f in op.take()] == [T.BLOB] * 3
    assert hub.asked == [("dev-7", "op-ann", T.BLOB, 9)] * 3


def test_answers_are_never_asked():
    """
    Response, Ack, PingAck and Error go back to whoever asked without a
    question: their requests were judged (here operators may ask devices,
    and devices may answer only because answers are not judged).
    """

    @implementer(IRelayPolicy)
    class OperatorsAsk(Hub):
        def may_relay(self, *args):
            super().may_relay(*args)
            return args[0].startswith("op-")

    policy = OperatorsAsk()
    engine = hub_engine(policy)
    op, dev = connect(engine, "op-ann"), connect(engine, "dev-7")
    op.send(T.REQUEST, Information(1, b"?"), dest="dev-7", message_id=1)
    op.send(T.SEND_CERTAINLY, Information(2, b"!"), dest="dev-7", message_id=2)
    op.send(T.PING_BY_SERVER, Empty(), dest="dev-7", message_id=3)
    op.send(T.REQUEST, Information(4, b"?"), dest="dev-7", message_id=4)
    assert len(dev.take()) == 4
    dev.send(T.RESPONSE, Information(1, b"answer"), dest="op-ann", message_id=1)
    dev.send(T.ACK, Information(2, b""), dest="op-ann", message_id=2)
    dev.send(T.PING_ACK, Empty(), dest="op-ann", message_id=3)
    dev.send(T.ERROR, b"\xcb\x00\x05\x00\x00\x00", dest="op-ann", message_id=4)
    assert [(f.message_type, f.message_id) for f in op.take()] == [
        (T.RESPONSE, 1),
        (T.ACK, 2),
        (T.PING_ACK, 3),
        (T.ERROR, 4),
    ]
    assert [a[2] for a in policy.asked] == [
        T.REQUEST,
        T.SEND_CERTAINLY,
        T.PING_BY_SERVER,
        T.REQUEST,
    ]
    assert engine.counters[Count.RELAY_REFUSED] == 0


def test_the_receiver_is_the_user_a_device_address_names():
    """
    A frame to one device of a user (C{bob#5}) is judged as a frame to the
    user: a policy on user IDs cannot be passed by naming a device.
    """
    hub = Hub()
    engine = hub_engine(hub)
    dev7, dev8 = connect(engine, "dev-7"), connect(engine, "dev-8", 5)
    dev7.send(T.REQUEST, Information(1, b"?"), dest="dev-8#5", message_id=1)
    assert error_of(dev7.take())[1:3] == (ErrorCode.NOT_AUTHORIZED, "dev-7 may not send to dev-8")
    assert dev8.take() == []
    assert hub.asked == [("dev-7", "dev-8", T.REQUEST, 1)]


def test_a_body_without_an_information_type_is_a_bad_request():
    hub = Hub()
    engine = hub_engine(hub)
    op, dev = connect(engine, "op-ann"), connect(engine, "dev-7")
    op.send(T.REQUEST, b"\x01\x02", dest="dev-7", message_id=2)
    assert error_of(op.take())[1] == ErrorCode.BAD_REQUEST
    assert dev.take() == [] and hub.asked == []


def test_a_run_of_sends_in_one_read_is_judged_frame_by_frame():
    """
    With a policy the session's inline path for runs of Sends is not
    taken: each frame of one read is asked about, with its own
    information type, and only the allowed ones go, in order.
    """

    @implementer(IRelayPolicy)
    class Even(Hub):
        def may_relay(self, *args):
            super().may_relay(*args)
            return args[3] % 2 == 0

    policy = Even()
    engine = hub_engine(policy)
    alice, bob = connect(engine, "alice"), connect(engine, "bob")
    alice.send_raw(
        b"".join(alice.frame(T.SEND, Information(n, b"x"), dest="bob") for n in range(200))
    )
    assert sends(bob) == [("alice", n) for n in range(0, 200, 2)]
    assert [a[3] for a in policy.asked] == list(range(200))
    assert engine.counters[Count.RELAY_REFUSED] == 100
    assert engine.counters[RELAYED_MESSAGES[T.SEND]] == 100


# -- a group, the offline store -----------------------------------------------------------------


@pytest.mark.parametrize("group", ["room", "*"])
def test_a_broadcast_is_judged_once_before_the_group_manager(group):
    """
    A Broadcast is asked about once, with the group (or C{*}) as the
    receiver, before the group manager's can_broadcast: refused, the group
    manager is not asked and nobody gets it; allowed, every member does.
    """
    room = Room("dev-7", "dev-8", "op-ann")
    hub = Hub()
    engine = hub_engine(hub, room)
    dev7, dev8, op = (connect(engine, name) for name in ("dev-7", "dev-8", "op-ann"))
    dev7.send(T.BROADCAST, Information(3, b"hi all"), dest=group, message_id=4)
    assert error_of(dev7.take()) == (
        T.BROADCAST,
        ErrorCode.NOT_AUTHORIZED,
        f"dev-7 may not broadcast to {group}",
        4,
    )
    assert room.asked == [] and dev8.take() == [] and op.take() == []
    op.send(T.BROADCAST, Information(5, b"hello"), dest=group, message_id=6)
    assert sends(dev7) == sends(dev8) == [("op-ann", 5)]
    assert room.asked == [("op-ann", group)]
    assert hub.asked == [("dev-7", group, T.BROADCAST, 3), ("op-ann", group, T.BROADCAST, 5)]


def test_a_refused_frame_to_an_offline_user_is_not_stored():
    """
    The policy is asked before the route is resolved: a frame to a user
    who is offline is refused as any other, and not kept; an allowed one
    is kept.
    """
    store = MemoryOfflineStore()
    engine = hub_engine(Hub(), offline_store=store)
    dev, op = connect(engine, "dev-7"), connect(engine, "op-ann")
    failed = []
    engine.transmit_failed.subscribe(lambda *args: failed.append(args[:3]))
    dev.send(T.SEND_CERTAINLY, Information(1, b"x"), dest="dev-8", message_id=1)
    dev.send(T.SEND, Information(2, b"x"), dest="dev-8")
    assert error_of(dev.take())[1:] == (ErrorCode.NOT_AUTHORIZED, "dev-7 may not send to dev-8", 1)
    assert engine.counters[Count.OFFLINE_STORED] == 0
    assert failed == []
    op.send(T.SEND_CERTAINLY, Information(3, b"x"), dest="dev-8", message_id=2)
    assert engine.counters[Count.OFFLINE_STORED] == 1
    assert failed == [("op-ann", "dev-8", T.SEND_CERTAINLY)]
    counts = []
    store.counts("dev-8").addCallback(counts.append)
    assert [messages for messages, _ in counts] == [1]
    assert engine.counters[Count.RELAY_REFUSED] == 2


# -- answers that come later --------------------------------------------------------------------


def test_later_answers_keep_each_senders_order():
    """
    Frame 1 waits for its decision, frame 2 is allowed at once: bob gets
    1 then 2, once 1 is allowed; a refusal in the middle lets what follows
    through.
    """
    later = Later()
    engine = hub_engine(later)
    alice, bob = connect(engine, "alice"), connect(engine, "bob")
    for n in (1, 2, 3):
        alice.send(T.SEND, Information(n, b"x"), dest="bob")
    assert [args[3] for args, _ in later.pending] == [1, 2, 3]  # all asked at once
    (_, first), (_, second), (_, third) = later.pending
    second.callback(True)
    third.callback(True)
    assert sends(bob) == []
    first.callback(True)
    assert sends(bob) == [("alice", 1), ("alice", 2), ("alice", 3)]
    for n in (4, 5):
        alice.send(T.SEND, Information(n, b"x"), dest="bob", message_id=n)
    later.pending[3][1].errback(RelayRefused("not now"))
    later.pending[4][1].callback(True)
    assert sends(bob) == [("alice", 5)]
    assert error_of(alice.take())[1:] == (ErrorCode.NOT_AUTHORIZED, "not now", 4)
    assert engine.budget.used == 0 and engine.relay_gate.waiting(alice.protocol.session) == 0


def test_answers_to_server_wait_for_nothing():
    """
    Frames that are not judged (to the server, answers) are not held
    behind a decision.
    """
    later = Later()
    engine = hub_engine(later)
    alice, bob = connect(engine, "alice"), connect(engine, "bob")
    alice.send(T.SEND, Information(1, b"x"), dest="bob")
    alice.send(T.HEARTBEAT)
    assert [f.message_type for f in alice.take()] == [T.HEARTBEAT]
    assert bob.take() == []


def test_the_pending_bound_pauses_the_sender_until_decisions_come():
    """
    Past --relay-policy-pending frames waiting, the sender is read no
    further; what waits counts in the memory budget; the decisions let it
    read again, and nothing was lost.
    """
    later = Later()
    engine = hub_engine(later, relay_policy_pending=3)
    alice, bob = connect(engine, "alice"), connect(engine, "bob")
    frames = [alice.frame(T.SEND, Information(n, b"x" * n), dest="bob") for n in range(4)]
    for frame in frames[:2]:
        alice.send_raw(frame)
    assert alice.transport.producerState == "producing"
    alice.send_raw(frames[2])
    assert alice.transport.producerState == "paused"
    assert engine.counters[Count.SENDERS_PAUSED] == 1
    # The frames of a read in progress still wait, counted.
    alice.send_raw(frames[3])
    assert engine.budget.used == sum(len(f) + WAITING_COST for f in frames)
    later.pending[0][1].callback(True)
    assert alice.transport.producerState == "paused"  # 3 wait still
    later.pending[1][1].callback(True)
    assert alice.transport.producerState == "producing"  # 2 wait: below the bound
    later.pending[3][1].callback(True)
    later.pending[2][1].callback(True)
    assert sends(bob) == [("alice", n) for n in range(4)]
    assert engine.budget.used == 0


def test_a_frame_that_does_not_fit_the_memory_budget_is_refused_before_it_waits():
    later = Later()
    engine = hub_engine(later, max_buffered_bytes=WAITING_COST + 100)
    alice, bob = connect(engine, "alice"), connect(engine, "bob")
    alice.send(T.REQUEST, Information(1, b"x"), dest="bob", message_id=1)
    alice.send(T.REQUEST, Information(2, b"x"), dest="bob", message_id=2)
    assert error_of(alice.take())[1:] == (
        ErrorCode.RATE_LIMITED,
        "the server's memory budget is spent: no room for a frame to wait for the relay "
        "policy; try later",
        2,
    )
    assert len(later.pending) == 1  # the second was not asked about
    later.pending[0][1].callback(True)
    assert [f.message_id for f in bob.take()] == [1]
    assert engine.budget.used == 0


def test_no_decision_in_time_refuses_and_cancels(logs):
    """
    After --relay-policy-timeout a waiting frame is refused (a request with
    Error(Timeout), a one-way frame counted) and the policy's Deferred is
    cancelled; the frames behind it go on.  One warning for them all.
    """
    later = Later()
    engine = hub_engine(later, relay_policy_timeout=5)
    alice, bob = connect(engine, "alice"), connect(engine, "bob")
    alice.send(T.REQUEST, Information(1, b"?"), dest="bob", message_id=1)
    alice.send(T.SEND, Information(2, b"x"), dest="bob")
    engine.clock.advance(1)
    alice.send(T.SEND, Information(3, b"x"), dest="bob")
    later.pending[2][1].callback(True)
    engine.clock.advance(3.9)
    assert alice.take() == [] and bob.take() == []
    engine.clock.advance(0.1)
    assert error_of(alice.take()) == (
        T.REQUEST,
        ErrorCode.TIMEOUT,
        "the relay policy did not decide within 5 s; not relayed",
        1,
    )
    assert [args[3] for args in later.cancelled] == [1, 2]
    assert sends(bob) == [("alice", 3)]
    assert engine.counters[Count.RELAY_REFUSED] == 2
    (warning,) = logs.esf("relay_policy_timeout")
    assert warning["count"] == 1  # the first at once, the second in the interval's summary
    engine.stop()
    assert [e["count"] for e in logs.esf("relay_policy_timeout")] == [1, 1]
    assert logs.esf("relay_refused") == []
    assert engine.budget.used == 0


def test_a_session_that_ends_cancels_what_waits():
    later = Later()
    engine = hub_engine(later)
    alice, bob = connect(engine, "alice"), connect(engine, "bob")
    alice.send(T.SEND, Information(1, b"x"), dest="bob")
    alice.send(T.REQUEST, Information(2, b"x"), dest="bob", message_id=2)
    assert engine.budget.used > 0
    alice.lose()
    assert [args[3] for args in later.cancelled] == [1, 2]
    assert engine.budget.used == 0
    assert engine.relay_gate.waiting(alice.protocol.session) == 0
    engine.clock.advance(10)
    assert bob.take() == []
    assert engine.counters[Count.RELAY_REFUSED] == 0


def test_a_coroutine_and_a_fired_deferred_answer_too():
    answers = iter([succeed(True), fail(RelayRefused("no")), None])

    @implementer(IRelayPolicy)
    class Mixed:
        def may_relay(self, sender, receiver, message_type, information_type):
            answer = next(answers)
            if answer is not None:
                return answer

            async def decide():
                return True

            return decide()

    engine = hub_engine(Mixed())
    alice, bob = connect(engine, "alice"), connect(engine, "bob")
    for n in (1, 2, 3):
        alice.send(T.SEND, Information(n, b"x"), dest="bob", message_id=n)
    assert sends(bob) == [("alice", 1), ("alice", 3)]
    assert error_of(alice.take())[1:] == (ErrorCode.NOT_AUTHORIZED, "no", 2)


@pytest.mark.parametrize(
    "answer, kind",
    [
        (RuntimeError("the rules table is gone"), "RuntimeError"),
        (None, "TypeError"),
        ("yes", "TypeError"),
    ],
    ids=["raises", "None", "a string"],
)
def test_a_policy_that_fails_refuses_and_is_logged_once_per_interval(logs, answer, kind):
    """
    An exception other than RelayRefused, or an answer that is not a bool,
    refuses the frame with Error(HandlerError) and counts as a handler
    error; the failure is logged with its traceback at most once per
    interval, however many frames fail.
    """
    engine = hub_engine(Answers(answer))
    alice, bob = connect(engine, "alice"), connect(engine, "bob")
    for n in (1, 2, 3):
        alice.send(T.REQUEST, Information(n, b"?"), dest="bob", message_id=n)
    errors = [r.body for r in alice.take()]
    assert [(e.code, e.text) for e in errors] == [
        (ErrorCode.HANDLER_ERROR, f"the relay policy failed ({kind}); not relayed")
    ] * 3
    assert bob.take() == []
    assert engine.counters[Count.HANDLER_ERRORS] == 3
    assert engine.counters[Count.RELAY_REFUSED] == 3
    (first,) = logs.esf("relay_policy_failed")
    assert first["count"] == 1 and isinstance(first["log_failure"].value, Exception)
    engine.clock.advance(10)
    assert [e["count"] for e in logs.esf("relay_policy_failed")] == [1, 2]
    assert logs.esf("relay_refused") == []


# -- how an application provides it ---------------------------------------------------------


def test_one_object_per_role():
    hub = Hub()
    assert Applications.sort([hub]).relay_policy is hub
    with pytest.raises(ValueError, match="IRelayPolicy is provided by both"):
        Applications.sort([hub, Hub()])
    with pytest.raises(ValueError, match="IRelayPolicy"):
        Applications.sort([object()])


def test_memory_server_takes_the_policy():
    """
    esf.testing's MemoryServer builds its engine with engine_for: an
    application's tests see its policy through real clients.
    """
    server = MemoryServer(Hub())
    try:
        dev7 = server.logged_on("dev-7")
        op = server.logged_on("op-ann")
        server.logged_on("dev-8")
        error = server.failure(dev7.send_certainly("dev-8", 1, b"hi"), RequestError)
        assert (error.code, error.text) == (
            ErrorCode.NOT_AUTHORIZED,
            "dev-7 may not send to dev-8",
        )
        server.result(dev7.send_certainly("op-ann", 1, b"hi"))
        server.result(op.send_certainly("dev-8", 1, b"do it"))  # acknowledged
    finally:
        server.close()


def test_twistd_handler_loads_it_with_its_options():
    """
    C{twistd esf --handler test_relay_policy:HUB} makes it the engine's
    relay policy; the two bounds are options.
    """
    from esf.tap import Options, makeService

    options = Options()
    options.parseOptions(
        [
            "--port", "tcp:0:interface=127.0.0.1",
            "--handler", "test_relay_policy:HUB",
            "--relay-policy-pending", "8",
            "--relay-policy-timeout", "2.5",
        ]
    )  # fmt: skip
    engine = makeService(options).engine
    assert engine.relay_gate.policy is HUB
    assert (engine.config.relay_policy_pending, engine.config.relay_policy_timeout) == (8, 2.5)


def test_the_bounds_must_be_positive():
    from twisted.python import usage

    from esf.tap import Options

    for option in (["--relay-policy-pending", "0"], ["--relay-policy-timeout", "0"]):
        with pytest.raises(usage.UsageError):
            Options().parseOptions(option)
    with pytest.raises(ValueError):
        ServerConfig(relay_policy_pending=0)


def test_a_refused_session_is_no_other_sessions_concern():
    """
    One sender's frames waiting for decisions hold no other sender's.
    """
    later = Later()
    engine = hub_engine(later, relay_policy_pending=1)
    alice, carol, bob = (connect(engine, name) for name in ("alice", "carol", "bob"))
    alice.send(T.SEND, Information(1, b"x"), dest="bob")
    carol.send(T.SEND, Information(2, b"x"), dest="bob")
    later.pending[1][1].callback(True)
    assert sends(bob) == [("carol", 2)]
    assert alice.transport.producerState == "paused"
    assert carol.transport.producerState == "producing"
    later.pending[0][1].callback(True)
    assert sends(bob) == [("alice", 1)]


def test_the_metric_counts_refusals():
    from twisted.logger import globalLogPublisher

    from esf.operations._metrics import ServerMetrics, make_registry

    engine = hub_engine(Hub())
    metrics = ServerMetrics(engine, publisher=globalLogPublisher)
    metrics.start()
    try:
        registry = make_registry(metrics, process=False)
        dev7 = connect(engine, "dev-7")
        connect(engine, "dev-8")
        dev7.send(T.SEND, Information(1, b"x"), dest="dev-8")
        assert registry.get_sample_value("esf_relay_refused_total") == 1
    finally:
        metrics.stop()


def test_a_client_sees_the_refusal_as_a_request_error():
    """
    Over a real client connection a Request that is refused fails with
    RequestError(NotAuthorized).
    """
    server = MemoryServer(Hub())
    try:
        dev = server.logged_on("dev-7")
        server.logged_on("dev-8")
        error = server.failure(dev.query("dev-8", 1, b"?"), RequestError)
        assert error.code == ErrorCode.NOT_AUTHORIZED
    finally:
        server.close()


def test_cancel_of_a_deferred_without_canceller_is_quiet(logs):
    """
    A policy's Deferred that knows no canceller, cancelled at the end of
    its session, fails with CancelledError: swallowed, not logged.
    """

    @implementer(IRelayPolicy)
    class Plain:
        def __init__(self):
            self.answers = []

        def may_relay(self, *args):
            d = Deferred()
            self.answers.append(d)
            return d

    plain = Plain()
    engine = hub_engine(plain)
    alice = connect(engine, "alice")
    connect(engine, "bob")
    alice.send(T.SEND, Information(1, b"x"), dest="bob")
    alice.lose()
    assert plain.answers[0].called
    failures = []
    plain.answers[0].addErrback(failures.append)
    assert failures == []  # the CancelledError was the gate's, and swallowed
    assert logs.failures() == []


# -- the session's inline path for runs of Sends ---------------------------------------------


def _run(client, dest, numbers, body=b"x"):
    return b"".join(client.frame(T.SEND, Information(n, body), dest=dest) for n in numbers)


def test_a_run_allowed_at_once_goes_as_it_came():
    """
    A read of Sends to one user, each allowed at once, is forwarded as it
    came (one slice of the read), each frame asked once.
    """
    hub = Hub()
    engine = hub_engine(hub)
    op, dev = connect(engine, "op-ann"), connect(engine, "dev-7")
    data = _run(op, "dev-7", range(50))
    writes = len(dev.transport.io.getvalue())
    op.send_raw(data)
    assert dev.transport.value()[writes:] == data
    assert [a[3] for a in hub.asked] == list(range(50))
    assert engine.counters[RELAYED_MESSAGES[T.SEND]] == 50


def test_a_later_answer_in_the_middle_of_a_run_keeps_the_order():
    """
    In one read, frames 0-2 are allowed at once, frame 3 waits for its
    decision, 4-5 are allowed at once: 0-2 go at once, 3-5 once 3 is
    allowed; each frame asked once.
    """
    asked = []

    @implementer(IRelayPolicy)
    class ThirdWaits:
        def may_relay(self, sender, receiver, message_type, information_type):
            asked.append(information_type)
            if information_type == 3:
                self.waiting = Deferred()
                return self.waiting
            return True

    policy = ThirdWaits()
    engine = hub_engine(policy)
    alice, bob = connect(engine, "alice"), connect(engine, "bob")
    alice.send_raw(_run(alice, "bob", range(6)))
    assert sends(bob) == [("alice", n) for n in range(3)]
    alice.send_raw(_run(alice, "bob", [6, 7]))  # behind 3: wait, judged one by one
    assert sends(bob) == []
    policy.waiting.callback(True)
    assert sends(bob) == [("alice", n) for n in range(3, 8)]
    assert asked == list(range(8))
    assert engine.budget.used == 0


def test_a_send_without_an_information_type_in_a_run_is_refused_alone():
    hub = Hub()
    engine = hub_engine(hub)
    op, dev = connect(engine, "op-ann"), connect(engine, "dev-7")
    short = op.frame(T.SEND, b"\x01", dest="dev-7")
    op.send_raw(_run(op, "dev-7", [0, 1]) + short + _run(op, "dev-7", [2]))
    assert sends(dev) == [("op-ann", 0), ("op-ann", 1), ("op-ann", 2)]
    assert engine.counters[Count.DROPPED] == 1  # the short one, one-way
    assert [a[3] for a in hub.asked] == [0, 1, 2]


def test_interleaved_runs_are_each_judged_with_the_route_cache(monkeypatch):
    """
    The session's cache of a read's routes would let a destination's later
    runs through unasked: with a policy it is not used.
    """
    from esf.server import _session

    monkeypatch.setattr(_session, "_ROUTE_CACHE", True)
    monkeypatch.setattr(_session, "_ROUTE_CACHE_MIN_RUNS", 2)

    @implementer(IRelayPolicy)
    class NotSeven(Hub):
        def may_relay(self, *args):
            super().may_relay(*args)
            return args[3] != 7

    policy = NotSeven()
    engine = hub_engine(policy)
    alice, bob, carol = (connect(engine, name) for name in ("alice", "bob", "carol"))
    data = b"".join(
        alice.frame(T.SEND, Information(n, b"x"), dest="bob" if n % 2 else "carol")
        for n in range(100)
    )
    alice.send_raw(data)
    assert sends(bob) == [("alice", n) for n in range(1, 100, 2) if n != 7]
    assert sends(carol) == [("alice", n) for n in range(0, 100, 2)]
    assert len(policy.asked) == 100


def test_a_run_to_an_offline_user_is_asked_once_per_frame():
    hub = Hub()
    store = MemoryOfflineStore()
    engine = hub_engine(hub, offline_store=store)
    op = connect(engine, "op-ann")
    op.send_raw(_run(op, "dev-9", range(3)))
    assert [a[3] for a in hub.asked] == [0, 1, 2]
    assert engine.counters[Count.OFFLINE_STORED] == 3


# -- across nodes --------------------------------------------------------------------------------


@pytest.fixture
def hub_nodes(redis_server):
    from test_cluster_engine import Node

    nodes = [Node(redis_server, n, relay_policy=Hub(), config=ServerConfig()) for n in "ab"]
    nodes[0].engine.group_manager = Room("dev-7", "dev-8", "op-ann")
    nodes[1].engine.group_manager = Room("dev-7", "dev-8", "op-ann")
    yield nodes
    for node in nodes:
        node.engine.stop()
        pytest_twisted.blockon(Deferred.fromCoroutine(node.presence.stop()))


@pytest_twisted.ensureDeferred
async def test_refused_on_the_senders_node(hub_nodes):
    """
    Two engines on one real redis-server: a device on node a may not send
    to a device on node b, and is answered Error(NotAuthorized) by a; b is
    told nothing, its policy never asked.  An operator's message goes
    across, asked on its node only.  A Broadcast across nodes likewise.
    """
    from test_cluster import eventually
    from test_cluster_engine import joined

    a, b = hub_nodes
    await joined(a, b)
    dev7 = await a.logon("dev-7")
    op = await a.logon("op-ann")
    dev8 = await b.logon("dev-8")
    await eventually(lambda: a.engine.user_manager.is_user_online("dev-8"))
    dev7.send(T.REQUEST, Information(1, b"?"), dest="dev-8", message_id=4)
    dev7.send(T.SEND, Information(2, b"x"), dest="dev-8")
    dev7.send(T.BROADCAST, Information(3, b"all"), dest="room", message_id=5)
    replies = await eventually(dev7.take)
    assert [(r.message_type, r.body.code, r.body.text, r.message_id) for r in replies] == [
        (T.ERROR, ErrorCode.NOT_AUTHORIZED, "dev-7 may not send to dev-8", 4),
        (T.ERROR, ErrorCode.NOT_AUTHORIZED, "dev-7 may not broadcast to room", 5),
    ]
    op.send(T.SEND, Information(6, b"go"), dest="dev-8")
    [got] = await eventually(dev8.take)
    assert (got.message_type, got.user_id, got.body.information_type) == (T.SEND, "op-ann", 6)
    assert b.engine.relay_gate.policy.asked == []
    assert [q[1:] for q in a.engine.relay_gate.policy.asked] == [
        ("dev-8", T.REQUEST, 1),
        ("dev-8", T.SEND, 2),
        ("room", T.BROADCAST, 3),
        ("dev-8", T.SEND, 6),
    ]
    assert a.engine.counters[Count.RELAY_REFUSED] == 3


# -- the gate alone -----------------------------------------------------------------------------


class FakeGateEngine:
    """
    Exactly what L{esf.server._relay_policy.GateEngine} lists, with a
    relay that records what it was given.
    """

    def __init__(self, **settings):
        import collections

        from esf.server._budget import MemoryBudget
        from esf.server._output import OutputBatch

        self.config = ServerConfig(**settings)
        self.clock = task.Clock()
        self.counters = collections.Counter()
        self.budget = MemoryBudget(self.config.max_buffered_bytes)
        self.batch = OutputBatch()
        self.relay = self
        self.relayed = []

    def allowed(self, session, frame):
        self.relayed.append(frame.message_id)

    def forward(self, sender, targets, raw, frames):
        raise AssertionError("no run here")

    def count(self, message_type, frames, size):
        raise AssertionError("no run here")


class FakeSender:
    """
    What the gate touches of a session.
    """

    def __init__(self):
        from esf.server._config import SessionPhase

        self.user_id = "alice"
        self.state = SessionPhase.LOGGED_ON
        self.errors = []
        self.held = 0
        self.charged = 0

    def error(self, frame, code, text):
        self.errors.append((frame.message_id, code, text))

    def charge(self, cost):
        self.charged += cost
        return True

    def over_budget(self):
        return False

    def may_log(self):
        return True

    def hold_back(self):
        self.held += 1

    def let_go(self):
        self.held -= 1


def test_the_gate_alone_keeps_order_and_bounds():
    from esf.wire import FrameDecoder, WireConfig, encode_frame

    engine = FakeGateEngine(relay_policy_pending=2, relay_policy_timeout=3)
    later = Later()
    gate = RelayGate(engine, later)
    session = FakeSender()
    wire = WireConfig()
    frames = [
        FrameDecoder(wire).feed(
            encode_frame(
                wire,
                T.REQUEST,
                Information(n, b"?").encode(),
                message_id=n,
                user_id="alice",
                dest_user_id="bob#5",
            )
        )[0]
        for n in (1, 2, 3)
    ]
    for frame in frames:
        gate.judge(session, frame, engine.allowed)
    assert [args for args, _ in later.pending] == [
        ("alice", "bob", T.REQUEST, n) for n in (1, 2, 3)
    ]
    assert session.held == 1 and gate.waiting(session) == 3
    later.pending[1][1].callback(True)
    later.pending[0][1].callback(False)
    assert engine.relayed == [2] and session.held == 0
    assert session.errors == [(1, ErrorCode.NOT_AUTHORIZED, "alice may not send to bob")]
    assert session.charged == 1  # the refusal, not the frame allowed
    engine.clock.advance(3)
    assert session.errors[-1][:2] == (3, ErrorCode.TIMEOUT)
    assert later.cancelled == [("alice", "bob", T.REQUEST, 3)]
    assert engine.budget.used == 0 and gate.waiting(session) == 0
    assert engine.clock.getDelayedCalls() != []  # the timeouts' log interval
    gate.stop()
    assert engine.clock.getDelayedCalls() == []
