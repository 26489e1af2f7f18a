"""
A run of Broadcasts from one read to one group is taken whole (the group
manager asked once, one slice per member), and ends exactly as its frames
one by one would: the same frames at every member in the same order, the
same answers to the sender, the same counts, whether its bytes come in one
read or a byte at a time; and where it cannot be taken whole (a body too
short, a work budget too small, a relay policy), frame by frame.
"""

from __future__ import annotations

import pytest
from _helpers import connect, make_engine
from test_messages import Groups

from esf import ErrorCode, MessageType
from esf.server._counters import Count
from esf.wire import Information

# Every test here runs with the compiled loops and with the pure-Python code
# alone (compiled_loops, tests/conftest.py).
pytestmark = pytest.mark.usefixtures("compiled_loops")

T = MessageType


class Counted(Groups):
    """
    L{Groups} that counts how often it is asked.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked = 0

    def get_members(self, group_id):
        self.asked += 1
        return super().get_members(group_id)


class Failing(Counted):
    def get_members(self, group_id):
        raise RuntimeError("the group store is down")


def run(stream_of, groups, chunk=None, **settings):
    """
    Log alice, bob (two devices) and carol on, send what C{stream_of(alice)}
    gives in one read (or C{chunk} bytes at a time), and return what each
    client got: (type, MessageID, information type or error code) per frame,
    with the engine and its group manager.
    """
    engine = make_engine(**settings)
    engine.group_manager = groups
    alice = connect(engine, "alice")
    bob, bob2, carol = (
        connect(engine, "bob", 0),
        connect(engine, "bob", 1),
        connect(engine, "carol"),
    )
    data = stream_of(alice)
    step = chunk or len(data)
    for offset in range(0, len(data), step):
        alice.send_raw(data[offset : offset + step])

    def got(client):
        out = []
        for f in client.take():
            if f.message_type == T.MY_DEVICE_ONLINE:
                continue
            body = f.body
            key = getattr(body, "information_type", getattr(body, "code", None))
            out.append((f.message_type, f.message_id, key))
        return out

    return [got(c) for c in (alice, bob, bob2, carol)], engine


def broadcasts(n, *, ids=True, body=b"hello", first=0):
    def stream(alice):
        return b"".join(
            alice.frame(
                T.BROADCAST,
                Information(first + i, body),
                dest="team",
                message_id=first + i + 1 if ids else 0,
            )
            for i in range(n)
        )

    return stream


TEAM = {"team": ["alice", "bob", "carol"]}


@pytest.mark.parametrize("ids", [True, False])
def test_a_run_is_asked_for_once_and_ends_as_its_frames_one_by_one(ids):
    """
    200 Broadcasts in one read: the group manager is asked once (not 200
    times), and every member's device and the sender get what a byte at a
    time (each frame alone) gives them: every Broadcast in order, and an
    Ack for each one with a MessageID.
    """
    groups = Counted(TEAM)
    whole, engine = run(broadcasts(200, ids=ids), groups)
    assert groups.asked == 1
    alone, other = run(broadcasts(200, ids=ids), Counted(TEAM), chunk=1)
    assert whole == alone
    alice, bob, bob2, carol = whole
    assert bob == bob2 == carol == [(T.BROADCAST, n + 1 if ids else 0, n) for n in range(200)]
    assert alice == ([(T.ACK, n + 1, n) for n in range(200)] if ids else [])
    for key in ("broadcasts", "broadcast_deliveries", "broadcast_fanout.le_10"):
        assert engine.counters[key] == other.counters[key] > 0, key
    assert engine.counters["broadcast_deliveries"] == 600


def test_a_run_that_waits_for_its_group_manager_waits_whole():
    """
    A group manager that answers later: the run waits for its answers as
    one frame would, a Send after it in the same read is not held up, and
    the answers deliver the whole run, in order, with its Acks.
    """
    engine = make_engine()
    groups = engine.group_manager = Counted(TEAM, mode="pending")
    alice, bob = connect(engine, "alice"), connect(engine, "bob")
    alice.send_raw(broadcasts(5)(alice) + alice.frame(T.SEND, Information(99, b"x"), dest="bob"))
    assert [(f.message_type, f.body.information_type) for f in bob.take()] == [(T.SEND, 99)]
    ((d, allowed),) = groups.pending
    groups.pending.clear()
    d.callback(allowed)
    ((d, members),) = groups.pending
    d.callback(members)
    assert groups.asked == 1
    assert [f.body.information_type for f in bob.take()] == list(range(5))
    acks = [(f.message_type, f.message_id) for f in alice.take()]
    assert acks[-5:] == [(T.ACK, n + 1) for n in range(5)]


def test_a_short_body_in_a_run_is_refused_alone():
    """
    A Broadcast whose body cannot hold an information type, in the middle
    of a run: it alone is refused (BadRequest), the others are delivered.
    """

    def stream(alice):
        bad = alice.frame(T.BROADCAST, b"\x01", dest="team", message_id=50)
        return broadcasts(3)(alice) + bad + broadcasts(3, first=3)(alice)

    whole, _ = run(stream, Counted(TEAM))
    alone, _ = run(stream, Counted(TEAM), chunk=1)
    assert whole == alone
    alice, bob, _, _ = whole
    assert (T.ERROR, 50, ErrorCode.BAD_REQUEST) in alice
    assert [key for _, _, key in bob] == list(range(6))


def test_a_run_past_the_work_budget_is_refused_from_where_the_budget_ends():
    """
    25 Broadcasts in one read with a budget of 10 units: the first 10 go
    out and the other 15 are refused RateLimited, as one by one.
    """
    whole, _ = run(broadcasts(25), Counted(TEAM), work_burst=10)
    alone, _ = run(broadcasts(25), Counted(TEAM), work_burst=10, chunk=1)
    assert whole == alone
    alice, bob, _, _ = whole
    assert [key for _, _, key in bob] == list(range(10))
    assert alice[:10] == [(T.ACK, n + 1, n) for n in range(10)]
    assert alice[10:] == [(T.ERROR, n + 1, ErrorCode.RATE_LIMITED) for n in range(10, 25)]


def test_a_run_the_sender_may_not_broadcast_is_refused_frame_by_frame():
    """
    A sender outside the group: each frame of the run with a MessageID is
    answered NotAuthorized, nothing is delivered.
    """
    groups = Counted({"team": ["bob", "carol"]})
    (alice, bob, _, carol), _ = run(broadcasts(4), groups)
    assert alice == [(T.ERROR, n + 1, ErrorCode.NOT_AUTHORIZED) for n in range(4)]
    assert bob == carol == []


def test_a_group_manager_that_fails_for_a_run_is_logged_once(logs):
    """
    The group manager raises while asked about a run of 30: it was asked
    once, so its failure is logged and counted once, and each of the 30 is
    answered HandlerError.
    """
    (alice, bob, _, _), engine = run(broadcasts(30), Failing(TEAM))
    assert alice == [(T.ERROR, n + 1, ErrorCode.HANDLER_ERROR) for n in range(30)]
    assert bob == []
    assert engine.counters[Count.HANDLER_ERRORS] == 1
    assert len(logs.failures()) == 1


def test_a_run_of_sends_to_a_stalled_receiver_is_queued_as_far_as_it_fits():
    """
    A run of Sends to a receiver that is stalled and has less room than
    the run: the frames that fit are queued (not none), the rest refused
    and counted, as one by one.
    """
    engine = make_engine(max_output_buffer=16 * 1024, push_back_timeout=0)
    alice, mallory = connect(engine, "alice"), connect(engine, "mallory")
    mallory.protocol.pauseProducing()
    alice.send_raw(alice.frame(T.SEND, Information(0, bytes(9000)), dest="mallory"))
    frames = [
        alice.frame(T.SEND, Information(n, bytes(200)), dest="mallory") for n in range(1, 80)
    ]
    alice.send_raw(b"".join(frames))
    room = 16 * 1024 - 9000 - 36 - 4
    fits = room // len(frames[0])
    assert 0 < fits < len(frames)
    assert engine.counters[Count.RECEIVER_BEHIND] == len(frames) - fits
    mallory.protocol.resumeProducing()
    got = [f.body.information_type for f in mallory.take() if f.message_type == T.SEND]
    assert got == list(range(fits + 1))
    assert engine.budget.used == 0
