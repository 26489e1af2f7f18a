"""
Hardening against one ordinary account: forged answers, the cost of each
request, memory and output bounds, log floods (issue 11).
"""

from __future__ import annotations

import pytest

from _helpers import connect, make_engine
from esf import ClientType, ErrorCode, MessageType
from esf._counters import Count
from esf.wire import Ack, BlobFragment, Empty, Error, Information

# -- 1. answers only from whom they were asked, to the device that asked ----

ANSWER_CASES = [
    (MessageType.REQUEST, Information(5, b"q"), MessageType.RESPONSE, Information(5, b"a")),
    (MessageType.SEND_CERTAINLY, Information(5, b"s"), MessageType.ACK, Ack(5)),
    (MessageType.PING_BY_SERVER, Empty(), MessageType.PING_ACK, Empty()),
    (MessageType.BLOB, BlobFragment(5, 1, 0, True, b"b"), MessageType.ACK, Ack(5)),
    (
        MessageType.REQUEST,
        Information(5, b"q"),
        MessageType.ERROR,
        Error(MessageType.REQUEST, ErrorCode.HANDLER_ERROR, "no"),
    ),
]


@pytest.mark.parametrize(
    "request_type, request_body, answer_type, answer",
    ANSWER_CASES,
    ids=[f"{r.name}-{a.name}" for r, _, a, _ in ANSWER_CASES],
)
def test_answer_reaches_only_the_asking_device(request_type, request_body, answer_type, answer):
    """
    A request alice's phone relays to bob is answered by bob to alice (as
    an older client addresses it) or to alice#kind: the answer reaches the
    phone that asked, not alice's other device, exactly once.
    """
    engine = make_engine()
    phone = connect(engine, "alice", ClientType.ANDROID)
    pc = connect(engine, "alice", ClientType.DOTNET)
    bob = connect(engine, "bob")
    phone.take()
    phone.send(request_type, request_body, message_id=7, dest="bob")
    (asked,) = bob.take()
    assert (asked.message_type, asked.message_id) == (request_type, 7)
    sent = bob.send(answer_type, answer, message_id=7, dest="alice")
    assert [r.raw for r in phone.take()] == [sent]
    assert pc.take() == []
    # Used up: the same answer again is dropped and counted.
    bob.send(answer_type, answer, message_id=7, dest="alice#5")
    assert phone.take() == pc.take() == []
    assert engine.counters[Count.UNSOLICITED_ANSWERS] == 1


@pytest.mark.parametrize(
    "answer_type, answer",
    [(a, b) for _, _, a, b in ANSWER_CASES[:3]] + [(ANSWER_CASES[4][2], ANSWER_CASES[4][3])],
    ids=["RESPONSE", "ACK", "PING_ACK", "ERROR"],
)
def test_forged_answer_is_dropped(answer_type, answer):
    """
    mallory answers a request alice sent bob, with bob's MessageID: alice
    receives nothing from mallory; bob's real answer still arrives.
    """
    engine = make_engine()
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    mallory = connect(engine, "mallory")
    alice.send(MessageType.REQUEST, Information(5, b"q"), message_id=2, dest="bob")
    alice.send(MessageType.SEND_CERTAINLY, Information(5, b"s"), message_id=3, dest="bob")
    alice.send(MessageType.PING_BY_SERVER, Empty(), message_id=4, dest="bob")
    bob.take()
    for message_id in (2, 3, 4, 5):
        mallory.send(answer_type, answer, message_id=message_id, dest="alice")
    assert alice.take() == []
    assert mallory.take() == []
    assert engine.counters[Count.UNSOLICITED_ANSWERS] == 4
    sent = bob.send(MessageType.RESPONSE, Information(5, b"a"), message_id=2, dest="alice")
    assert [r.raw for r in alice.take()] == [sent]


def test_answer_of_the_wrong_type_is_dropped():
    """
    A PingAck does not answer a Request, nor a Response a SendCertainly.
    """
    engine = make_engine()
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    alice.send(MessageType.REQUEST, Information(5, b"q"), message_id=2, dest="bob")
    alice.send(MessageType.SEND_CERTAINLY, Information(5, b"s"), message_id=3, dest="bob")
    bob.send(MessageType.PING_ACK, Empty(), message_id=2, dest="alice")
    bob.send(MessageType.RESPONSE, Information(5, b"a"), message_id=3, dest="alice")
    assert alice.take() == []
    assert engine.counters[Count.UNSOLICITED_ANSWERS] == 2


def test_answer_after_the_query_timeout_is_dropped():
    """
    The server remembers a relayed request for the query timeout, as long
    as the asker waits.
    """
    engine = make_engine(query_timeout=5)
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    alice.send(MessageType.REQUEST, Information(5, b"q"), message_id=2, dest="bob")
    engine.clock.advance(5)
    bob.send(MessageType.RESPONSE, Information(5, b"a"), message_id=2, dest="alice")
    assert alice.take() == []
    assert engine.counters[Count.UNSOLICITED_ANSWERS] == 1


def test_unanswered_requests_are_bounded():
    """
    A session may wait for C{max_unanswered_requests} answers; one more
    request is refused RateLimited, not remembered; as old ones expire
    there is room again.
    """
    engine = make_engine(max_unanswered_requests=3, query_timeout=5)
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    for message_id in (2, 3, 4):
        alice.send(MessageType.REQUEST, Information(5, b"q"), message_id=message_id, dest="bob")
    alice.send(MessageType.REQUEST, Information(5, b"q"), message_id=5, dest="bob")
    (refused,) = alice.take()
    assert refused.message_type == MessageType.ERROR
    assert refused.body.code == ErrorCode.RATE_LIMITED
    assert len(bob.take()) == 3
    assert len(engine_asked(engine, "alice")) == 3
    engine.clock.advance(5)
    alice.send(MessageType.REQUEST, Information(5, b"q"), message_id=6, dest="bob")
    assert alice.take() == []
    assert len(bob.take()) == 1
    assert len(engine_asked(engine, "alice")) == 1


def engine_asked(engine, user_id):
    (session,) = [s for s in engine.sessions if s.user_id == user_id]
    return session.asked


def test_one_way_messages_are_not_remembered():
    """
    A Send (even with a MessageID) or a Blob without one asks for no
    answer: nothing is remembered.
    """
    engine = make_engine()
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    alice.send(MessageType.SEND, Information(5, b"s"), message_id=2, dest="bob")
    alice.send(MessageType.BLOB, BlobFragment(5, 1, 0, True, b"b"), dest="bob")
    assert len(bob.take()) == 2
    assert not engine_asked(engine, "alice")
