"""
Hardening against one ordinary account: forged answers, the cost of each
request, memory and output bounds, log floods.
"""

from __future__ import annotations

import pytest
from _helpers import connect, make_engine

from esf import ClientType, ErrorCode, MessageType
from esf.server._counters import Count
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


# -- 5. the output bound is not a weapon: push back on the sender -----------------

MIB = 1024 * 1024


def _unread(client) -> int:
    return len(client.transport.value()) - client._read


def test_burst_of_32_mib_does_not_end_a_reading_victim():
    """
    mallory writes 32 MiB of 1 MiB Sends to bob in one burst.  bob reads
    normally, but slower than mallory writes (his socket buffer fills at
    64 KiB).  The server stops reading mallory while bob is backed up, and
    bob is not ended: every message arrives, in order.
    """
    engine = make_engine()  # max_output_buffer 2 MiB, max_message_size 1 MiB
    mallory = connect(engine, "mallory")
    bob = connect(engine, "bob")
    frames = [
        mallory.frame(MessageType.SEND, Information(n, bytes([n]) * (MIB - 100)), dest="bob")
        for n in range(32)
    ]
    stream = b"".join(frames)
    chunk = 64 * 1024
    position, received, pauses = 0, [], 0
    while position < len(stream):
        while position < len(stream) and mallory.transport.producerState != "paused":
            mallory.send_raw(stream[position : position + chunk])
            position += chunk
            if _unread(bob) > 64 * 1024 and not engine_session(engine, "bob")._paused:
                bob.protocol.pauseProducing()  # as the transport does
        if mallory.transport.producerState == "paused":
            pauses += 1
        assert engine_session(engine, "bob").logged_on
        received += bob.take()  # bob reads all that is written so far...
        bob.protocol.resumeProducing()  # ...so his transport drains
    received += bob.take()
    assert [r.raw for r in received] == frames
    assert engine_session(engine, "bob").logged_on
    assert pauses > 0 and engine.counters[Count.SENDERS_PAUSED] == pauses
    assert mallory.transport.producerState == "producing"
    assert engine.counters[Count.OUTPUT_DROPPED] == 0


def engine_session(engine, user_id):
    (session,) = [s for s in engine.sessions if s.user_id == user_id]
    return session


def test_a_receiver_that_does_not_drain_is_ended_after_the_drain_timeout():
    """
    A receiver whose backlog stays over the bound for output_drain_timeout
    seconds is ended with ChannelCacheOverflow, and its senders read again;
    before that, it is not.
    """
    engine = make_engine(max_output_buffer=10_000, output_drain_timeout=10)
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    bob.protocol.pauseProducing()
    for n in range(12):
        alice.send(MessageType.SEND, Information(n, bytes(1000)), dest="bob")
    assert alice.transport.producerState == "paused"
    engine.clock.advance(9.9)
    assert engine_session(engine, "bob").logged_on
    engine.clock.advance(0.1)
    assert not engine_session_or_none(engine, "bob")
    notice = bob.take()[-1]
    assert notice.message_type == MessageType.DISCONNECT_NOTICE
    assert notice.body.reason.name == "CHANNEL_CACHE_OVERFLOW"
    assert alice.transport.producerState == "producing"
    assert engine_session(engine, "alice").logged_on


def engine_session_or_none(engine, user_id):
    return [s for s in engine.sessions if s.user_id == user_id and s.logged_on]


def test_the_backlog_has_a_hard_bound():
    """
    Senders that keep writing (their reads were already under way) cannot
    grow a receiver's backlog past 4 x max_output_buffer: more is dropped
    and counted.
    """
    engine = make_engine(max_output_buffer=10_000)
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    bob.protocol.pauseProducing()
    for n in range(100):  # 100 KB, ignoring the push back
        alice.send(MessageType.SEND, Information(n, bytes(1000)), dest="bob")
    assert engine_session(engine, "bob")._backlog <= 40_000
    assert engine.counters[Count.OUTPUT_DROPPED] > 50
    assert engine_session(engine, "bob").logged_on


# -- 3. memory: blobs nobody reads, per user, and one server-wide budget -----------

from twisted.internet import task
from zope.interface import implementer

from esf import ServerConfig, ServerEngine, WireConfig
from esf.interfaces import ICustomizeHandler


@implementer(ICustomizeHandler)
class Blobs:
    def __init__(self):
        self.informations = []

    def handle_information(self, user_id, client_type, information_type, payload):
        self.informations.append((user_id, information_type, payload))

    def handle_query(self, user_id, client_type, information_type, payload):
        return b""


def blob_engine(handler=None, **settings):
    config = ServerConfig(wire=WireConfig(11, 1024 * 1024), **settings)
    engine = ServerEngine(config, clock=task.Clock(), customize_handler=handler)
    engine.start()
    return engine


def test_blob_to_a_server_without_handler_is_refused_at_once():
    """
    Nobody would read it: the first fragment is answered HandlerError and
    nothing is held.
    """
    engine = blob_engine()
    alice = connect(engine, "alice")
    alice.send(MessageType.BLOB, BlobFragment(5, 1, 0, False, bytes(50_000)), message_id=9)
    (error,) = alice.take()
    assert (error.message_type, error.body.code) == (MessageType.ERROR, ErrorCode.HANDLER_ERROR)
    assert engine_session(engine, "alice").blobs is None
    assert engine.budget.used == 0


def test_blobs_in_progress_are_bounded_per_user_over_all_devices():
    """
    One account on several device kinds cannot multiply the per-session
    blob bound: their blobs in progress share max_blob_bytes_per_user.
    """
    engine = blob_engine(Blobs(), max_blob_bytes_per_user=25_000)
    devices = [connect(engine, "alice", kind) for kind in (0, 1, 2)]
    for device in devices:
        device.take()
    answers = []
    for n, device in enumerate(devices):
        device.send(
            MessageType.BLOB, BlobFragment(5, 1, 0, False, bytes(10_000)), message_id=n + 2
        )
        answers += device.take()
    assert [a.body.code for a in answers if a.message_type == MessageType.ERROR] == [
        ErrorCode.TOO_LARGE
    ]
    assert engine.budget.blob_bytes("alice") == 20_000
    # Finishing one frees its share.
    devices[0].send(MessageType.BLOB, BlobFragment(5, 1, 1, True, b"end"), message_id=2)
    assert engine.budget.blob_bytes("alice") == 10_000
    for device in devices:
        device.lose()
    assert engine.budget.used == 0


def test_server_wide_budget_refuses_new_blobs_and_backlog_before_it_is_passed():
    """
    Blobs of many users and output for a peer that does not read share one
    budget: what would pass it is refused (blobs RateLimited, output
    dropped and counted); the budget is given back as the bytes go.
    """
    engine = blob_engine(Blobs(), max_buffered_bytes=50_000, max_output_buffer=40_000)
    users = [connect(engine, f"u{n}") for n in range(4)]
    codes = []
    for user in users:
        user.send(MessageType.BLOB, BlobFragment(5, 1, 0, False, bytes(15_000)), message_id=2)
        codes += [r.body.code for r in user.take() if r.message_type == MessageType.ERROR]
    assert codes == [ErrorCode.RATE_LIMITED]
    assert engine.budget.used == 45_000
    reader = connect(engine, "reader")
    reader.protocol.pauseProducing()
    for n in range(10):
        users[0].send(MessageType.SEND, Information(n, bytes(1000)), dest="reader")
    assert engine.budget.used <= 50_000
    assert engine.counters[Count.OUTPUT_DROPPED] > 0
    reader.protocol.resumeProducing()
    assert engine.budget.used == 45_000
    engine.clock.advance(engine.config.blob_idle_timeout + 10)  # the blobs expire
    assert engine.budget.used == 0


def test_a_large_partial_frame_is_refused_when_the_budget_is_spent():
    """
    Over budget, a session that starts a frame larger than 64 KiB is ended
    with MessageTooLarge and a reason; the budget is given back.
    """
    engine = blob_engine(Blobs(), max_buffered_bytes=100_000)
    alice = connect(engine, "alice")
    frame = alice.frame(MessageType.SEND, Information(1, bytes(200_000)))
    alice.send_raw(frame[:80_000])
    assert engine_session(engine, "alice").logged_on
    alice.send_raw(frame[80_000:120_000])
    (notice,) = alice.take()
    assert notice.body.reason.name == "MESSAGE_TOO_LARGE"
    assert "memory budget" in notice.body.text
    assert engine.budget.used == 0


@pytest.mark.e2e
def test_blobs_nobody_reads_cost_a_live_server_nothing(twistd):
    """
    The attack on the relay scaled down: one account on 9 device kinds sends
    4 unfinished 8 MiB blobs each (288 MiB) to a server with default options
    and no application handler.  Every fragment is refused; RSS does not
    follow the bytes.
    """
    server = twistd()
    devices = [logged_on(server.port, "alice", "pa", kind) for kind in range(9)]
    before = rss_kib(server.process.pid)
    piece = bytes(1024 * 1024 - 200)
    for blob_id in range(4):
        for index in range(8):
            body = BlobFragment(5, blob_id, index, False, piece).encode()
            for device in devices:
                device.send(207, body, dest="_0")
    for device in devices:  # GetMyIPE: all each device sent before was handled
        device.send(101, dest="_0", msg_id=77)
        header, _ = device.recv_until(101)
        assert header["message_id"] == 77
    after = rss_kib(server.process.pid)
    print({"rss_before_kib": before, "rss_after_kib": after})
    assert after - before < 32 * 1024
    for device in devices:
        device.close()


from test_reliability import logged_on, rss_kib, twistd  # noqa: F401

# -- 2. CPU: a cost bound on every request -----------------------------------------
from esf.wire import QueryOnlines


def test_query_onlines_names_at_most_max_query_ids():
    engine = make_engine(max_query_ids=1000)
    alice = connect(engine, "alice")
    alice.send(
        MessageType.QUERY_ONLINES, QueryOnlines([f"u{n}" for n in range(1000)]), message_id=2
    )
    (ok,) = alice.take()
    assert ok.message_type == MessageType.QUERY_ONLINES and len(ok.body.online) == 1000
    alice.send(
        MessageType.QUERY_ONLINES, QueryOnlines([f"u{n}" for n in range(1001)]), message_id=3
    )
    (refused,) = alice.take()
    assert (refused.message_type, refused.body.code) == (MessageType.ERROR, ErrorCode.TOO_LARGE)
    assert "at most 1000" in refused.body.text


def _flood(client, frame, count):
    client.send_raw(frame * count)
    replies = client.take()
    handled = [r for r in replies if r.message_type == MessageType.QUERY_ONLINES]
    refused = [r for r in replies if r.message_type == MessageType.ERROR]
    assert {r.body.code for r in refused} <= {ErrorCode.RATE_LIMITED}
    return len(handled), len(refused)


def test_server_work_is_budgeted_per_session_by_cost():
    """
    A pipelined flood of the most expensive request (QueryOnlines naming
    1,000 IDs, cost 101) is handled at the budget's rate, the rest refused
    RateLimited; another user's requests are not touched by it.
    """
    engine = make_engine(work_rate=1000, work_burst=2000, work_refusal_limit=10)
    mallory = connect(engine, "mallory")
    bob = connect(engine, "bob")
    frame = mallory.frame(
        MessageType.QUERY_ONLINES, QueryOnlines([f"u{n:05}" for n in range(1000)]), message_id=2
    )
    handled, refused = _flood(mallory, frame, 1000)
    # 2000 saved up: 19 x 101 leave 81, enough to let a 20th in (its IDs
    # are charged once it is decoded, and take the bucket below zero).
    assert (handled, refused) == (20, 980)
    for second in range(1, 6):
        engine.clock.advance(1)
        handled, refused = _flood(mallory, frame, 1000)
        assert handled <= 1000 / 101 + 1, (second, handled)
        assert handled >= 8
        bob.send(MessageType.PING_BY_SERVER, message_id=second)
        (pong,) = bob.take()
        assert pong.message_type == MessageType.PING_ACK
    assert engine.counters[Count.WORK_REFUSED] >= 5000


def test_persistent_refusal_ends_the_session():
    """
    A session refused without a break for work_refusal_limit seconds is
    ended, with a reason; one that slows down is not.
    """
    engine = make_engine(work_rate=10, work_burst=10, work_refusal_limit=5)
    mallory = connect(engine, "mallory")
    ping = mallory.frame(MessageType.PING_BY_SERVER, message_id=2)
    mallory.send_raw(ping * 10)  # the bucket is empty
    for _ in range(60):  # 10 a second: refused until...
        engine.clock.advance(0.05)
        mallory.send_raw(ping)
        engine.clock.advance(0.05)
        mallory.send_raw(ping * 5)
    notice = mallory.take()[-1]
    assert notice.message_type == MessageType.DISCONNECT_NOTICE
    assert notice.body.reason.name == "BEING_KICKED_OUT"
    assert "budget" in notice.body.text
    polite = connect(engine, "polite")
    for _ in range(200):  # within the rate: never refused
        engine.clock.advance(0.2)
        polite.send(MessageType.PING_BY_SERVER, message_id=3)
    replies = polite.take()
    assert len(replies) == 200
    assert all(r.message_type == MessageType.PING_ACK for r in replies)


@pytest.mark.e2e
def test_others_ping_while_one_user_floods_the_most_expensive_request(twistd, tmp_path):
    """
    800 users are online.  mallory pipelines, for 3 s and without reading,
    the most expensive requests there are: QueryOnlines naming 1,000 IDs,
    GetAllOnlineUsers pages from the middle of the list (as many IDs as fit)
    and from its end.  Meanwhile alice pings the server 300 times.  With
    the per-session work budget and answers that cost what they hold,
    alice's p99 stays < 50 ms.
    """
    import threading
    import time

    from rawclient import pack_header

    from esf.wire import GetAllOnlineUsers as G
    from esf.wire import QueryOnlines as Q

    crowd = [f"user{n:04}" for n in range(800)]
    passwd = tmp_path / "passwd"
    passwd.write_text("".join(f"{u}:p{u}\n" for u in crowd))
    server = twistd("--auth", f"file:{passwd}", "--logon-rate-limit", "100000")
    online = [logged_on(server.port, u, f"p{u}") for u in crowd]
    alice = logged_on(server.port, "alice", "pa")
    mallory = logged_on(server.port, "erin", "pe")
    query = Q([f"user{n:04}" for n in range(1000)]).encode()
    middle = G(400, 0).encode()
    end = G(799, 1).encode()
    burst = b"".join(
        pack_header(114, len(query), "erin", "_0", 2, 0)
        + query
        + pack_header(110, len(middle), "erin", "_0", 3, 0)
        + middle
        + pack_header(110, len(end), "erin", "_0", 4, 0)
        + end
        for _ in range(20)
    )
    stop = time.monotonic() + 3.0
    sent = [0]

    def flood():
        mallory.sock.settimeout(10)
        try:
            while time.monotonic() < stop:
                mallory.sock.sendall(burst)
                sent[0] += 60
        except OSError:
            pass

    flooder = threading.Thread(target=flood)
    flooder.start()
    time.sleep(0.2)
    times = []
    for n in range(300):
        started = time.monotonic()
        alice.send(102, dest="_0", msg_id=n + 1)
        _header, _ = alice.recv_until(103)
        times.append(time.monotonic() - started)
        time.sleep(0.005)
    flooder.join(15)
    times.sort()
    p99 = times[int(len(times) * 0.99) - 1]
    print({"requests_sent": sent[0], "ping_p50_ms": times[150] * 1e3, "ping_p99_ms": p99 * 1e3})
    assert sent[0] >= 60  # the flood ran
    assert p99 < 0.050
    for client in (mallory, alice, *online):
        client.close()


# -- 6. what a peer can make the server log --------------------------------------

from _helpers import LogCapture
from twisted.logger import LogLevel

from esf.wire import KickOut

# Every test here runs with the compiled loops and with the pure-Python code
# alone (compiled_loops, tests/conftest.py).
pytestmark = pytest.mark.usefixtures("compiled_loops")


@implementer(ICustomizeHandler)
class Broken:
    def handle_information(self, user_id, client_type, information_type, payload):
        raise ValueError("bug")

    def handle_query(self, user_id, client_type, information_type, payload):
        raise ValueError("bug")


def test_a_peer_cannot_flood_the_log():
    """
    3,000 requests that each used to log at info or above (refused kicks,
    requests the handler fails on, answers nobody waits for) give at most
    LOG_LIMIT events per minute, then one summary; the session's end event
    says how many were suppressed.
    """
    from esf.server._session import LOG_LIMIT

    engine = blob_engine(Broken())
    capture = LogCapture().start()
    try:
        alice = connect(engine, "alice")
        connect(engine, "bob")
        for n in range(1000):
            alice.send(MessageType.KICK_OUT, KickOut("go"), dest="bob", message_id=n + 2)
            alice.send(MessageType.REQUEST, Information(1, b"q"), message_id=n + 2)
            alice.send(MessageType.RESPONSE, Information(1, b"a"), message_id=n + 9000)
        loud = [e for e in capture.events if e["log_level"] >= LogLevel.info]
        assert len(loud) <= LOG_LIMIT + 2  # + the two logons
        engine.clock.advance(61)  # a new window: the next event brings the summary
        alice.send(MessageType.KICK_OUT, KickOut("go"), dest="bob", message_id=5)
        (summary,) = capture.esf("logs_suppressed")
        assert summary["count"] == 2000 - LOG_LIMIT
        for n in range(20):  # 9 more logged, 11 suppressed...
            alice.send(MessageType.KICK_OUT, KickOut("go"), dest="bob", message_id=n + 6)
        alice.lose()  # ...and summarised when the session ends
        (ended,) = [e for e in capture.esf("session_ended") if e["user_id"] == "alice"]
        assert ended["suppressed_logs"] == 11
        assert [e["count"] for e in capture.esf("logs_suppressed")] == [2000 - LOG_LIMIT, 11]
        assert engine.counters[Count.LOGS_SUPPRESSED] == 2000 - LOG_LIMIT + 11
    finally:
        capture.stop()


# -- 4. a frame that stays unfinished ends the session, with a reason ----------------


def test_a_frame_trickled_forever_ends_the_session_with_a_reason():
    """
    A byte a second of a 1 MiB frame keeps nothing alive: within 1.25 x the
    heartbeat timeout the session ends HeartbeatTimeout, saying a frame was
    left unfinished; its bytes leave the memory budget.
    """
    engine = make_engine(heartbeat_interval=10, heartbeat_timeout=30)
    alice = connect(engine, "alice")
    frame = alice.frame(MessageType.SEND, Information(1, bytes(1024 * 1024 - 200)))
    for second in range(60):
        if not engine_session_or_none(engine, "alice"):
            break
        alice.send_raw(frame[second * 100 : (second + 1) * 100])
        engine.clock.advance(1)
    assert second <= 30 * 1.25 + 1
    notice = alice.take()[-1]
    assert notice.body.reason.name == "HEARTBEAT_TIMEOUT"
    assert "unfinished frame" in notice.body.text
    assert engine.budget.used == 0


# -- 7. frames that go nowhere cost the work budget -------------------------------


def test_frames_that_go_nowhere_cost_the_work_budget():
    """
    mallory pipelines one-way Sends to a user who is offline, answers to
    nothing and requests past her bound of unanswered ones: nothing is
    relayed, so no receiver holds her back, but each costs the server an
    Error or a count, the offline store and an event to the application
    (C{transmit_failed}).  Each costs a unit of her work budget: past it
    they are refused without that work, and a flood that keeps it spent
    ends her session.  A user within the rate is told each time.
    """
    engine = make_engine(
        work_rate=100, work_burst=200, work_refusal_limit=5, max_unanswered_requests=1
    )
    failed = []
    engine.transmit_failed.subscribe(lambda *args: failed.append(args))
    mallory = connect(engine, "mallory")
    connect(engine, "bob")
    send = mallory.frame(MessageType.SEND, Information(1, b""), dest="nobody")
    mallory.send_raw(send * 1000)
    assert len(failed) == 200  # the burst; the 800 others refused, counted
    assert engine.counters[Count.WORK_REFUSED] == 800
    assert mallory.take() == []  # one-way: nothing answered
    engine.clock.advance(1)  # 100 units more
    answer = mallory.frame(MessageType.RESPONSE, Information(1, b""), dest="bob", message_id=9)
    mallory.send_raw(answer * 150)
    assert engine.counters[Count.UNSOLICITED_ANSWERS] == 100
    assert mallory.take() == []  # an answer is never answered
    engine.clock.advance(1)
    mallory.send(MessageType.REQUEST, Information(1, b"q"), dest="bob", message_id=1)
    ask = mallory.frame(MessageType.REQUEST, Information(1, b"q"), dest="bob", message_id=2)
    mallory.send_raw(ask * 150)  # past max_unanswered_requests: 100 refused as such
    codes = [r.body.code for r in mallory.take()]
    assert codes == [ErrorCode.RATE_LIMITED] * 150
    assert engine.counters[Count.TOO_MANY_UNANSWERED] == 100  # the others, over budget
    for _ in range(60):  # kept spent: ended, with a reason
        engine.clock.advance(0.1)
        mallory.send_raw(send * 20)
    notice = mallory.take()[-1]
    assert notice.message_type == MessageType.DISCONNECT_NOTICE
    assert notice.body.reason.name == "BEING_KICKED_OUT"
    assert "budget" in notice.body.text
    polite = connect(engine, "polite")
    for n in range(100):  # within the rate: every one is told
        engine.clock.advance(0.05)
        polite.send(
            MessageType.SEND_CERTAINLY, Information(1, b""), dest="nobody", message_id=n + 1
        )
    replies = polite.take()
    assert [r.body.code for r in replies] == [ErrorCode.USER_OFFLINE] * 100
