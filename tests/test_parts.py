"""
The server's parts, each alone: the logon policy's decisions, the router,
the heartbeat reaper, the table of pending requests, and an engine whose
presence answers claims later (as a registry shared by nodes would).
"""

from __future__ import annotations

import itertools

import pytest
from _helpers import Client, LogCapture, connect, logon_reply, make_engine, record_events
from twisted.internet import task
from twisted.internet.defer import Deferred
from zope.interface import implementer
from zope.interface.verify import verifyObject

from esf import DisconnectedType as D
from esf import ErrorCode, LogonResult, RelogonMode, RequestError, ServerConfig
from esf import MessageType as T
from esf.interfaces import IDeviceHandle, IPresence
from esf.server import _policy
from esf.server._heartbeat import Reaper
from esf.server._logon import LogonRecord
from esf.server._policy import Accept, Ignore, LogonPolicy, Refuse, Replace, SlidingWindow
from esf.server._presence import Claim, LocalPresence
from esf.server._router import Router
from esf.wire._messages import PROTOCOL_VERSION, Logon
from esf.wire._pending import PendingRequests

LOGON = Logon(PROTOCOL_VERSION, "", "pw")


class Holder:
    def __init__(self, user_id="alice", client_type=0, logon_order=1, address="10.0.0.1:1"):
        self.user_id = user_id
        self.client_type = client_type
        self.logon_order = logon_order
        self.session_id = f"s{logon_order}"

        class _Data:
            pass

        self.user_data = _Data()
        self.user_data.address = address


# -- the logon policy ------------------------------------------------------------


@pytest.mark.parametrize(
    "config, user_id, client_type, logon, result",
    [
        (ServerConfig(), "alice", 0, LOGON, None),
        (ServerConfig(), "alice", 0, Logon(2, "", ""), LogonResult.VERSION_MISMATCHED),
        (ServerConfig(system_token="t"), "alice", 0, LOGON, LogonResult.VERSION_MISMATCHED),
        (ServerConfig(system_token="t"), "alice", 0, Logon(PROTOCOL_VERSION, "t", ""), None),
        (ServerConfig(), "_0", 0, LOGON, LogonResult.FAILED),
        (ServerConfig(), "*", 0, LOGON, LogonResult.FAILED),
        (ServerConfig(), "a#1", 0, LOGON, LogonResult.FAILED),
        (ServerConfig(client_types={1}), "alice", 0, LOGON, LogonResult.CLIENT_TYPE_REJECTED),
    ],
)
def test_policy_admits(config, user_id, client_type, logon, result):
    decision = LogonPolicy(config).admit(user_id, client_type, logon, "10.0.0.1", 0.0)
    if result is None:
        assert decision == Accept()
    else:
        assert isinstance(decision, Refuse) and decision.result == result


def test_policy_rate_limits_per_host_within_the_window():
    policy = LogonPolicy(ServerConfig(logon_rate_limit=3, logon_rate_window=10))
    decisions = [policy.admit("alice", 0, LOGON, "10.0.0.1", t) for t in (0, 1, 2, 3)]
    assert decisions[:3] == [Accept()] * 3
    assert decisions[3].result == LogonResult.BUSY
    assert decisions[3].counter == "logons_rate_limited"
    assert policy.admit("alice", 0, LOGON, "10.0.0.2", 3) == Accept()  # another host
    # Refused attempts count too: the host must stay quiet for a window.
    assert policy.admit("alice", 0, LOGON, "10.0.0.1", 10.5).result == LogonResult.BUSY
    assert policy.admit("alice", 0, LOGON, "10.0.0.1", 21) == Accept()


def test_a_sliding_window_forgets_the_least_recently_seen_key_first():
    """
    Past C{max_keys}, a new key makes the window forget the key seen least
    recently (not the one first seen): a host that keeps trying keeps its
    count.
    """
    window = SlidingWindow(window=10, limit=2, max_keys=3)
    for key in ("a", "b", "c"):
        window.hit(key, 0)
    assert window.hit("a", 1) == 2  # a is now the most recently seen
    window.hit("d", 2)  # forgets b
    assert (len(window), window.tracked("b"), window.tracked("a")) == (3, 0, 2)
    window.hit("e", 3)  # forgets c
    assert [window.tracked(k) for k in "acde"] == [2, 0, 1, 1]
    assert window.hit("a", 4) == 3


REPLACE, IGNORE = RelogonMode.REPLACE_OLD, RelogonMode.IGNORE_NEW


def test_policy_settles_against_the_holder():
    policy = LogonPolicy(ServerConfig())
    old = Holder(logon_order=1)
    assert policy.settle("alice", 0, 2, None, 0, REPLACE) == Accept()
    assert policy.settle("alice", 0, 2, None, 0, IGNORE) == Accept()
    assert policy.settle("alice", 0, 2, old, 0, REPLACE) == Replace(old)
    assert policy.settle("alice", 0, 2, old, 0, IGNORE) == Ignore(old)
    # A Logon that arrived earlier never replaces one that arrived later.
    newer = Holder(logon_order=5)
    decision = policy.settle("alice", 0, 2, newer, 0, REPLACE)
    assert decision.result == LogonResult.FAILED and "superseded" in decision.cause


def test_policy_settles_by_the_mode_it_is_given_not_the_servers():
    """
    The mode is the pipeline's to find (the application's, per user and
    device kind); the server's setting is only its default.
    """
    policy = LogonPolicy(ServerConfig(relogon_mode=IGNORE))
    old = Holder(logon_order=1)
    assert policy.settle("dev-1", 0, 2, old, 0, REPLACE) == Replace(old)
    policy = LogonPolicy(ServerConfig(relogon_mode=REPLACE))
    assert policy.settle("op-ann", 0, 2, old, 0, IGNORE) == Ignore(old)


def test_policy_flapping_guard_blocks_the_device_for_the_cooldown():
    policy = LogonPolicy(ServerConfig(takeover_limit=2, takeover_window=60, takeover_cooldown=30))
    old = Holder(logon_order=0)
    assert [type(policy.settle("alice", 0, n, old, n, REPLACE)) for n in (1, 2)] == [
        Replace,
        Replace,
    ]
    third = policy.settle("alice", 0, 3, old, 3, REPLACE)
    assert third.result == LogonResult.BUSY and third.counter == "takeovers_refused"
    # The device is refused at admission until the cooldown is over ...
    assert policy.admit("alice", 0, LOGON, "10.0.0.1", 32).result == LogonResult.BUSY
    assert policy.admit("alice", 5, LOGON, "10.0.0.1", 32) == Accept()  # another device
    assert policy.admit("alice", 0, LOGON, "10.0.0.1", 33.5) == Accept()


def test_policy_keeps_a_bounded_list_of_blocked_devices_at_a_constant_cost(monkeypatch):
    """
    Blocks that ran out are forgotten as new ones come, and past the
    bound the oldest: however many devices flap, a block costs the same
    (the whole list was rebuilt at every block past the bound), and the
    newest blocks hold.
    """
    monkeypatch.setattr(_policy, "MAX_TRACKED_KEYS", 50)
    policy = LogonPolicy(ServerConfig(takeover_limit=1, takeover_window=60, takeover_cooldown=30))
    old = Holder(logon_order=0)

    def block(user_id, now):  # the second takeover within the window blocks
        policy.settle(user_id, 0, 1, old, now, REPLACE)
        return policy.settle(user_id, 0, 2, old, now, REPLACE)

    for n in range(200):  # all at once: only the bound forgets
        assert block(f"u{n}", 0).result == LogonResult.BUSY
    assert len(policy._blocked) == 50
    assert policy.admit("u199", 0, LOGON, "10.0.0.1", 1).result == LogonResult.BUSY
    assert policy.admit("u150", 0, LOGON, "10.0.0.1", 1).result == LogonResult.BUSY
    assert policy.admit("u149", 0, LOGON, "10.0.0.1", 1) == Accept()  # forgotten first
    # Later blocks drop those that ran out, from the oldest.
    block("late", 31)
    assert list(policy._blocked) == [("late", 0)]
    # A device blocked again moves behind the others.
    block("again", 32)
    block("late", 33)
    assert list(policy._blocked) == [("again", 0), ("late", 0)]


# -- the router --------------------------------------------------------------------


def test_router_resolves_users_devices_and_non_users():
    presence = LocalPresence()
    a0, a5 = Holder("alice", 0, 1), Holder("alice", 5, 2)
    presence.claim(a0, True)
    presence.claim(a5, True)
    router = Router(presence)
    assert list(router.resolve("alice")) == [a0, a5]
    assert router.resolve("alice#5") == (a5,)
    assert router.resolve("alice#4") == ()
    assert router.resolve("bob") == ()
    assert router.resolve("bob#1") == ()
    for not_a_user in ("_0", "", "*", "alice#", "alice#x", "#5", "alice#٣"):
        assert router.resolve(not_a_user) is None, not_a_user


# -- the reaper ----------------------------------------------------------------------


class Quiet:
    def __init__(self):
        self.logged_on = True
        self.active = False
        self.last_active = 0.0


def test_reaper_ends_silent_sessions_between_one_and_one_and_a_quarter_timeouts():
    clock = task.Clock()
    talker, silent, idle = Quiet(), Quiet(), Quiet()
    idle.logged_on = False  # not logged on: the logon timeout's business
    expired, ticks = [], []
    reaper = Reaper(clock, 20, lambda: [talker, silent, idle], expired.append, ticks.append)
    reaper.start()
    for _second in range(1, 26):
        talker.active = True
        clock.advance(1)
        if silent in expired:
            break
    assert expired == [silent]
    assert 20 <= clock.seconds() <= 25
    assert ticks and ticks[-1] == clock.seconds()
    reaper.stop()
    assert not reaper.running and clock.getDelayedCalls() == []


def test_reaper_ends_a_bounded_number_of_sessions_a_turn():
    """
    Peers that all went silent at once end over several reactor turns, a
    bounded number each: what else is due (a timer here, the sessions'
    I/O in a reactor) runs in between.
    """
    clock = task.Clock()
    silent = [Quiet() for _ in range(2500)]
    expired = []

    def expire(session):
        session.logged_on = False
        expired.append(session)

    reaper = Reaper(clock, 20, lambda: silent, expire)
    reaper.start()
    clock.advance(15)
    seen = []
    clock.callLater(5, lambda: seen.append(len(expired)))  # due with the scan that finds them
    clock.advance(5)
    assert seen == [Reaper.MAX_ENDED_PER_TURN] and len(expired) == 2500
    assert len(set(map(id, expired))) == 2500
    reaper.stop()
    assert clock.getDelayedCalls() == []


# -- pending requests ------------------------------------------------------------------


def test_pending_requests_accept_an_answer_only_from_whom_they_asked():
    clock = task.Clock()
    pending = PendingRequests(clock, timeout=5)
    results = []
    message_id = pending.next_id()
    pending.expect(message_id, "bob").addBoth(results.append)
    assert pending.asked(message_id) == "bob"
    assert pending.answer(message_id, "mallory", b"forged") is False
    assert results == [] and message_id in pending
    assert pending.answer(message_id, "bob", b"real") is True
    assert results == [b"real"] and len(pending) == 0
    assert pending.answer(message_id, "bob", b"again") is False


def test_pending_requests_time_out_fail_together_and_cancel():
    clock = task.Clock()
    pending = PendingRequests(clock, timeout=5)
    results = []
    for asked in ("bob", "carol", "bob"):
        pending.expect(pending.next_id(), asked).addErrback(results.append)
    assert (
        pending.fail_where(lambda asked: asked == "bob", RequestError(ErrorCode.USER_OFFLINE)) == 2
    )
    assert [f.value.code for f in results] == [ErrorCode.USER_OFFLINE] * 2
    clock.advance(5)
    assert [f.value.code for f in results][2:] == [ErrorCode.TIMEOUT]
    d = pending.expect(pending.next_id(), "dave")
    d.addErrback(lambda f: None)
    d.cancel()
    assert len(pending) == 0 and clock.getDelayedCalls() == []


def test_pending_message_ids_skip_outstanding_ones_and_wrap():
    pending = PendingRequests(task.Clock(), timeout=5)
    pending.expect(1, "x").addErrback(lambda f: None)
    assert pending.next_id() == 2  # 1 is outstanding
    pending._ids = itertools.count(0x7FFFFFFE)
    assert pending.next_id() == 0x7FFFFFFF  # the largest positive int32
    assert pending.next_id() == 2  # wrapped to 1, which is outstanding
    with pytest.raises(ValueError):
        pending.expect(1, "y")


# -- an engine on a presence that answers later -----------------------------------------


@implementer(IPresence)
class SlowPresence(LocalPresence):
    """
    LocalPresence whose claims take effect at once but are answered when
    the test says, as a registry across the network does.
    """

    def __init__(self):
        super().__init__()
        self.claims: list[tuple[Deferred, Claim]] = []

    def claim(self, handle, replace):
        results = []
        LocalPresence.claim(self, handle, replace).addCallback(results.append)
        d = Deferred()
        self.claims.append((d, results[0]))
        return d

    def answer(self):
        d, claim = self.claims.pop(0)
        d.callback(claim)


def test_a_session_is_a_device_handle():
    engine = make_engine()
    client = connect(engine, "alice")
    (session,) = engine.sessions
    assert verifyObject(IDeviceHandle, session)
    assert verifyObject(IPresence, engine.presence)
    assert session.node == engine.node_id
    assert client.user_id == session.user_id


def test_frames_relayed_while_a_logon_is_claimed_follow_its_reply():
    presence = SlowPresence()
    engine = make_engine(presence=presence)
    bob = Client(engine)
    bob.logon("bob")
    presence.answer()
    bob.take()
    alice = Client(engine)
    alice.logon("alice")
    assert alice.take() == []  # claimed, not yet answered
    assert engine.presence.devices("alice")  # others can reach her already
    bob.send(T.SEND, b"\x01\x00\x00\x00hi", dest="alice")
    assert alice.take() == []  # held back
    presence.answer()
    received = alice.take()
    assert [r.message_type for r in received] == [T.LOGON, T.SEND]
    assert received[0].body == logon_reply(engine)


def test_a_connection_lost_while_its_claim_is_in_flight_gives_the_device_back():
    presence = SlowPresence()
    engine = make_engine(presence=presence)
    events = record_events(engine.user_manager)
    alice = Client(engine)
    alice.logon("alice")
    assert presence.user_count() == 1
    alice.lose()
    presence.answer()
    assert not engine.user_manager.is_user_online("alice")
    assert presence.user_count() == 0
    assert events == []


def test_logons_are_ordered_by_arrival_not_by_connection():
    from _helpers import PendingHandler

    handler = PendingHandler()
    engine = make_engine(handler=handler)
    early = Client(engine, "10.0.0.1")  # connects first ...
    late = Client(engine, "10.0.0.2")
    late.logon("alice")  # ... but logs on second:
    early.logon("alice")  # its Logon is the newer one
    handler.pending(early.address).callback(True)
    assert [r.message_type for r in early.take()] == [T.LOGON]
    handler.pending(late.address).callback(True)
    (reply, notice) = late.take()
    assert reply.body.result == LogonResult.FAILED and "superseded" in reply.body.failure_cause
    assert notice.body.reason == D.LOGON_FAILED
    assert engine.presence.get("alice", 0).address == early.address


# -- the record of logons ----------------------------------------------------------


def test_logon_record_batches_a_storm():
    """
    A logon after a quiet spell is logged at once; those that follow within
    the interval come together, at most C{limit} to an event; every logon
    is in exactly one event, in order; a timer runs only while logons wait,
    and stopping logs what waits.
    """
    clock = task.Clock()
    record = LogonRecord(clock, interval=1.0, limit=3)

    def counts():
        return [e["count"] for e in logs.esf("logged_on")]

    with LogCapture() as logs:
        record.add("u0", 0, "10.0.0.1:1", 0.0)
        assert counts() == [1] and not clock.getDelayedCalls()
        for i in range(1, 5):
            record.add(f"u{i}", 1, f"10.0.0.1:{i + 1}", 0.0)
        assert counts() == [1, 3]  # the limit
        clock.advance(1)  # the interval is up: u4
        assert counts() == [1, 3, 1] and not clock.getDelayedCalls()
        clock.advance(0.5)
        record.add("u5", 0, "10.0.0.1:9", 1.5)  # 0.5 s after the last event: waits
        assert counts() == [1, 3, 1]
        clock.advance(0.5)
        assert counts() == [1, 3, 1, 1] and not clock.getDelayedCalls()
        clock.advance(5)
        record.add("u6", 0, "10.0.0.1:10", 7.0)  # after a quiet spell: at once
        record.add("u7", 0, "10.0.0.1:11", 7.0)
        record.stop()
        assert not clock.getDelayedCalls()
    events = logs.esf("logged_on")
    assert counts() == [1, 3, 1, 1, 1, 1]
    assert [u for e in events for u, _, _, _ in e["logons"]] == [f"u{i}" for i in range(8)]
    assert logs.messages()[0] == "logged on: u0/0 from 10.0.0.1:1"
    assert logs.messages()[1] == (
        "logged on (3): u1/1 from 10.0.0.1:2, u2/1 from 10.0.0.1:3, u3/1 from 10.0.0.1:4"
    )


def test_logon_storm_costs_one_event_per_batch():
    """
    200 logons in a burst make a handful of log events, not 200.
    """
    engine = make_engine()
    with LogCapture() as logs:
        for i in range(200):
            connect(engine, f"u{i}", host=f"10.0.{i // 250}.{i % 250 + 1}")
        engine.clock.advance(1)
    events = logs.esf("logged_on")
    assert sum(e["count"] for e in events) == 200
    assert [e["count"] for e in events] == [1, 100, 99]  # the first at once


def test_logons_waiting_to_be_logged_are_logged_when_the_engine_stops():
    """
    A server stopped within a second of a burst of logons still records
    every one of them.
    """
    engine = make_engine()
    with LogCapture() as logs:
        for i in range(3):
            connect(engine, f"u{i}")
        assert sum(e["count"] for e in logs.esf("logged_on")) == 1  # the others wait
        engine.stop()
    events = logs.esf("logged_on")
    assert [u for e in events for u, _, _, _ in e["logons"]] == ["u0", "u1", "u2"]


def test_when_writable_fires_once_the_peer_drains_or_the_session_ends():
    """
    Output.when_writable: at once for a peer that is not behind; for one
    that is, when it drains, or when its session ends (nobody waits for
    ever on a peer that is gone).
    """
    engine = make_engine()
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    (session,) = [s for s in engine.sessions if s.user_id == "alice"]
    assert session.when_writable().called
    alice.protocol.pauseProducing()  # as the transport does when its buffer is full
    drained = session.when_writable()
    assert not drained.called
    alice.protocol.resumeProducing()
    assert drained.called
    (other,) = [s for s in engine.sessions if s.user_id == "bob"]
    bob.protocol.pauseProducing()
    ended = other.when_writable()
    bob.lose()
    assert ended.called
