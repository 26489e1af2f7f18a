"""
The relay's fast paths keep the relay's guarantees: order per sender and
receiver when a read holds frames for many receivers (each destination
looked up once per read), however the bytes are cut; a receiver that is
behind is never written past its bounds; a route that changes in the
middle of a read is looked up again.  Broadcasts, delivered without a
Deferred when the group manager answers at once, keep the same order and
bounds.  Each test runs with the read's route cache and without it (on
PyPy it is off).
"""

from __future__ import annotations

import itertools

import pytest
from _helpers import connect, make_engine
from test_messages import Groups

from esf import MessageType
from esf.server import _session
from esf.server._counters import RELAYED_MESSAGES, Count
from esf.wire import Information, KickOut

# Every test here runs with the compiled loops and with the pure-Python code
# alone (compiled_loops, tests/conftest.py).
pytestmark = pytest.mark.usefixtures("compiled_loops")

T = MessageType


@pytest.fixture(autouse=True, params=[True, False], ids=["route-cache", "no-route-cache"])
def route_cache(request, monkeypatch):
    """
    Every test with a read's routes remembered (CPython's way) and without
    (PyPy's): L{esf.server._session._ROUTE_CACHE}.
    """
    monkeypatch.setattr(_session, "_ROUTE_CACHE", request.param)
    monkeypatch.setattr(_session, "_ROUTE_CACHE_MIN_RUNS", 2)


def interleaved(client, receivers, count, start=0):
    """
    C{count} Sends from C{client} cycling over C{receivers}; each one's
    information type is its sequence number, its payload the receiver's
    name and a length that varies (no two consecutive headers alike).
    """
    frames = []
    for n, dest in zip(range(start, start + count), itertools.cycle(receivers)):
        body = Information(n, dest.encode() * (1 + n % 3))
        frames.append(client.frame(T.SEND, body, dest=dest))
    return frames


def received(client):
    """
    What C{client} received: (sender, sequence number) in arrival order.
    """
    frames = client.take()
    return [(f.user_id, f.body.information_type) for f in frames if f.message_type == T.SEND]


@pytest.mark.parametrize("chunk", [None, 1, 7, 4096])
def test_order_per_sender_and_receiver_across_interleaved_runs(chunk):
    """
    Two senders each cycle over three receivers (one with two devices), and
    send to one receiver twice in a row now and then; whether each read
    holds all of a sender's frames, or the bytes come one at a time, every
    device receives every frame addressed to it once, in order per sender.
    """
    engine = make_engine()
    alice, carol = connect(engine, "alice"), connect(engine, "carol")
    bob, bob2 = connect(engine, "bob", 0), connect(engine, "bob", 1)
    dave, erin = connect(engine, "dave"), connect(engine, "erin")
    names = ["bob", "dave", "erin", "erin"]
    streams = {
        alice: b"".join(interleaved(alice, names, 200)),
        carol: b"".join(interleaved(carol, names[::-1], 200, start=1000)),
    }
    for sender, data in streams.items():
        step = chunk or len(data)
        for offset in range(0, len(data), step):
            sender.send_raw(data[offset : offset + step])
    expected = {name: [] for name in ("bob", "dave", "erin")}
    for sender, names_ in ((alice, names), (carol, names[::-1])):
        start = 0 if sender is alice else 1000
        for n, dest in zip(range(start, start + 200), itertools.cycle(names_)):
            expected[dest].append((sender.user_id, n))
    for client, name in ((bob, "bob"), (bob2, "bob"), (dave, "dave"), (erin, "erin")):
        assert received(client) == expected[name]
    assert engine.counters[RELAYED_MESSAGES[T.SEND]] == 400
    assert engine.budget.used == 0


def test_a_receiver_behind_among_interleaved_runs_is_queued_within_its_bounds():
    """
    A read interleaves frames for bob (who reads) and mallory (whose
    transport is paused): bob gets all of his; every frame for mallory is
    counted in her backlog, and in the server's memory budget, until it
    drains; none is written past her bound.
    """
    engine = make_engine(max_output_buffer=16 * 1024, push_back_timeout=0)
    alice, bob, mallory = (connect(engine, name) for name in ("alice", "bob", "mallory"))
    mallory.protocol.pauseProducing()
    frames = interleaved(alice, ["bob", "mallory"], 2000)
    alice.send_raw(b"".join(frames))
    assert received(bob) == [("alice", n) for n in range(0, 2000, 2)]
    to_mallory = frames[1::2]
    fits = queued_count(to_mallory, 16 * 1024)
    assert 0 < fits < len(to_mallory)
    assert engine.budget.used == sum(len(f) for f in to_mallory[:fits])
    assert engine.counters[Count.RECEIVER_BEHIND] == len(to_mallory) - fits
    mallory.protocol.resumeProducing()
    assert engine.budget.used == 0
    assert [n for _, n in received(mallory)] == list(range(1, 2000, 2))[:fits]


def queued_count(frames, size):
    """
    How many of C{frames}, from the first, fit C{size} bytes.
    """
    total = count = 0
    for frame in frames:
        if total + len(frame) > size:
            break
        total += len(frame)
        count += 1
    return count


def test_a_route_that_changes_in_a_read_is_looked_up_again():
    """
    In one read, an administrator relays a Send to bob, kicks bob, and
    relays another: the first reaches bob before his end, the second is
    not written into his ended session but reported as to a user offline.
    """
    engine = make_engine(admins=["alice"])
    alice, bob = connect(engine, "alice"), connect(engine, "bob")
    alice.send_raw(
        alice.frame(T.SEND, Information(1, b"first"), dest="bob")
        + alice.frame(T.SEND, Information(2, b"again"), dest="bob")
        + alice.frame(T.KICK_OUT, KickOut("bye"), dest="bob", message_id=7)
        + alice.frame(T.SEND, Information(3, b"late"), dest="bob", message_id=8)
    )
    assert received(bob) == [("alice", 1), ("alice", 2)]
    answers = [(f.message_type, f.message_id) for f in alice.take()]
    assert answers == [(T.KICK_OUT, 7), (T.ERROR, 8)]
    assert engine.counters[Count.TRANSMIT_FAILED] == 1


def broadcast_engine(members, **settings):
    engine = make_engine(**settings)
    engine.group_manager = Groups({"team": members})
    return engine


@pytest.mark.parametrize("chunk", [None, 1])
def test_broadcasts_arrive_in_order_at_every_member_however_the_bytes_are_cut(chunk):
    """
    Broadcasts to a group, interleaved with Sends to one of its members, in
    one read or a byte at a time: every member's devices but the sender's
    get each Broadcast once, in order with the Sends, and each Broadcast
    with a MessageID is acknowledged.
    """
    engine = broadcast_engine(["alice", "bob", "carol", "nobody"])
    alice, alice2 = connect(engine, "alice", 0), connect(engine, "alice", 1)
    bob, carol = connect(engine, "bob"), connect(engine, "carol")
    data = b""
    for n in range(30):
        data += alice.frame(T.BROADCAST, Information(n, b"all"), dest="team", message_id=n + 1)
        data += alice.frame(T.SEND, Information(100 + n, b"bob"), dest="bob")
    for offset in range(0, len(data), chunk or len(data)):
        alice.send_raw(data[offset : offset + (chunk or len(data))])
    got = [(f.message_type, f.body.information_type) for f in bob.take()]
    assert got == [p for n in range(30) for p in ((T.BROADCAST, n), (T.SEND, 100 + n))]
    assert [f.body.information_type for f in carol.take()] == list(range(30))
    assert alice2.take() == []
    answers = [f for f in alice.take() if f.message_type != T.MY_DEVICE_ONLINE]
    assert [(f.message_type, f.message_id) for f in answers] == [(T.ACK, n + 1) for n in range(30)]


def test_a_broadcast_to_a_group_with_a_stalled_member_reaches_the_others():
    """
    One member of the group does not read: once its push back is over, the
    broadcasts go on to the others without delay, what does not fit the
    stalled member's bound is counted, and the sender is not slowed down
    for longer than the push back.  A run of Broadcasts in one read that
    the stalled member has no room for whole is queued for her as far as
    it fits, frame by frame, as the frames one by one would be.
    """
    engine = broadcast_engine(
        ["alice", "bob", "mallory"], max_output_buffer=16 * 1024, push_back_timeout=0
    )
    alice, bob, mallory = (connect(engine, name) for name in ("alice", "bob", "mallory"))
    mallory.protocol.pauseProducing()
    # Past half her bound: mallory is backed up, and stalled at once.
    big = alice.frame(T.BROADCAST, Information(999, bytes(9000)), dest="team")
    alice.send_raw(big)
    frames = [
        alice.frame(T.BROADCAST, Information(n, bytes(200)), dest="team") for n in range(150)
    ]
    alice.send_raw(b"".join(frames))
    assert [f.body.information_type for f in bob.take()] == [999, *range(150)]
    fits = queued_count(frames, 16 * 1024 - len(big))
    assert 0 < fits < 150
    assert engine.counters[Count.RECEIVER_BEHIND] == 150 - fits
    assert engine.counters["broadcasts"] == 151
    assert engine.budget.used == len(big) + sum(len(f) for f in frames[:fits])
    # Not held back: mallory is stalled, and what she refused is within
    # alice's allowance.
    assert alice.transport.producerState != "paused"
    mallory.protocol.resumeProducing()
    assert [f.body.information_type for f in mallory.take()] == [999, *range(fits)]
    assert engine.budget.used == 0


def test_a_group_manager_whose_members_are_not_user_ids_fails_the_broadcast_alone():
    """
    A member that is not a user ID (here an int) is the group manager's
    failure: the members before it have the Broadcast, the sender gets
    HandlerError, and the read goes on with the next frame.
    """
    engine = broadcast_engine(["alice", "bob", 5])
    alice, bob = connect(engine, "alice"), connect(engine, "bob")
    alice.send_raw(
        alice.frame(T.BROADCAST, Information(1, b"x"), dest="team", message_id=3)
        + alice.frame(T.SEND, Information(2, b"y"), dest="bob")
    )
    assert [(f.message_type, f.body.information_type) for f in bob.take()] == [
        (T.BROADCAST, 1),
        (T.SEND, 2),
    ]
    (error,) = alice.take()
    assert (error.message_type, error.message_id) == (T.ERROR, 3)
    assert error.body.code.name == "HANDLER_ERROR"
    assert engine.counters[Count.HANDLER_ERRORS] == 1


def test_on_pypy_reads_of_sends_are_taken_in_one_loop(compiled_loops, monkeypatch):
    """
    As PyPy runs the Python loop, a read of Sends to receivers met before
    is decoded and relayed in one loop (take_sends): the decoder's runs are
    not made for it; a frame of another kind ends that loop, and the
    decoder's own takes the rest of the read, in order.  Elsewhere every
    read takes the decoder's.
    """
    from esf.wire import FrameDecoder

    engine = make_engine()
    alice, bob, carol = (connect(engine, name) for name in ("alice", "bob", "carol"))
    alice.send_raw(b"".join(interleaved(alice, ["bob", "carol"], 4)))  # (IDs met)
    decoded = []
    feed_runs = FrameDecoder.feed_runs

    def spied(self, data, *types):
        decoded.append(len(data))
        return feed_runs(self, data, *types)

    monkeypatch.setattr(FrameDecoder, "feed_runs", spied)
    frames = interleaved(alice, ["bob", "carol", "carol"], 30, start=4)
    sends = b"".join(frames)
    cut = len(b"".join(frames[:15])) + 7  # (in the middle of a frame's header)
    alice.send_raw(sends[:cut])
    alice.send_raw(sends[cut:])
    ping = alice.frame(T.GET_MY_IPE, b"", dest="_0")
    more = b"".join(interleaved(alice, ["bob", "carol"], 6, start=34))
    alice.send_raw(sends + ping + more)  # (one read)
    if compiled_loops == "pypy":
        # The decoder's loop took only the end of the first read (a frame
        # cut off), what completed it (its header's rest, then its body),
        # and the last read's rest from the ping on.
        assert decoded == [7, 36 - 7, len(frames[15]) - 36, len(ping + more)]
    else:
        assert decoded == [cut, len(sends) - cut, len(sends + ping + more)]
    expected = {"bob": [], "carol": []}
    for start, count, names in ((0, 4, ["bob", "carol"]), (4, 30, ["bob", "carol", "carol"])):
        for n, dest in zip(range(start, start + count), itertools.cycle(names)):
            expected[dest].append(("alice", n))
    for n, dest in zip(range(4, 34), itertools.cycle(["bob", "carol", "carol"])):
        expected[dest].append(("alice", n))
    for n, dest in zip(range(34, 40), itertools.cycle(["bob", "carol"])):
        expected[dest].append(("alice", n))
    assert received(bob) == expected["bob"] and received(carol) == expected["carol"]
    assert [f.message_type for f in alice.take()] == [T.GET_MY_IPE]
    assert engine.counters[RELAYED_MESSAGES[T.SEND]] == 4 + 30 + 30 + 6
    assert engine.budget.used == 0
