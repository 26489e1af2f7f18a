"""
Tests of the cluster's parts that need no Redis: the presence mirror fed
made-up presence stream entries, the inbox records, and what the presence
does on a L{task.Clock} about what the stream did to its own sessions.
"""

from __future__ import annotations

import collections
import types

import pytest
from _helpers import LogCapture
from twisted.internet import task
from twisted.internet.defer import Deferred, fail
from zope.interface import implementer

from esf import DisconnectedType, MessageType, UserData
from esf.cluster import _delivery
from esf.cluster._delivery import LocalSessions
from esf.cluster._link import IRedisLink, NotSent, RedisUnavailable
from esf.cluster._messaging import RemoteHandle
from esf.cluster._mirror import PresenceMirror, Released, Replaced
from esf.cluster._presence import ClusterPresence
from esf.cluster._records import (
    BACKED_UP,
    Answer,
    Behind,
    Failed,
    Holder,
    Kick,
    KickOut,
    Notify,
    Probe,
    Probed,
    PushOut,
    Query,
    Send,
    SendMany,
    Stored,
    decode_records,
)
from esf.interfaces import IDeviceHandle


@implementer(IDeviceHandle)
class Device:
    """
    One of this node's sessions, recording its kicks.
    """

    def __init__(self, node: str, user_id: str, session_id: str, client_type: int = 0):
        self.node = node
        self.user_id = user_id
        self.client_type = client_type
        self.session_id = session_id
        self.logon_order = 1
        self.user_data = UserData(user_id, client_type, "10.0.0.1:5000", 1.0)
        self.kicked: list[tuple[DisconnectedType, str]] = []

    def send(self, data):
        pass

    def notify(self, message_type, body=b"", client_type=0):
        pass

    def kick(self, reason, text):
        self.kicked.append((reason, text))


def value(session_id: str, node: str, logon_time: float = 1.0) -> bytes:
    return Holder(session_id, node, logon_time, "10.0.0.2:6000").encode()


def claimed(user: str, kind: int, session_id: str, node: str, logon_time: float = 1.0) -> list:
    return [
        b"u",
        user.encode(),
        b"c",
        str(kind).encode(),
        b"v",
        value(session_id, node, logon_time),
    ]


def released(user: str, kind: int, session_id: str) -> list:
    return [b"u", user.encode(), b"c", str(kind).encode(), b"d", session_id.encode()]


def make_mirror(node: str = "a"):
    local: dict = {}
    reports: list = []
    posted: list = []
    mirror = PresenceMirror(
        node,
        local,
        lambda user, kind, holder: RemoteHandle(user, kind, holder, lambda *a: posted.append(a)),
        reports.append,
    )
    return mirror, local, reports


# -- the mirror ---------------------------------------------------------------------


def test_mirror_applies_claims_and_releases_in_order():
    mirror, _, reports = make_mirror()
    mirror.apply(
        [
            (b"1-0", claimed("bob", 0, "b/1", "b")),
            (b"1-1", claimed("alice", 0, "b/2", "b")),
            (b"2-0", claimed("alice", 1, "c/1", "c")),
        ]
    )
    assert mirror.user_ids() == ["alice", "bob"] and mirror.user_count() == 2
    [phone, desk] = mirror.devices("alice")
    assert isinstance(phone, RemoteHandle) and (phone.node, phone.session_id) == ("b", "b/2")
    assert (desk.node, desk.client_type) == ("c", 1)
    mirror.apply([(b"3-0", released("alice", 0, "b/2"))])
    assert [h.session_id for h in mirror.devices("alice")] == ["c/1"]
    mirror.apply([(b"3-1", released("bob", 0, "b/1"))])
    assert mirror.user_ids() == ["alice"] and mirror.get("bob", 0) is None
    assert mirror.position == b"3-1" and reports == []


def test_a_bad_change_is_skipped_alone():
    # One entry holds a turn's changes: one that cannot be read (a user ID
    # that is not UTF-8, a field that is not a change) costs only itself,
    # and one log event for the entry.
    mirror, _, _ = make_mirror()
    entry = (
        claimed("bob", 0, "b/1", "b")
        + [b"u", b"\xff", b"c", b"0", b"v", value("b/2", "b", 1.0)]
        + [b"u", b"carl", b"c", b"0", b"x", b"?"]
        + claimed("alice", 0, "b/3", "b")
    )
    with LogCapture() as logs:
        mirror.apply([(b"1-0", entry)])
    assert mirror.user_ids() == ["alice", "bob"]
    assert len(logs.failures()) == 1
    assert mirror.position == b"1-0"


def test_mirror_keeps_one_handle_per_remote_session():
    mirror, _, _ = make_mirror()
    mirror.apply([(b"1-0", claimed("bob", 0, "b/1", "b"))])
    first = mirror.get("bob", 0)
    mirror.apply([(b"2-0", claimed("bob", 0, "b/1", "b"))])  # applied again (a snapshot's overlap)
    assert mirror.get("bob", 0) is first and len(mirror.devices("bob")) == 1


def test_mirror_skips_entries_it_has_applied():
    mirror, _, _ = make_mirror()
    mirror.apply([(b"5-0", claimed("bob", 0, "b/1", "b"))])
    mirror.apply([(b"4-0", released("bob", 0, "b/1")), (b"5-0", released("bob", 0, "b/1"))])
    assert mirror.get("bob", 0).session_id == "b/1"


def test_local_sessions_remember_the_kind_of_the_last_that_ended(monkeypatch):
    """
    A session popped from this node's sessions leaves its device kind
    behind, for the last few thousand only (the oldest forgotten first);
    one never held leaves nothing.
    """
    monkeypatch.setattr(_delivery, "_ENDED_KEPT", 3)
    local = LocalSessions()
    for n in range(5):
        local[f"s{n}"] = types.SimpleNamespace(client_type=n % 2)
    for n in range(5):
        assert local.pop(f"s{n}", None) is not None
    assert local.pop("never", None) is None
    assert local.ended == {"s2": 0, "s3": 1, "s4": 0}
    assert local == {}


def test_mirror_release_is_fenced_by_session():
    mirror, _, _ = make_mirror()
    mirror.apply([(b"1-0", claimed("bob", 0, "b/2", "b")), (b"2-0", released("bob", 0, "b/1"))])
    assert mirror.get("bob", 0).session_id == "b/2"


def test_mirror_reports_a_local_session_replaced_elsewhere():
    mirror, local, reports = make_mirror("a")
    mine = Device("a", "alice", "a/1")
    local[mine.session_id] = mine
    mirror.apply([(b"1-0", claimed("alice", 0, "a/1", "a"))])
    assert mirror.get("alice", 0) is mine and reports == []
    mirror.apply([(b"2-0", claimed("alice", 0, "b/9", "b"))])
    assert reports == [Replaced(mine)]
    assert mirror.get("alice", 0).session_id == "b/9" and not mirror.holds(mine)


def test_mirror_reports_a_local_session_released_behind_its_back():
    mirror, local, reports = make_mirror("a")
    mine = Device("a", "alice", "a/1")
    local[mine.session_id] = mine
    mirror.apply([(b"1-0", claimed("alice", 0, "a/1", "a"))])
    mirror.apply([(b"2-0", released("alice", 0, "a/1"))])
    assert reports == [Released(mine)] and mirror.get("alice", 0) is None


def test_mirror_report_acts_before_the_next_entry():
    """
    What the caller does about a report (here: show the session again, as
    a reclaim does) is in the mirror before the next entry is applied.
    """
    local: dict = {}
    mine = Device("a", "alice", "a/1")
    local[mine.session_id] = mine
    replaced = []

    def report(r):
        if isinstance(r, Released):
            mirror.put(r.handle.user_id, r.handle.client_type, r.handle)
        else:
            replaced.append(r.handle)

    mirror = PresenceMirror(
        "a", local, lambda u, k, h: RemoteHandle(u, k, h, lambda *a: None), report
    )
    mirror.apply(
        [
            (b"1-0", claimed("alice", 0, "a/1", "a")),
            (b"2-0", released("alice", 0, "a/1")),
            (b"3-0", claimed("alice", 0, "b/1", "b")),
        ]
    )
    assert replaced == [mine]


def test_mirror_ignores_a_session_of_its_own_node_that_is_gone():
    mirror, _, _ = make_mirror("a")
    mirror.apply([(b"1-0", claimed("alice", 0, "a/1", "a"))])
    assert mirror.get("alice", 0) is None and mirror.user_count() == 0


def test_mirror_change_ahead_of_the_stream_is_not_undone():
    """
    A claim's answer shows the device at once; older stream entries for it
    (released by an earlier session) do not undo it, nor does the entry of
    that very change.
    """
    mirror, local, _ = make_mirror("a")
    mine = Device("a", "alice", "a/2")
    local[mine.session_id] = mine
    mirror.apply([(b"1-0", claimed("alice", 0, "b/1", "b"))])
    assert mirror.note_ahead("alice", 0, b"3-0")
    mirror.put("alice", 0, mine)
    mirror.apply([(b"2-0", claimed("alice", 0, "b/9", "b"))])  # before the claim: skipped
    assert mirror.get("alice", 0) is mine and mirror.ahead == {("alice", 0): (3, 0, 1)}
    mirror.apply([(b"3-0", claimed("alice", 0, "a/2", "a"))])  # the claim itself
    assert mirror.get("alice", 0) is mine and mirror.ahead == {}
    mirror.apply([(b"4-0", released("alice", 0, "a/2"))])  # later: applied
    assert mirror.get("alice", 0) is None
    assert not mirror.note_ahead("alice", 0, b"4-0")  # the stream is there already


def test_mirror_applies_the_changes_of_one_entry_in_order():
    """
    The changes one node made in one reactor turn are one stream entry: a
    change noted ahead is placed within it, so that the same entry's
    earlier change of that device does not undo it, and its other
    changes apply.
    """
    mirror, local, reports = make_mirror("a")
    mine = Device("a", "alice", "a/2")
    local[mine.session_id] = mine
    assert mirror.note_ahead("alice", 0, b"3-0", 2)
    mirror.put("alice", 0, mine)
    mirror.apply(
        [
            (
                b"3-0",
                claimed("alice", 0, "b/1", "b")  # before the claim noted: skipped
                + claimed("alice", 0, "a/2", "a")  # the claim noted
                + claimed("bob", 1, "b/2", "b")
                + released("carol", 0, "c/1"),
            )
        ]
    )
    assert mirror.get("alice", 0) is mine and mirror.ahead == {}
    assert mirror.get("bob", 1).session_id == "b/2" and reports == []
    mirror.apply([(b"4-0", released("bob", 1, "b/2") + claimed("bob", 1, "b/3", "b"))])
    assert mirror.get("bob", 1).session_id == "b/3" and mirror.user_ids() == ["alice", "bob"]


def test_mirror_skips_a_bad_entry_and_goes_on():
    mirror, _, _ = make_mirror()
    mirror.apply(
        [
            (b"1-0", [b"u", b"bob", b"c", b"not a number", b"v", value("b/1", "b")]),
            (b"2-0", claimed("carol", 0, "b/2", "b")),
        ]
    )
    assert mirror.user_ids() == ["carol"] and mirror.position == b"2-0"


def test_mirror_load_orders_devices_by_logon_time():
    mirror, local, _ = make_mirror("a")
    mine = Device("a", "alice", "a/1", client_type=2)
    local[mine.session_id] = mine
    mirror.apply([(b"9-0", claimed("zed", 0, "b/5", "b"))])
    mirror.load(
        b"7-3",
        {
            "alice": {b"0": value("b/1", "b", 5.0), b"2": value("a/1", "a", 3.0)},
            "bob": {b"1": value("a/9", "a")},  # a session of this node that is gone
        },
    )
    assert [h.session_id for h in mirror.devices("alice")] == ["a/1", "b/1"]
    assert mirror.user_ids() == ["alice"] and (mirror.position, mirror.at) == (b"7-3", (7, 3))


def test_mirror_alone_shows_only_this_nodes_devices():
    mirror, local, _ = make_mirror("a")
    mine = Device("a", "alice", "a/1", client_type=1)
    local[mine.session_id] = mine
    mirror.apply(
        [
            (b"1-0", claimed("alice", 0, "b/1", "b")),
            (b"1-1", claimed("alice", 1, "a/1", "a")),
            (b"1-2", claimed("bob", 0, "b/2", "b")),
        ]
    )
    assert mirror.get("alice", 0, alone=True) is None
    assert mirror.devices("alice", alone=True) == (mine,)
    assert mirror.user_count(alone=True) == 1 and mirror.user_ids(alone=True) == ["alice"]
    assert mirror.user_count() == 2


class _Walked(dict):
    """
    A node's sessions by session ID that count the walks over them all.
    """

    walks = 0

    def values(self):
        self.walks += 1
        return super().values()

    def items(self):
        self.walks += 1
        return super().items()

    def __iter__(self):
        self.walks += 1
        return super().__iter__()


def test_the_online_list_alone_costs_its_answer_not_every_session():
    """
    While the node is alone (Redis away, or joining again), the count and
    the list of its online users are read from an index the mirror keeps,
    not made by walking all its sessions and sorting their users for every
    GetAllOnlineUsers (a page of one ID cost a walk and a sort of 20,000).
    """
    local = _Walked()
    mirror = PresenceMirror(
        "a", local, lambda user, kind, holder: RemoteHandle(user, kind, holder, print), [].append
    )
    mine = {f"u{i:05}": Device("a", f"u{i:05}", f"a/{i}") for i in range(2000)}
    for d in mine.values():
        local[d.session_id] = d
    mirror.load(b"1-0", {u: {b"0": value(d.session_id, "a")} for u, d in mine.items()})
    phone = Device("a", "u00003", "a/9000", client_type=1)
    local[phone.session_id] = phone
    mirror.apply(
        [
            (b"2-0", claimed("u00003", 1, "a/9000", "a")),  # a second device of one user
            (b"2-1", claimed("zed", 0, "b/1", "b")),  # another node's
            (b"2-2", claimed("u00001", 0, "b/2", "b")),  # replaced by another node's
            (b"2-3", released("u00002", 0, "a/2")),
            (b"2-4", released("u00003", 0, "a/3")),  # u00003 keeps its phone
        ]
    )
    local.walks = 0
    for _ in range(100):
        assert mirror.user_count(alone=True) == 1998
        assert mirror.user_ids(0, 2, alone=True) == ["u00000", "u00003"]
    assert local.walks == 0
    assert mirror.user_ids(1996, alone=True) == ["u01998", "u01999"]
    mirror.remove("u00003", 1, "a/9000")
    assert mirror.user_ids(0, 2, alone=True) == ["u00000", "u00004"]
    mirror.put("u00002", 0, local["a/2"])
    assert mirror.user_ids(0, 2, alone=True) == ["u00000", "u00002"]
    assert mirror.user_count(alone=True) == 1998 and mirror.user_count() == 2000


# -- records ------------------------------------------------------------------------


def test_records_round_trip_in_one_entry():
    records = [
        Send("b/1", b"\x00frame"),
        Notify("b/1", 7, b"body", 3),
        Kick("b/1", int(DisconnectedType.BEING_KICKED_OUT), "bye \u00e9"),
        PushOut("b/2", "10.0.0.9:1", "logged on again"),
        KickOut("b/2", "admin", "spam", "go away"),
        Query("b/3", 41, 30, "a", b"info"),
        Answer("b/3", 41, True, b"error body"),
        Failed("b/4", b"request"),
        Failed("b/4", b"request", BACKED_UP),
        Probe("b/5", 12, "a"),
        Probed("b/5", 12, True),
        Probed("b/6", 13, False),
        Behind("b/7", 500),
        SendMany(("b/8", "b/9", "b/10"), b"\x00one frame"),
        Stored("b/11", 255),
        Stored("b/12", 3),
    ]
    assert list(decode_records(b"".join(r.encode() for r in records))) == records


def test_remote_handle_posts_named_records_to_its_node():
    posted = []
    handle = RemoteHandle("bob", 1, Holder("n2/7", "n2", 1.0, "h:1"), lambda *a: posted.append(a))
    handle.send(b"frame")
    handle.notify(5, b"x", 2)
    handle.kick(DisconnectedType.BEING_KICKED_OUT, "bye")
    handle.ask(9, b"q", 0.5)
    assert posted == [
        ("n2", Send("n2/7", b"frame")),
        ("n2", Notify("n2/7", 5, b"x", 2)),
        ("n2", Kick("n2/7", int(DisconnectedType.BEING_KICKED_OUT), "bye")),
        ("n2", Query("n2/7", 9, 1, "", b"q")),  # the outbox names the asking node
    ]


# -- the presence, on a clock, without Redis ------------------------------------------


@implementer(IRedisLink)
class NoRedis:
    """
    A link that is never connected.
    """

    connected = False
    server = None

    def __init__(self, *args, **kwargs):
        pass

    def drop(self):
        pass

    def start(self, on_connected, on_lost):
        pass

    def stop(self):
        return fail(RedisUnavailable("no Redis"))

    def execute(self, *args, timeout=None):
        return fail(RedisUnavailable("no Redis"))

    def eval(self, script, keys, args):
        return fail(RedisUnavailable("no Redis"))

    def eval_unanswered(self, script, keys, args):
        raise NotSent("no Redis")


def up_presence(node: str = "a"):
    clock = task.Clock()
    presence = ClusterPresence(
        clock, "redis://127.0.0.1:1/0", node, clock=clock, link_factory=NoRedis
    )
    presence.membership.up = True  # as if joined: the stream's entries apply
    return presence, clock


def stream_reply(presence, *entries) -> list:
    return [[presence.streams._b_stream, list(entries)]]


def test_replaced_session_ends_after_the_grace_if_no_push_out_came():
    presence, clock = up_presence()
    mine = Device("a", "alice", "a/1")
    presence.claims.local[mine.session_id] = mine
    generation = presence.membership.generation
    presence.streams.process(
        stream_reply(presence, (b"1-0", claimed("alice", 0, "a/1", "a"))), generation
    )
    presence.streams.process(
        stream_reply(presence, (b"2-0", claimed("alice", 0, "b/1", "b"))), generation
    )
    clock.advance(presence.push_out_grace - 0.01)
    assert mine.kicked == []
    clock.advance(0.01)
    assert [reason for reason, _ in mine.kicked] == [DisconnectedType.BEING_PUSHED_OUT]
    assert presence.stats["pushed_out_without_notice"] == 1


def test_replaced_session_that_was_released_meanwhile_is_left_alone():
    presence, clock = up_presence()
    mine = Device("a", "alice", "a/1")
    presence.claims.local[mine.session_id] = mine
    generation = presence.membership.generation
    presence.streams.process(
        stream_reply(presence, (b"1-0", claimed("alice", 0, "a/1", "a"))), generation
    )
    presence.streams.process(
        stream_reply(presence, (b"2-0", claimed("alice", 0, "b/1", "b"))), generation
    )
    del presence.claims.local[mine.session_id]  # the push-out came: the session ended
    clock.advance(presence.push_out_grace)
    assert mine.kicked == [] and presence.stats["pushed_out_without_notice"] == 0


def test_session_released_behind_its_back_is_shown_and_claimed_again():
    presence, _clock = up_presence()
    mine = Device("a", "alice", "a/1")
    presence.claims.local[mine.session_id] = mine
    generation = presence.membership.generation
    presence.streams.process(
        stream_reply(presence, (b"1-0", claimed("alice", 0, "a/1", "a"))), generation
    )
    presence.streams.process(
        stream_reply(presence, (b"2-0", released("alice", 0, "a/1"))), generation
    )
    assert presence.get("alice", 0) is mine
    assert presence.claims.unconfirmed == {"a/1"} and presence.stats["reclaimed"] == 1


def test_an_ended_session_is_shown_free_while_its_release_is_in_flight():
    # An inbox entry for alice read between her session's end and Redis's
    # answer to the release must find her offline (to keep a one-way
    # message for her), not online at the session that ended.
    presence, clock = up_presence()
    asked = []
    presence.link.eval = lambda script, keys, args: asked.append(args) or Deferred()
    mine = Device("a", "alice", "a/1")
    presence.claims.local[mine.session_id] = mine
    presence.streams.process(
        stream_reply(presence, (b"1-0", claimed("alice", 0, "a/1", "a"))),
        presence.membership.generation,
    )
    assert presence.devices("alice") == (mine,)
    presence.release(mine)
    clock.advance(0)  # the turn's changes go to Redis, which does not answer
    assert len(asked) == 1
    assert presence.devices("alice") == () and presence.get("alice", 0) is None


def test_a_session_that_logs_on_and_off_in_one_turn_is_not_shown_after_the_answer():
    # Its claim and its release go in one call; the claim's answer (the
    # first) must not show again the session its release let go.
    presence, clock = up_presence()
    calls = []
    presence.link.eval = lambda script, keys, args: calls.append(Deferred()) or calls[-1]
    mine = Device("a", "alice", "a/1")
    claimed_, released_ = presence.claim(mine, True), presence.release(mine)
    assert presence.devices("alice") == ()
    clock.advance(0)
    [call] = calls
    call.callback([b"5-0", [1, None, 1], [1, 1, 2]])  # claimed; released, the last
    assert result_of(claimed_).won and result_of(released_) is True
    assert presence.devices("alice") == () and presence.user_count() == 0


def result_of(d):
    got = []
    d.addBoth(got.append)
    [result] = got
    return result


def test_presence_entries_of_an_older_generation_are_not_applied():
    presence, _ = up_presence()
    old = presence.membership.generation
    presence.membership.generation += 1  # the mirror was reloaded since the read
    presence.streams.process(stream_reply(presence, (b"1-0", claimed("bob", 0, "b/1", "b"))), old)
    assert presence.get("bob", 0) is None


def test_alone_presence_reads_only_its_own_devices():
    presence, _ = up_presence()
    presence.streams.process(
        stream_reply(presence, (b"1-0", claimed("bob", 0, "b/1", "b"))),
        presence.membership.generation,
    )
    assert presence.get("bob", 0) is not None and presence.user_count() == 1
    presence.membership.alone("a test")
    assert presence.get("bob", 0) is None and presence.user_count() == 0 and not presence.up
    assert isinstance(presence.stats, collections.Counter)


# -- probes of a holder on another node ---------------------------------------------


def _probes(max_waiting=10_000):
    from esf.cluster._probes import Probes

    clock, posted = task.Clock(), []
    probes = Probes(
        clock,
        "a",
        post=lambda *a: posted.append(a),
        stats=collections.Counter(),
        max_waiting=max_waiting,
    )
    holder = RemoteHandle("bob", 1, Holder("n2/7", "n2", 1.0, "h:1"), lambda *a: None)
    return clock, posted, probes, holder


def test_a_probe_is_answered_by_the_holders_node():
    clock, posted, probes, holder = _probes()
    told = []
    probes.ask(holder).addCallback(told.append)
    ((node, probe),) = posted
    assert (node, probe.session_id, probe.asker) == ("n2", "n2/7", "a")
    probes.answered(probe.token, True)
    assert told == [True] and not probes.waiting and not clock.getDelayedCalls()
    probes.answered(probe.token, False)  # a second answer goes nowhere
    assert told == [True]


def test_a_probe_not_answered_in_time_says_so():
    clock, posted, probes, holder = _probes()
    told = []
    probes.ask(holder).addCallback(told.append)
    clock.advance(probes.seconds - 0.01)
    assert told == []
    clock.advance(0.01)
    assert told == [None] and probes.stats["probes_unanswered"] == 1
    probes.answered(posted[0][1].token, True)  # too late
    assert told == [None]


def test_probes_waiting_are_bounded():
    clock, posted, probes, holder = _probes(max_waiting=2)
    told = []
    for _ in range(3):
        probes.ask(holder).addCallback(told.append)
    assert told == [None] and len(posted) == 2 and len(probes.waiting) == 2
    probes.stop()
    assert told == [None, None, None] and not clock.getDelayedCalls()


def test_delivery_answers_a_probe_whether_or_not_the_session_is_here():
    from esf.cluster._delivery import Delivery

    posted, probed = [], []
    delivery = Delivery(
        {"b/1": object()},
        None,
        post=lambda *a: posted.append(a),
        lookup=lambda *a: None,
        devices=lambda user: (),
        probed=lambda *a: probed.append(a),
        behind=lambda *a: None,
        clock=task.Clock(),
        stats=collections.Counter(),
    )
    entry = b"".join(
        r.encode() for r in (Probe("b/1", 5, "a"), Probe("b/2", 6, "c"), Probed("a/3", 9, True))
    )
    delivery.deliver(entry)
    assert posted == [("a", Probed("b/1", 5, True)), ("c", Probed("b/2", 6, False))]
    assert probed == [(9, True)]


def test_an_outbox_refuses_sends_to_a_session_its_node_said_is_backed_up():
    """
    After L{Behind}, what is relayed to that session of another node is
    refused at once (L{REFUSED}), and posted nowhere, for the time the
    record says; notices and other sessions' frames go as before.
    """
    from esf.cluster._messaging import Outbox
    from esf.server._output import REFUSED

    clock = task.Clock()
    entries = []

    class Ledger:
        def append(self, node, entry, within=None, deliver_within=None, process=b""):
            entries.append((node, list(decode_records(entry))))
            return Deferred()

    outbox = Outbox(
        clock, "a", Ledger(), answered=lambda *a: None, lookup=lambda user, kind: None,
        stats=collections.Counter(), timeout=2.0, max_in_flight=100,
    )  # fmt: skip
    outbox.mark_behind("b/1", 0.5)
    assert outbox.post("b", Send("b/1", b"frame")) == REFUSED
    assert outbox.post("b", Notify("b/1", 1, b"", 0)) is None
    assert outbox.post("b", Send("b/2", b"other")) is None
    clock.advance(0.5)  # flushed; and the mark has ended
    assert outbox.post("b", Send("b/1", b"again")) is None
    clock.advance(0)
    assert entries == [
        ("b", [Notify("b/1", 1, b"", 0), Send("b/2", b"other")]),
        ("b", [Send("b/1", b"again")]),
    ]


def test_an_outbox_sends_one_frame_for_several_sessions_once_to_a_node_that_reads_it():
    """
    A Broadcast's copies for several sessions of one node, one after
    another, are one L{SendMany} when that node's process reads such
    records (its ledger says so: its token, which the append then checks),
    and as many L{Send}s when it does not (an older process, which would
    skip it); anything between ends the run.  The copies of any other frame
    (a Send to a user's devices) go one each, for any process: a janitor
    running an older esf must be able to answer or keep each.  What is in
    flight is counted exactly all the same.
    """
    from esf.cluster._messaging import Outbox

    clock = task.Clock()
    appends: list[tuple[str, list, Deferred]] = []

    class Ledger:
        def __init__(self):
            self.reads_many = {"b": b"0123456789abcdef:m"}

        def append(self, node, entry, within=None, deliver_within=None, process=b""):
            appends.append((node, list(decode_records(entry)), process, Deferred()))
            return appends[-1][3]

    outbox = Outbox(
        clock, "a", Ledger(), answered=lambda *a: None, lookup=lambda user, kind: None,
        stats=collections.Counter(), timeout=2.0, max_in_flight=100,
    )  # fmt: skip

    def head(message_type: MessageType) -> bytes:  # a frame's first four bytes
        return bytes((0xEE, 0)) + int(message_type).to_bytes(2, "little")

    frame = head(MessageType.BROADCAST) + b"one frame"
    other = head(MessageType.BROADCAST) + b"another"
    send = head(MessageType.SEND) + b"to a user's devices"
    for record in (
        Send("b/1", frame), Send("b/2", frame), Send("b/3", frame), Notify("b/1", 1, b"", 0),
        Send("b/4", frame), Send("b/5", frame), Send("b/6", other),
        Send("b/7", send), Send("b/8", send),
    ):  # fmt: skip
        outbox.post("b", record)
    outbox.post("c", Send("c/1", frame))
    outbox.post("c", Send("c/2", frame))
    assert outbox.in_flight == 11
    clock.advance(0)
    assert [(node, records, process) for node, records, process, _ in appends] == [
        (
            "b",
            [
                SendMany(("b/1", "b/2", "b/3"), frame),
                Notify("b/1", 1, b"", 0),
                SendMany(("b/4", "b/5"), frame),
                Send("b/6", other),
                Send("b/7", send),
                Send("b/8", send),
            ],
            b"0123456789abcdef:m",
        ),
        ("c", [Send("c/1", frame), Send("c/2", frame)], b""),
    ]
    # Had b's process changed before the turn ended, a Send each, for any.
    outbox.post("b", Send("b/1", frame))
    outbox.post("b", Send("b/2", frame))
    del outbox.ledger.reads_many["b"]
    clock.advance(0)
    assert appends[-1][1:3] == ([Send("b/1", frame), Send("b/2", frame)], b"")
    for *_, d in appends:
        d.callback(b"1-1")
    assert (outbox.in_flight, outbox.in_flight_bytes) == (0, 0)


def test_a_node_delivers_one_frame_to_each_session_a_send_many_names():
    """
    Each session a L{SendMany} names gets the frame, fenced as a L{Send}
    of its own: one that ended is counted, the others get it.
    """
    from esf.cluster._delivery import Delivery

    class Taking(Device):
        def __init__(self, *args):
            super().__init__(*args)
            self.got: list[bytes] = []

        def send(self, data):
            self.got.append(data)

    one, two = Taking("b", "bob", "b/1"), Taking("b", "carol", "b/2")
    stats: collections.Counter[str] = collections.Counter()
    local = LocalSessions()
    local.update({"b/1": one, "b/2": two})
    delivery = Delivery(
        local, None, post=lambda *a: None, lookup=lambda *a: None,
        devices=lambda user: (), probed=lambda *a: None, behind=lambda *a: None,
        clock=task.Clock(), stats=stats,
    )  # fmt: skip
    delivery.deliver(SendMany(("b/1", "b/9", "b/2"), b"frame").encode())
    assert (one.got, two.got) == ([b"frame"], [b"frame"])
    assert (stats["inbox_delivered"], stats["inbox_fenced"]) == (2, 1)


def test_a_record_that_fails_is_its_own_the_others_of_its_entry_are_delivered():
    """
    A record whose delivery raises (one session's fault) is logged, once;
    the records after it in the same inbox entry, other sessions', are
    delivered all the same.
    """
    from esf.cluster._delivery import Delivery

    class Taking(Device):
        def __init__(self, *args, broken=False):
            super().__init__(*args)
            self.got: list[bytes] = []
            self.broken = broken

        def send(self, data):
            if self.broken:
                raise RuntimeError("broken")
            self.got.append(data)

    one, bad, two = (
        Taking("b", "bob", "b/1"), Taking("b", "eve", "b/2", broken=True),
        Taking("b", "carol", "b/3"),
    )  # fmt: skip
    stats: collections.Counter[str] = collections.Counter()
    local = LocalSessions()
    local.update({"b/1": one, "b/2": bad, "b/3": two})
    delivery = Delivery(
        local, None, post=lambda *a: None, lookup=lambda *a: None,
        devices=lambda user: (), probed=lambda *a: None, behind=lambda *a: None,
        clock=task.Clock(), stats=stats,
    )  # fmt: skip
    entry = b"".join(Send(sid, b"frame " + sid.encode()).encode() for sid in ("b/1", "b/2", "b/3"))
    with LogCapture() as logged:
        delivery.deliver(entry)
    assert (one.got, two.got) == ([b"frame b/1"], [b"frame b/3"])
    assert stats["inbox_delivered"] == 2
    assert [e["session"] for e in logged.failures()] == ["b/2"]


def test_an_outbox_holds_its_senders_back_while_redis_is_behind():
    """
    Past L{_IN_FLIGHT_HIGH} bytes that Redis has not taken, a relayed frame
    is still sent but answers L{PUSH_BACK}: its sender is held back (once)
    until Redis has taken all but L{_IN_FLIGHT_LOW} (or the appends
    failed), so that one sender's traffic does not queue up in Redis ahead
    of everyone's.
    """
    from esf.cluster._messaging import _IN_FLIGHT_HIGH, _IN_FLIGHT_LOW, Outbox
    from esf.server._output import PUSH_BACK

    clock = task.Clock()
    appends: list[Deferred] = []

    class Ledger:
        def append(self, node, entry, within=None, deliver_within=None, process=b""):
            appends.append(Deferred())
            return appends[-1]

        def refused(self, node, count, why):
            pass

    class Sender:
        held = 0

        def hold_back(self):
            self.held += 1

        def let_go(self):
            self.held -= 1

    outbox = Outbox(
        clock, "a", Ledger(), answered=lambda *a: None, lookup=lambda user, kind: None,
        stats=collections.Counter(), timeout=2.0, max_in_flight=10_000,
    )  # fmt: skip
    handle = RemoteHandle("bob", 0, Holder("b/1", "b", 0.0, ""), outbox.post, outbox.hold)
    sender = Sender()
    chunk = bytes(100_000)
    statuses = []
    while outbox.in_flight_bytes <= _IN_FLIGHT_HIGH:
        statuses.append(handle.send(chunk))
        clock.advance(0)  # one append each
    assert set(statuses[:-1]) == {None} and statuses[-1] == PUSH_BACK
    handle.push_back(sender)
    handle.push_back(sender)  # held once
    assert sender.held == 1
    # Notices are never pushed back on.
    assert outbox.post("b", Notify("b/1", 1, b"", 0)) is None
    clock.advance(0)
    # Redis takes the oldest appends, or they fail (a hung Redis: at the
    # call's timeout): the sender reads again once no more than the low
    # mark is left.
    for n, d in enumerate(appends):
        if outbox.in_flight_bytes <= _IN_FLIGHT_LOW:
            break
        assert sender.held == 1
        if n % 2:
            d.errback(RedisUnavailable("Redis did not answer in time"))
        else:
            d.callback(b"1-1")
    assert sender.held == 0
    assert outbox.in_flight_bytes <= _IN_FLIGHT_LOW
    clock.advance(10)  # the failed appends' senders told (none here)


def test_a_node_tells_a_senders_node_its_session_is_backed_up_at_most_twice_a_mark():
    """
    A session of this node that refuses what another node relays to it
    (backed up): the sender's node is told (L{Behind}) at once, then at
    most once every half of L{BEHIND_SECONDS} while it goes on refusing,
    whatever the number of frames refused; a sender of this node is not
    (its relay holds it back itself).
    """
    from esf.cluster._delivery import Delivery
    from esf.cluster._messaging import BEHIND_SECONDS
    from esf.wire._frames import MessageType, WireConfig, encode_frame

    clock = task.Clock()
    posted, marked = [], []

    class Refusing(Device):
        def send_from_node(self, data):
            return True

    bob = Refusing("b", "bob", "b/1")
    senders = {
        "alice": RemoteHandle("alice", 0, Holder("a/7", "a", 0.0, ""), lambda *a: None),
        "carol": Device("b", "carol", "b/2"),
    }
    delivery = Delivery(
        {"b/1": bob},
        None,
        post=lambda *a: posted.append(a),
        lookup=lambda user, kind: senders.get(user),
        devices=lambda user: (),
        probed=lambda *a: None,
        behind=lambda *a: marked.append(a),
        clock=clock,
        stats=collections.Counter(),
    )
    delivery.wire = wire = WireConfig()

    def relayed(user):
        frame = encode_frame(
            wire, MessageType.SEND, b"\x01\x00\x00\x00hi", user_id=user, dest_user_id="bob"
        )
        return Send("b/1", frame).encode()

    for _ in range(3):
        delivery.deliver(relayed("alice") + relayed("carol"))
    assert posted == [("a", Behind("b/1", int(BEHIND_SECONDS * 1000)))]
    clock.advance(BEHIND_SECONDS / 2)
    delivery.deliver(relayed("alice"))
    assert len(posted) == 2
    # Told: the node that sent marks the session.
    delivery.deliver(Behind("c/4", 500).encode())
    assert marked == [("c/4", 0.5)]


class SenderDevice(Device):
    """A local session that records what it is told was not delivered."""

    def __init__(self, *args):
        super().__init__(*args)
        self.told: list = []

    def not_delivered(self, frame, code, text):
        self.told.append((frame.message_id, code, text))


def test_an_append_that_failed_early_is_answered_timeout_once_its_outcome_is_settled():
    from twisted.internet.defer import Deferred

    from esf.cluster._messaging import Outbox
    from esf.wire._frames import ErrorCode, MessageType, WireConfig, encode_frame

    clock = task.Clock()
    appends: list[Deferred] = []

    class Ledger:
        def append(self, node, entry, within=None, deliver_within=None, process=b""):
            appends.append(Deferred())
            assert (within, deliver_within) == (1.0, 1.5)
            return appends[-1]

        def refused(self, node, count, why):
            pass

    alice = SenderDevice("a", "alice", "a/1")
    outbox = Outbox(
        clock, "a", Ledger(), answered=lambda *a: None, lookup=lambda user, kind: alice,
        stats=collections.Counter(), timeout=2.0, max_in_flight=10,
    )  # fmt: skip
    outbox.wire = wire = WireConfig()
    frame = encode_frame(
        wire, MessageType.SEND_CERTAINLY, b"\x01\x00\x00\x00hi", message_id=7,
        user_id="alice", dest_user_id="bob",
    )  # fmt: skip
    for _ in range(2):
        outbox.post("b", Send("b/1", frame))
        clock.advance(0)  # flushed
    # The connection drops 0.1 s later (another call timed out): Redis may
    # still run the appends, so their senders wait until 2 s after each.
    clock.advance(0.1)
    for d in appends:
        d.errback(RedisUnavailable("lost connection"))
    assert alice.told == []
    clock.advance(1.89)
    assert alice.told == []
    clock.advance(0.01)
    assert [(i, code) for i, code, _ in alice.told] == [(7, ErrorCode.TIMEOUT)] * 2
    assert "delivered by now or never will be" in alice.told[0][2]
    assert not clock.getDelayedCalls()
    # One that fails once settled is told at once; the node leaving tells
    # what still waits at once.
    outbox.post("b", Send("b/1", frame))
    clock.advance(0)
    clock.advance(2.0)
    appends[-1].errback(RedisUnavailable("timed out"))
    assert len(alice.told) == 3
    outbox.post("b", Send("b/1", frame))
    clock.advance(0)
    appends[-1].errback(RedisUnavailable("lost connection"))
    assert len(alice.told) == 3
    outbox.stop()
    assert len(alice.told) == 4 and not clock.getDelayedCalls()
    # One never sent (no connection) surely never runs: told at once.
    outbox.post("b", Send("b/1", frame))
    clock.advance(0)
    appends[-1].errback(NotSent("not connected"))
    assert alice.told[-1][:2] == (7, ErrorCode.USER_OFFLINE) and len(alice.told) == 5
    assert "this node lost the cluster's Redis" in alice.told[-1][2]


# -- a call's bound (RedisLink) ---------------------------------------------------


class _Transport:
    def __init__(self):
        self.aborted = False

    def abortConnection(self):
        self.aborted = True


class _Protocol:
    """A txredisapi protocol's part the link uses: calls that wait."""

    def __init__(self):
        self.transport = _Transport()
        self.esf_received_at = 0.0
        self.calls = []

    def execute_command(self, *args, apply_timeout=True):
        from twisted.internet.defer import Deferred

        d = Deferred()
        self.calls.append(d)
        return d


def _link_on(clock):
    from esf.cluster._link import RedisLink, RedisURL

    link = RedisLink(clock, RedisURL.parse("redis://127.0.0.1:1/0"), timeout=2.0)
    link._protocol = protocol = _Protocol()
    return link, protocol


def test_a_call_redis_does_not_answer_fails_at_its_bound():
    clock = task.Clock()
    link, protocol = _link_on(clock)
    d = link.execute("PING")
    failures = []
    d.addErrback(failures.append)
    clock.advance(0)  # the turn that made the call ends: the command is written
    clock.advance(1.9)
    assert failures == [] and not protocol.transport.aborted
    clock.advance(0.1)  # then judged after the reactor's next look at I/O
    [failure] = failures
    assert failure.check(RedisUnavailable)
    assert "did not answer 'PING' within 2 s" in str(failure.value)
    assert protocol.transport.aborted  # a late answer is never taken for another's


def test_a_call_behind_answers_still_coming_waits_up_to_twice_its_bound():
    # The node was too busy to read what Redis answered in time: answers
    # still arrive, so the call is not failed yet; its own comes.
    clock = task.Clock()
    link, protocol = _link_on(clock)
    answered = link.execute("PING")
    clock.advance(0)
    clock.advance(1.9)
    protocol.esf_received_at = clock.seconds()  # answers to earlier calls
    clock.advance(0.1)
    assert not answered.called and not protocol.transport.aborted
    protocol.calls[0].callback(b"PONG")
    assert answered.result == b"PONG"
    assert clock.getDelayedCalls() == []
    # Another call whose answers keep coming, but not its own: failed at
    # twice its bound at the latest.
    waiting = link.execute("PING")
    failures = []
    waiting.addErrback(failures.append)
    clock.advance(0)
    started = clock.seconds()
    while not failures and clock.seconds() - started < 10:
        protocol.esf_received_at = clock.seconds()
        clock.advance(0.25)
    assert 2.0 < clock.seconds() - started <= 4.0
    [failure] = failures
    assert failure.check(RedisUnavailable) and protocol.transport.aborted


def test_a_call_made_in_a_long_turn_is_bounded_from_the_turns_end():
    """
    A reactor turn that runs longer than the bound (a node ending 10,000
    sessions at shutdown, each releasing its device) writes its calls only
    when it ends: their bound runs from then.  It ran from the call, and a
    node stopped with 10,000 sessions dropped its connection as the turn
    ended and could not leave the cluster.
    """
    clock = task.Clock()
    link, protocol = _link_on(clock)
    made = link.execute("EVALSHA")
    failures = []
    made.addErrback(failures.append)
    clock.advance(4.5)  # the turn that made it took 4.5 s
    clock.advance(1.9)
    assert failures == [] and not protocol.transport.aborted
    protocol.calls[0].callback(1)
    assert made.result == 1
    assert clock.getDelayedCalls() == []
    # Still bounded: from the turn's end.
    late = link.execute("EVALSHA")
    late.addErrback(failures.append)
    clock.advance(3.0)
    clock.advance(2.0)
    [failure] = failures
    assert "within 2 s" in str(failure.value) and protocol.transport.aborted


def test_the_link_parses_with_hiredis_on_cpython():
    """
    On CPython the cluster's extra brings hiredis, and the link's protocol
    is txredisapi's hiredis one: its pure-Python parser goes back to the
    reactor after every bulk string, and cost a cross-node message a
    quarter of its rate and a request 40% of its round trip.
    """
    import platform

    import txredisapi

    from esf.cluster._link import RedisLink, RedisURL, _LinkFactory

    if platform.python_implementation() != "CPython":
        pytest.skip("hiredis is CPython's only")
    link = RedisLink(task.Clock(), RedisURL.parse("redis://127.0.0.1:1/0"))
    protocol = _LinkFactory(link).buildProtocol(None)
    assert isinstance(protocol, txredisapi.HiredisProtocol)


def test_the_links_replies_are_what_txredisapi_would_hand_over():
    """
    The link's protocol hands replies over as its parser gives them: what
    txredisapi's own conversion gives with the link's settings (no
    charset, no number conversion), without copying every list.
    """
    import txredisapi

    from esf.cluster._link import RedisLink, RedisURL, _LinkFactory

    link = RedisLink(task.Clock(), RedisURL.parse("redis://127.0.0.1:1/0"))
    protocol = _LinkFactory(link).buildProtocol(None)
    theirs = txredisapi.BaseRedisProtocol(charset=None, convertNumbers=False)
    for reply in [
        b"OK",
        b"",
        b"12",
        b"1.5",
        7,
        None,
        [b"1-0", [b"u", b"\xc3\xbcser", b"c", b"0", b"v", b"n1/1\t1733450000.125"]],
        [[b"esf:stream", [[b"1-1", [b"u", b"a"]]]], [b"esf:inbox:b", []]],
        txredisapi.ResponseError("NOSCRIPT No matching script"),
    ]:
        ours = protocol.tryConvertData(reply)
        assert ours == theirs.tryConvertData(reply) or ours is reply, reply
        assert type(ours) is type(theirs.tryConvertData(reply))


def test_the_links_commands_are_encoded_as_txredisapi_would():
    """
    The link's own RESP encoder (faster than txredisapi's) writes what
    txredisapi's would, for every kind of argument the cluster passes.
    """
    import txredisapi

    from esf.cluster._link import encode_command

    theirs = txredisapi.BaseRedisProtocol(charset=None, convertNumbers=False)
    for args in [
        ("PING",),
        ("SET", "esf:lease:n1", "n1", "PX", 15000),
        ("EVALSHA", "0" * 40, 2, "esf:inbox:b", b"esf:ib:b", b"1-0", 10, b"\x00\xff\r\n", 0),
        ("HSET", "esf:u:\u00fcser", "0", 1733450000.125),
        ("XADD", bytearray(b"k"), b"v", -1, ""),
    ]:
        assert encode_command(*args) == theirs._build_command(*args), args
    # (txredisapi would send a memoryview's repr.)
    assert encode_command(memoryview(b"ab")) == b"*1\r\n$2\r\nab\r\n"


def test_scripts_go_to_redis_without_their_comments_on_the_same_lines():
    """
    What Redis gets of a Lua script has its comment lines emptied (they
    would go with every EVAL), and each line where the file has it, so
    that an error Redis reports names the file's line.
    """
    from importlib import resources

    from esf.cluster._link import script

    for path in resources.files("esf.cluster").joinpath("lua").iterdir():
        text = path.read_bytes().splitlines()
        sent = script(path.name.removesuffix(".lua")).splitlines()
        assert len(sent) == len(text), path.name
        for line, went in zip(text, sent):
            assert went == (b"" if line.lstrip().startswith(b"--") else line), path.name
        assert any(line.lstrip().startswith(b"--") for line in text), path.name


def test_deadlines_make_room_by_one_sweep_each_time_a_deadline_passes():
    """
    Full of keys that all still hold, a L{Deadlines} refuses a new key
    without walking them again until the first of their times passes
    (one sweep, not one per refused key); a key it holds may be moved on
    whatever its size.
    """
    from esf.cluster._messaging import Deadlines

    class Counted(Deadlines):
        sweeps = 0

        def items(self):
            self.sweeps += 1
            return super().items()

    marks = Counted(3)
    for key, until in (("a", 10.0), ("b", 12.0), ("c", 11.0)):
        assert marks.put(key, until, now=0.0)
    assert [marks.put(f"new{n}", 20.0, now=1.0 + n) for n in range(5)] == [False] * 5
    assert marks.sweeps == 1  # then none until a's time (10) passes
    assert marks.put("b", 30.0, now=5.0) and marks["b"] == 30.0  # held: moved on
    assert marks.put("d", 20.0, now=10.0)  # a's time passed: swept, room
    assert marks.sweeps == 2 and sorted(marks) == ["b", "c", "d"]
