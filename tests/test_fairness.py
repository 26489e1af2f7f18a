"""
A fair relay: what one receiver does (not reading, reading slowly) does not
hold up its senders' traffic to others, and what is not delivered because a
receiver is backed up is never silent.

The engine-level tests run on a L{task.Clock}; a sender's side of its
connection is modelled by L{Link}, which hands the server 64 KiB at a time
while the server reads it (as a TCP transport does).  The live test runs a
real C{twistd esf} on 127.0.0.1 and measures latency on the wall clock.
"""

from __future__ import annotations

import socket
import statistics
import struct
import time

import pytest
import rawclient as rc
from _helpers import connect
from test_messages import Groups
from twisted.internet import task

from esf import ErrorCode, MessageType, ServerConfig, ServerEngine
from esf.server._counters import Count
from esf.wire import Ack, BlobFragment, Empty, Information

T = MessageType
MIB = 1024 * 1024
READ = 64 * 1024  # what a TCP transport reads at once
STEP = 0.005  # clock step of the simulations


def make_engine(groups=None, **settings):
    engine = ServerEngine(ServerConfig(**settings), clock=task.Clock(), group_manager=groups)
    engine.start()
    return engine


class Link:
    """
    What a client has written and the server has not read yet: handed to
    the server L{READ} bytes at a time, only while the server reads the
    client (its transport is not paused).
    """

    def __init__(self, client):
        self.client = client
        self.pending = bytearray()
        #: When each marked frame was written: mark -> clock time.
        self.written = {}

    def write(self, frame: bytes, mark=None) -> None:
        self.pending += frame
        if mark is not None:
            self.written[mark] = self.client.engine.clock.seconds()

    def pump(self) -> None:
        while self.pending and self.client.transport.producerState != "paused":
            chunk = bytes(self.pending[:READ])
            del self.pending[:READ]
            self.client.send_raw(chunk)


def latencies(link: Link, receiver, arrived: dict) -> None:
    """
    Note when each marked frame (its information type is its mark) reached
    C{receiver}.
    """
    now = link.client.engine.clock.seconds()
    for frame in receiver.take():
        if frame.message_type in (T.SEND, T.BROADCAST):
            arrived.setdefault(frame.body.information_type, now)


def session(engine, user_id):
    (found,) = [s for s in engine.sessions if s.user_id == user_id]
    return found


def test_a_receiver_that_does_not_read_does_not_hold_up_its_senders_traffic_to_others():
    """
    The filed case: alice sends mallory (who never reads) a 4 MiB burst of
    60 KB Sends, then bob a small Send every 50 ms for 8 s.  Every message
    reaches bob within 100 ms of alice writing it; mallory is ended with
    ChannelCacheOverflow after the drain timeout all the same, and what
    did not reach him is counted.
    """
    engine = make_engine()  # the defaults: 2 MiB bound, 10 s drain timeout
    alice, bob, mallory = (connect(engine, name) for name in ("alice", "bob", "mallory"))
    mallory.protocol.pauseProducing()  # his buffers are full: he never reads
    link = Link(alice)
    burst = alice.frame(T.SEND, Information(-1, bytes(60_000)), dest="mallory")
    for _ in range(4 * MIB // len(burst) + 1):
        link.write(burst)
    arrived = {}
    for n in range(160):
        link.write(alice.frame(T.SEND, Information(n, b"hi bob"), dest="bob"), mark=n)
        for _ in range(10):  # 50 ms
            link.pump()
            latencies(link, bob, arrived)
            engine.clock.advance(STEP)
    link.pump()
    latencies(link, bob, arrived)
    assert sorted(arrived) == list(range(160))
    delays = [arrived[n] - link.written[n] for n in range(160)]
    assert max(delays) <= 0.1, (max(delays), statistics.median(delays))
    assert session(engine, "mallory").logged_on
    assert engine.counters[Count.RECEIVER_BEHIND] > 0
    assert alice.take() == []  # one-way Sends: nothing to answer
    engine.clock.advance(10 - engine.clock.seconds() + STEP)
    assert not [s for s in engine.sessions if s.user_id == "mallory"]
    notice = mallory.take()[-1]
    assert notice.message_type == T.DISCONNECT_NOTICE
    assert notice.body.reason.name == "CHANNEL_CACHE_OVERFLOW"
    assert engine.budget.used == 0  # his backlog went back


def _acknowledged(kind, mark, payload):
    if kind == T.BLOB:  # a blob in one fragment, acknowledged (it has a MessageID)
        return BlobFragment(mark, 100_000 + mark, 0, True, payload)
    return Information(mark, payload)


@pytest.mark.parametrize("kind", [T.SEND_CERTAINLY, T.REQUEST, T.BLOB], ids=lambda k: k.name)
def test_acknowledged_traffic_to_others_is_not_held_up_by_a_receiver_that_does_not_read(kind):
    """
    The filed case with acknowledged messages: alice sends mallory (who
    never reads) a 4 MiB burst of 60 KB SendCertainlys, Requests or blobs,
    then bob one of the same every 50 ms for 4 s.  Each reaches bob within
    100 ms; what mallory could not take is answered RateLimited, each at
    once, and nothing of bob's is.
    """
    engine = make_engine()
    alice, bob, mallory = (connect(engine, name) for name in ("alice", "bob", "mallory"))
    mallory.protocol.pauseProducing()
    link = Link(alice)
    burst = 4 * MIB // 60_000 + 1
    for n in range(burst):
        body = _acknowledged(kind, -1, bytes(60_000))
        link.write(alice.frame(kind, body, dest="mallory", message_id=1 + n))
    arrived = {}
    answers = []
    for n in range(80):
        body = _acknowledged(kind, n, b"hi bob")
        link.write(alice.frame(kind, body, dest="bob", message_id=10_000 + n), mark=n)
        for _ in range(10):  # 50 ms
            link.pump()
            now = engine.clock.seconds()
            for frame in bob.take():
                if frame.message_type == kind:
                    arrived.setdefault(frame.body.information_type, now)
            answers += alice.take()
            engine.clock.advance(STEP)
    assert sorted(arrived) == list(range(80))
    delays = [arrived[n] - link.written[n] for n in range(80)]
    assert max(delays) <= 0.1, (max(delays), statistics.median(delays))
    refused = [a for a in answers if a.message_type == T.ERROR]
    assert refused and {a.body.code for a in refused} == {ErrorCode.RATE_LIMITED}
    assert all(a.message_id <= burst for a in refused)  # none of bob's


def test_a_receiver_that_reads_slowly_does_not_hold_up_its_senders_traffic_to_others():
    """
    mallory reads, slowly: his transport drains every 300 ms, and is full
    again at once.  alice streams 60 KB Sends to him (12 MB a second,
    far more than he takes) and a small Send to bob every 50 ms: each
    reaches bob within 100 ms, mallory gets what he has room for, and he
    is not ended (he drains, if slowly).
    """
    engine = make_engine()
    alice, bob, mallory = (connect(engine, name) for name in ("alice", "bob", "mallory"))
    mallory.protocol.pauseProducing()
    link = Link(alice)
    big = alice.frame(T.SEND, Information(-1, bytes(60_000)), dest="mallory")
    arrived = {}
    for n in range(240):  # 12 s: past the drain timeout
        link.write(alice.frame(T.SEND, Information(n, b"hi bob"), dest="bob"), mark=n)
        for step in range(10):
            if len(link.pending) < 256 * 1024:  # alice's socket buffer has room
                link.write(big)
            link.pump()
            latencies(link, bob, arrived)
            engine.clock.advance(STEP)
            if (n * 10 + step) % 60 == 59:  # every 300 ms
                mallory.take()
                mallory.protocol.resumeProducing()
                mallory.protocol.pauseProducing()
    for _ in range(20):
        link.pump()
        latencies(link, bob, arrived)
        engine.clock.advance(STEP)
    assert sorted(arrived) == list(range(240))
    delays = [arrived[n] - link.written[n] for n in range(240)]
    assert max(delays) <= 0.1, (max(delays), statistics.median(delays))
    assert session(engine, "mallory").logged_on
    assert engine.counters[Count.RECEIVER_BEHIND] > 0


def stalled_mallory(engine, alice, mallory):
    """
    Fill mallory's queue and let alice's push back pass: from now on what
    alice relays to him is refused.
    """
    mallory.protocol.pauseProducing()
    limit = engine.config.max_output_buffer
    dest = f"{mallory.user_id}#{mallory.client_type}"
    filler = alice.frame(T.SEND, Information(0, bytes(1000)), dest=dest)
    for _ in range(10_000):
        if alice.transport.producerState == "paused":
            break
        alice.send_raw(filler)
    engine.clock.advance(engine.config.push_back_timeout)
    assert alice.transport.producerState == "producing"
    for _ in range(10_000):
        if mallory.protocol.session._backlog + len(filler) > limit:
            break
        alice.send_raw(filler)
    tiny = alice.frame(T.SEND, Information(0, b""), dest=dest)
    for _ in range(100):  # full: even this is refused
        if engine.counters[Count.RECEIVER_BEHIND]:
            break
        alice.send_raw(tiny)
    assert engine.counters[Count.RECEIVER_BEHIND]
    assert mallory.protocol.session.logged_on
    mallory.take()


REQUESTS = [
    (T.SEND_CERTAINLY, Information(5, b"s")),
    (T.REQUEST, Information(5, b"q")),
    (T.BLOB, BlobFragment(5, 1, 0, True, b"b")),
    (T.PING_BY_SERVER, Empty()),
]


@pytest.mark.parametrize("request_type, body", REQUESTS, ids=[r.name for r, _ in REQUESTS])
def test_a_request_to_a_receiver_that_is_backed_up_is_answered_at_once(request_type, body):
    """
    An acknowledged message to a receiver that is backed up is not queued:
    the sender gets Error(RateLimited) at once, naming the receiver and
    the reason, and no answer to it is expected any more.
    """
    engine = make_engine(max_output_buffer=10_000)
    alice, mallory = connect(engine, "alice"), connect(engine, "mallory")
    stalled_mallory(engine, alice, mallory)
    before = engine.counters[Count.RECEIVER_BEHIND]
    alice.send(request_type, body, dest="mallory", message_id=77)
    (error,) = alice.take()
    assert (error.message_type, error.message_id) == (T.ERROR, 77)
    assert error.body.request_message_type == request_type
    assert error.body.code == ErrorCode.RATE_LIMITED
    assert "mallory is backed up" in error.body.text
    assert mallory.take() == []
    assert engine.counters[Count.RECEIVER_BEHIND] == before + 1
    assert not session(engine, "alice").asked  # no answer is let through for it


def test_a_one_way_send_to_a_receiver_that_is_backed_up_is_counted():
    engine = make_engine(max_output_buffer=10_000)
    alice, bob, mallory = (connect(engine, name) for name in ("alice", "bob", "mallory"))
    stalled_mallory(engine, alice, mallory)
    before = engine.counters[Count.RECEIVER_BEHIND]
    run = b"".join(alice.frame(T.SEND, Information(n, b"x"), dest="mallory") for n in range(3))
    to_bob = alice.frame(T.SEND, Information(9, b"to bob"), dest="bob")
    alice.send_raw(run + to_bob)
    assert engine.counters[Count.RECEIVER_BEHIND] == before + 3  # frames, not writes
    assert alice.take() == [] and mallory.take() == []
    assert [f.raw for f in bob.take()] == [to_bob]


def test_a_request_to_one_of_two_devices_that_is_backed_up_goes_to_the_other():
    """
    A request to a user reaches the devices that are not backed up; it is
    refused only when none can take it.
    """
    engine = make_engine(max_output_buffer=10_000)
    alice = connect(engine, "alice")
    mallory = connect(engine, "mallory", 1)
    phone = connect(engine, "mallory", 2)
    stalled_mallory(engine, alice, mallory)
    sent = alice.send(T.SEND_CERTAINLY, Information(5, b"s"), dest="mallory", message_id=8)
    assert alice.take() == []
    assert [f.raw for f in phone.take()] == [sent]
    phone.send(T.ACK, Ack(5), dest="alice", message_id=8)
    assert [(f.message_type, f.message_id) for f in alice.take()] == [(T.ACK, 8)]


def test_a_receiver_that_drains_is_sent_to_again():
    engine = make_engine(max_output_buffer=10_000)
    alice, mallory = connect(engine, "alice"), connect(engine, "mallory")
    stalled_mallory(engine, alice, mallory)
    mallory.protocol.resumeProducing()  # he read it all: his transport drained
    sent = alice.send(T.SEND_CERTAINLY, Information(5, b"s"), dest="mallory", message_id=3)
    assert [f.raw for f in mallory.take()] == [sent]
    assert alice.take() == []


def test_a_sender_that_keeps_relaying_what_is_refused_is_slowed_down():
    """
    A burst refused costs the sender nothing; one that goes on relaying to
    a receiver that refuses spends its allowance (twice the bound,
    refilled at the bound a second) and is then read at that rate only.
    """
    engine = make_engine(max_output_buffer=100_000)
    alice, mallory = connect(engine, "alice"), connect(engine, "mallory")
    stalled_mallory(engine, alice, mallory)
    frame = alice.frame(T.SEND, Information(0, bytes(10_000)), dest="mallory")
    refused = 0
    while alice.transport.producerState != "paused":
        alice.send_raw(frame)
        refused += len(frame)
        assert refused < 300_000
    assert refused >= 200_000
    engine.clock.advance(0.1)  # 100,000 bytes a second
    assert alice.transport.producerState == "producing"
    alice.send_raw(frame)
    assert alice.transport.producerState == "paused"


def test_without_push_back_a_sender_is_never_held_back():
    """
    C{push_back_timeout} 0: a receiver that falls behind is stalled at once;
    its sender is never paused, and what does not fit the receiver's bound
    is refused.
    """
    engine = make_engine(max_output_buffer=10_000, push_back_timeout=0)
    alice, mallory = connect(engine, "alice"), connect(engine, "mallory")
    mallory.protocol.pauseProducing()
    for n in range(20):  # 10 KB queued, 10 KB refused: within alice's allowance
        alice.send(T.SEND, Information(n, bytes(1000)), dest="mallory")
        assert alice.transport.producerState == "producing"
    assert engine.counters[Count.SENDERS_PAUSED] == 0
    assert mallory.protocol.session._backlog <= 10_000
    assert engine.counters[Count.RECEIVER_BEHIND] > 0
    assert engine.counters[Count.OUTPUT_DROPPED] == 0


def test_a_burst_to_a_receiver_that_drains_in_time_loses_nothing():
    """
    The push back still absorbs a burst to a receiver that reads: while it
    drains within the push back, its sender waits and nothing is refused.
    """
    engine = make_engine(max_output_buffer=100_000)
    alice, bob = connect(engine, "alice"), connect(engine, "bob")
    link = Link(alice)
    frames = [alice.frame(T.SEND, Information(n, bytes(10_000)), dest="bob") for n in range(100)]
    for frame in frames:
        link.write(frame)
    bob.protocol.pauseProducing()
    received = []
    while link.pending:
        link.pump()
        engine.clock.advance(engine.config.push_back_timeout / 2)
        received += bob.take()  # bob reads what was written...
        bob.protocol.resumeProducing()  # ...and his transport drains
        bob.protocol.pauseProducing()  # then fills again
    received += bob.take()
    assert [f.raw for f in received] == frames
    assert engine.counters[Count.SENDERS_PAUSED] > 0
    assert engine.counters[Count.RECEIVER_BEHIND] == engine.counters[Count.OUTPUT_DROPPED] == 0


def test_a_request_to_a_device_that_holds_too_much_is_answered_at_once():
    """
    What is relayed to a device while its stored messages are delivered is
    held; a device that takes its time holds back its senders only for
    the push back, then refuses as one that does not read: a
    SendCertainly gets RateLimited at once.  Once it has its stored
    messages, it is sent to again.
    """
    from esf import RequestError
    from esf.offline import MemoryOfflineStore, OfflineBounds
    from esf.testing import MemoryServer

    store = MemoryOfflineStore(bounds=OfflineBounds(max_messages=10, max_bytes=1 << 20))
    server = MemoryServer(config=ServerConfig(max_output_buffer=4096), offline_store=store)
    store.clock, store.delay = server.clock, 5.0  # a store that takes its time
    alice = server.logged_on("alice")
    alice.send("bob", 0, b"stored")
    server.advance(5)
    bob = server.client("bob")
    server.result(bob.logon())  # its stored message is being read: live ones are held
    for _ in range(10):
        alice.send("bob", 1, b"x" * 500)
    server.pump()
    assert server.engine.counters[Count.SENDERS_PAUSED] == 1
    server.advance(server.config.push_back_timeout)
    error = server.failure(alice.send_certainly("bob", 1, b"y"), RequestError)
    assert error.code == ErrorCode.RATE_LIMITED and "bob is backed up" in error.text
    server.advance(20)  # the stored message is delivered, what was held follows
    server.result(alice.send_certainly("bob", 1, b"z"))
    assert server.engine.budget.used == 0
    server.close()


# -- group broadcasts -------------------------------------------------------------------


def test_a_member_that_does_not_read_does_not_hold_up_a_broadcast_to_the_others():
    """
    alice broadcasts 4 MiB to a group where mallory never reads, then a
    small broadcast every 50 ms: bob and carol get each within 100 ms; the
    acknowledged ones are acknowledged; mallory's share is counted.
    """
    groups = Groups({"g": ["alice", "bob", "carol", "mallory"]})
    engine = make_engine(groups)
    alice, bob, carol, mallory = (
        connect(engine, name, host=f"10.0.0.{n}")
        for n, name in enumerate(("alice", "bob", "carol", "mallory"), 1)
    )
    mallory.protocol.pauseProducing()
    link = Link(alice)
    big = alice.frame(T.BROADCAST, Information(-1, bytes(60_000)), dest="g")
    for _ in range(4 * MIB // len(big) + 1):
        link.write(big)
    arrived = {"bob": {}, "carol": {}}
    for n in range(40):
        link.write(
            alice.frame(T.BROADCAST, Information(n, b"hi"), dest="g", message_id=n + 1), mark=n
        )
        for _ in range(10):
            link.pump()
            for name, client in (("bob", bob), ("carol", carol)):
                latencies(link, client, arrived[name])
            engine.clock.advance(STEP)
    for name in ("bob", "carol"):
        assert sorted(arrived[name]) == list(range(-1, 40))
        delays = [arrived[name][n] - link.written[n] for n in range(40)]
        assert max(delays) <= 0.1, (name, max(delays))
    acks = [f.message_id for f in alice.take() if f.message_type == T.ACK]
    assert acks == list(range(1, 41))
    assert engine.counters[Count.RECEIVER_BEHIND] > 0
    assert session(engine, "mallory").logged_on


def test_a_broadcast_burst_to_a_member_that_reads_loses_nothing():
    """
    A member that reads, more slowly than the broadcaster writes, gets the
    whole burst: the broadcaster is held back while it drains.
    """
    groups = Groups({"g": ["alice", "bob"]})
    engine = make_engine(groups, max_output_buffer=100_000)
    alice, bob = connect(engine, "alice"), connect(engine, "bob", host="10.0.0.2")
    frames = [
        alice.frame(T.BROADCAST, Information(n, bytes(10_000)), dest="g") for n in range(100)
    ]
    link = Link(alice)
    for frame in frames:
        link.write(frame)
    bob.protocol.pauseProducing()
    received = []
    while link.pending:
        link.pump()
        received += bob.take()
        bob.protocol.resumeProducing()
        bob.protocol.pauseProducing()
    received += bob.take()
    assert [f.raw for f in received] == frames
    assert engine.counters[Count.SENDERS_PAUSED] > 0
    assert engine.counters[Count.OUTPUT_DROPPED] == 0


# -- live --------------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_receiver_that_does_not_read_does_not_delay_others_live(tmp_path):
    """
    The filed case on a real server: mallory never reads (a 4 KiB receive
    buffer); alice sends him a burst of 4 MiB of 60 KB Sends, then bob a
    small Send every 50 ms for 8 s.  bob's latency, from when alice meant
    to send (her schedule, which starts with the burst) to his read, stays
    under 100 ms at the 99th percentile.
    """
    from test_e2e import start_server

    users = "memory:alice:pa:bob:pb:mallory:pm"
    server = start_server(tmp_path / "server.log", ["--auth", users])
    try:
        mallory = rc.Client(socket.socket())
        mallory.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        mallory.sock.settimeout(5)
        mallory.sock.connect(("127.0.0.1", server.port))
        assert mallory.logon("mallory", "pm")["result"] == 0
        alice, bob = rc.connect(server.port), rc.connect(server.port)
        assert alice.logon("alice", "pa")["result"] == 0
        assert bob.logon("bob", "pb")["result"] == 0
        body = struct.pack("<i", 1) + bytes(60_000)
        burst = rc.pack_header(202, len(body), "alice", "mallory") + body
        # A server that stops reading alice blocks her writes until mallory
        # is ended: each of bob's messages is timed from when alice meant to
        # send it (her schedule), as a user would see it.
        alice.sock.settimeout(15)
        started = time.monotonic()
        alice.send_raw(burst * (4 * MIB // len(burst) + 1))
        delays = []
        count = 160
        for n in range(count):
            due = started + n * 0.05
            time.sleep(max(0.0, due - time.monotonic()))
            alice.send(202, struct.pack("<i", n) + b"hi bob", dest="bob")
            _header, payload = bob.recv_until(202, timeout=12)
            assert struct.unpack_from("<i", payload)[0] == n
            delays.append(time.monotonic() - due)
        first = [round(1000 * d, 1) for d in delays[:4]]
        delays.sort()
        p99 = delays[int(0.99 * (count - 1))]
        print(
            {
                "median_ms": 1000 * statistics.median(delays),
                "p99_ms": 1000 * p99,
                "worst_ms": 1000 * delays[-1],
                "first_ms": first,
            }
        )
        # The bound is 100 ms; measured 16-64 ms at the p99 on the shared
        # 2-core machine (the first message waits for the burst and the
        # push back, 50 ms): the margin is for a loaded machine.  Before the
        # fair relay: median 6 s, p99 9.9 s.
        assert statistics.median(delays) < 0.05
        assert p99 < 0.15
        for client in (alice, bob, mallory):
            client.close()
    finally:
        server.stop()
