"""
Two server engines in this process, each on a L{ClusterPresence} of the
same real redis-server: the engine's behaviour across nodes, seen through
in-memory connections (tests/_helpers.Client) and the user managers'
events.  Engine time is a L{task.Clock}; Redis runs on the real reactor.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest
import pytest_twisted
from _helpers import Client, logon_reply, record_events
from test_cluster import eventually, ledger, pause_reading, resume_reading
from test_fairness import REQUESTS
from test_fairness import stalled_mallory as stalled
from test_messages import Groups
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from zope.interface import implementer

from esf import (
    DisconnectedType,
    ErrorCode,
    LogonResult,
    MessageType,
    RelogonMode,
    RequestError,
    ServerConfig,
    ServerEngine,
)
from esf.cluster._messaging import BEHIND_SECONDS
from esf.cluster._presence import ClusterPresence
from esf.interfaces import IRelogonPolicy
from esf.offline import RedisOfflineStore
from esf.operations._metrics import ServerMetrics
from esf.server._counters import Count
from esf.wire import Error as ErrorWire
from esf.wire import Information

#: Long: the engines' clocks are task.Clocks, so a lease is refreshed only
#: when a test advances them, and a node whose lease expired is sent nothing.
LEASE = 30.0


class Node:
    def __init__(
        self,
        redis_server,
        node_id: str,
        config: ServerConfig | None = None,
        relogon_policy: Any = None,
        offline: bool = False,
        relay_policy: Any = None,
        **options,
    ):
        clock = task.Clock()
        config = config or ServerConfig()
        self.presence = ClusterPresence(
            reactor, redis_server.url, node_id, clock=clock, lease=LEASE, timeout=1.0, block=0.2,
            **options,
        )  # fmt: skip
        store = RedisOfflineStore(self.presence.link) if offline else None
        self.engine = ServerEngine(
            config, clock=clock, presence=self.presence, node_id=node_id,
            relogon_policy=relogon_policy, offline_store=store, relay_policy=relay_policy,
        )  # fmt: skip
        self.events = record_events(self.engine.user_manager)
        self.engine.start()
        self.presence.start()

    async def logon(self, user_id: str, client_type: int = 0) -> Client:
        client = Client(self.engine)
        client.logon(user_id, client_type)
        replies = await eventually(client.take, what=f"{user_id}'s Logon reply")
        assert [(r.message_type, r.body) for r in replies] == [
            (MessageType.LOGON, logon_reply(self.engine))
        ], replies
        return client


@pytest.fixture
def pair(redis_server):
    nodes = [Node(redis_server, "a"), Node(redis_server, "b")]
    yield nodes
    for node in nodes:
        node.engine.stop()
        pytest_twisted.blockon(Deferred.fromCoroutine(node.presence.stop()))


async def joined(*nodes):
    await eventually(lambda: all(n.presence.up for n in nodes), what="nodes join")


def names(events):
    return [e[0] for e in events]


@pytest_twisted.ensureDeferred
async def test_relay_and_events_across_engines(pair):
    a, b = pair
    await joined(a, b)
    alice = await a.logon("alice")
    bob = await b.logon("bob")
    await eventually(lambda: a.engine.user_manager.is_user_online("bob"))
    alice.send(MessageType.SEND, Information(1, b"\xff\x00hi"), dest="bob")
    [got] = await eventually(bob.take)
    assert (got.message_type, got.user_id, got.body) == (
        MessageType.SEND,
        "alice",
        Information(1, b"\xff\x00hi"),
    )
    # Each node fired its own user's events; the user count is cluster-wide.
    assert names(a.events) == ["device_connected", "user_connected", "user_count_changed"]
    assert a.engine.user_manager.user_count == b.engine.user_manager.user_count == 2
    assert a.engine.user_manager.get_online_user_list() == ["alice", "bob"]


@pytest_twisted.ensureDeferred
async def test_replace_old_across_engines(pair):
    a, b = pair
    await joined(a, b)
    old = await a.logon("alice", 1)
    await eventually(lambda: b.engine.user_manager.is_user_online("alice"))
    del a.events[:], b.events[:]
    new = await b.logon("alice", 1)
    frames = await eventually(lambda: old.closing and old.take())
    assert [f.message_type for f in frames] == [
        MessageType.BEING_PUSHED_OUT_NOTIFY,
        MessageType.DISCONNECT_NOTICE,
    ]
    assert frames[1].body.reason == DisconnectedType.BEING_PUSHED_OUT
    # The old session's node fired the push-out (with the new logon's
    # address) and saw its device go; the user never went offline.  The
    # new logon's node fired only its own device's event.
    await eventually(
        lambda: names(a.events) == ["device_being_pushed_out", "device_disconnected"],
        what=lambda: a.events,
    )
    assert a.events[0][1][0] == "alice" and a.events[0][2] == new.address
    assert a.events[1][2] == DisconnectedType.BEING_PUSHED_OUT
    assert names(b.events) == ["device_connected"]
    assert not new.closing
    assert [h.session_id for h in a.presence.devices("alice")] == [
        h.session_id for h in b.presence.devices("alice")
    ]


@implementer(IRelogonPolicy)
class Hub:
    """
    Operators (C{op-...}) keep their sessions, devices replace theirs.
    """

    def relogon_mode(self, user_id, client_type):
        if user_id.startswith("op-"):
            return RelogonMode.IGNORE_NEW
        return RelogonMode.REPLACE_OLD


@pytest.fixture
def hub_pair(redis_server):
    nodes = [Node(redis_server, n, relogon_policy=Hub()) for n in ("a", "b")]
    yield nodes
    for node in nodes:
        node.engine.stop()
        pytest_twisted.blockon(Deferred.fromCoroutine(node.presence.stop()))


@pytest_twisted.ensureDeferred
async def test_relogon_mode_per_user_across_engines(hub_pair):
    """
    The application's mode holds across nodes: a device's second logon at
    the other node pushes the first out; an operator's is refused there
    with HadLoggedOn, that node firing new_connection_ignored, and the
    first session stays.
    """
    a, b = hub_pair
    await joined(a, b)
    old_dev, old_op = await a.logon("dev-7"), await a.logon("op-ann")
    await eventually(
        lambda: b.presence.get("dev-7", 0) is not None and b.presence.get("op-ann", 0) is not None
    )
    del a.events[:], b.events[:]

    new_op = Client(b.engine)
    new_op.logon("op-ann")
    [reply, notice] = await eventually(lambda: new_op.closing and new_op.take())
    assert reply.message_type == MessageType.LOGON
    assert reply.body.result == LogonResult.HAD_LOGGED_ON
    assert old_op.address in reply.body.failure_cause
    assert notice.body.reason == DisconnectedType.NEW_CONNECTION_IGNORED
    assert b.events == [("new_connection_ignored", "op-ann", 0, new_op.address)]

    new_dev = await b.logon("dev-7")
    frames = await eventually(lambda: old_dev.closing and old_dev.take())
    assert [f.message_type for f in frames] == [
        MessageType.BEING_PUSHED_OUT_NOTIFY,
        MessageType.DISCONNECT_NOTICE,
    ]
    await eventually(
        lambda: (
            a.presence.get("dev-7", 0) is not None
            and a.presence.get("dev-7", 0).session_id == b.presence.get("dev-7", 0).session_id
        ),
        what="both mirrors show the new device",
    )
    assert b.presence.get("dev-7", 0) is b.engine.presence.get("dev-7", 0)
    assert not new_dev.closing
    assert not old_op.closing and old_op.take() == []
    assert "device_being_pushed_out" in names(a.events)
    assert "new_connection_ignored" not in names(a.events)


@pytest_twisted.ensureDeferred
async def test_relogon_mode_travels_with_the_claim(hub_pair):
    """
    Logons of one account at both nodes at the same moment, before either
    node's mirror can show the other's: Redis orders the claims, and the
    later one is settled by the mode it carries.  Each operator ends with
    one session and one HadLoggedOn, with no push-out; each device with
    one session, the other pushed out.
    """
    a, b = hub_pair
    await joined(a, b)
    users = [f"op-{i}" for i in range(10)] + [f"dev-{i}" for i in range(10)]
    clients = {}
    for user in users:
        clients[user] = (Client(a.engine), Client(b.engine))
        for client in clients[user]:
            client.logon(user)
    # Nothing was settled locally: every claim went to Redis unanswered.
    assert not any(c.transport.value() for pair in clients.values() for c in pair)

    def settled():
        return all(any(c.closing for c in pair) for pair in clients.values())

    await eventually(settled, what="one logon of each account ended")
    for user, pair in clients.items():
        frames = {c: c.take() for c in pair}
        [loser] = [c for c in pair if c.closing]
        [winner] = [c for c in pair if not c.closing]
        # Only its logon reply: the loser's session, briefly listed with it,
        # is the same device, never another one online (MyDeviceOnline).
        assert [(f.message_type, f.body.result) for f in frames[winner]] == [
            (MessageType.LOGON, LogonResult.SUCCEED)
        ], user
        if user.startswith("op-"):
            assert [f.message_type for f in frames[loser]] == [
                MessageType.LOGON,
                MessageType.DISCONNECT_NOTICE,
            ], user
            assert frames[loser][0].body.result == LogonResult.HAD_LOGGED_ON, user
        else:
            assert frames[loser][-1].body.reason == DisconnectedType.BEING_PUSHED_OUT, user
    # Each operator's refusal fired new_connection_ignored once, at the node
    # that refused it; only devices were pushed out.
    ignored = sorted(e[1] for n in (a, b) for e in n.events if e[0] == "new_connection_ignored")
    assert ignored == sorted(users[:10])
    pushed = [e[1][0] for n in (a, b) for e in n.events if e[0] == "device_being_pushed_out"]
    assert sorted(pushed) == sorted(users[10:])


@pytest_twisted.ensureDeferred
async def test_kick_out_from_the_other_engine(pair):
    a, b = pair
    await joined(a, b)
    # (record_events leaves device_kicked_out out: watch it here.)
    for node in (a, b):
        node.engine.user_manager.device_kicked_out.subscribe(
            lambda data, operator, reason, events=node.events: events.append(
                (
                    "device_kicked_out",
                    (data.user_id, data.client_type, data.address),
                    operator,
                    reason,
                )
            )
        )
    alice = await a.logon("alice")
    await eventually(lambda: b.engine.user_manager.is_user_online("alice"))
    assert b.engine.kick_out("alice", "spam \u2603", operator="carol") == 1
    frames = await eventually(lambda: alice.closing and alice.take())
    assert [f.message_type for f in frames] == [
        MessageType.BEING_KICKED_OUT_NOTIFY,
        MessageType.DISCONNECT_NOTICE,
    ]
    assert (frames[0].body.operator, frames[0].body.reason) == ("carol", "spam \u2603")
    assert frames[1].body.reason == DisconnectedType.BEING_KICKED_OUT
    await eventually(lambda: not b.engine.user_manager.is_user_online("alice"))
    # The kicked device's node fired device_kicked_out, before its
    # device_disconnected; the kicking node fired nothing.
    kicked = [e for e in a.events if e[0] == "device_kicked_out"]
    assert [(e[1][0], e[2], e[3]) for e in kicked] == [("alice", "carol", "spam \u2603")]
    await eventually(lambda: "device_disconnected" in names(a.events))
    assert names(a.events).index("device_kicked_out") < names(a.events).index(
        "device_disconnected"
    )
    assert "device_kicked_out" not in names(b.events)


@pytest_twisted.ensureDeferred
async def test_outage_answers_user_offline_at_once(pair, redis_server):
    a, b = pair
    await joined(a, b)
    alice, carol = await a.logon("alice"), await a.logon("carol")
    await b.logon("bob")
    await eventually(lambda: a.engine.user_manager.is_user_online("bob"))
    redis_server.stop()
    await eventually(lambda: not a.presence.up)
    alice.send(MessageType.REQUEST, Information(1, b"?"), dest="bob", message_id=7)
    [error] = alice.take()  # answered within the same call: nothing waits
    assert (error.message_type, error.message_id) == (MessageType.ERROR, 7)
    assert error.body.code == ErrorCode.USER_OFFLINE
    assert error.body.text == "bob is not reachable: this node lost the cluster's Redis"
    alice.send(MessageType.SEND, Information(1, b"local"), dest="carol")
    [got] = carol.take()
    assert got.message_type == MessageType.SEND


@pytest_twisted.ensureDeferred
async def test_takeover_flapping_between_nodes_is_refused_busy(redis_server):
    # Two takeovers per window: each node sees only one or two of the
    # device's takeovers, so only a cluster-wide count refuses the third.
    config = ServerConfig(takeover_limit=2, takeover_window=60, takeover_cooldown=30)
    a, b = Node(redis_server, "a", config), Node(redis_server, "b", config)
    try:
        await joined(a, b)
        held = await a.logon("alice", 1)
        for node in (b, a):
            old, held = held, await node.logon("alice", 1)
            await eventually(lambda old=old: old.closing, what="the old session pushed out")
        assert (
            a.engine.counters["takeovers_refused"] == b.engine.counters["takeovers_refused"] == 0
        )
        # The third takeover within the window, on b: refused Busy there,
        # though b itself took the device over only once.
        third = Client(b.engine)
        third.logon("alice", 1)
        [reply, notice] = await eventually(lambda: third.closing and third.take())
        assert reply.message_type == MessageType.LOGON
        assert reply.body.result == LogonResult.BUSY
        assert "across the cluster" in reply.body.failure_cause
        assert notice.message_type == MessageType.DISCONNECT_NOTICE
        assert b.engine.counters["takeovers_refused"] == 1
        assert not held.closing  # the holder keeps the device
        # The cooldown is in Redis: the other node refuses too.
        fourth = Client(a.engine)
        fourth.logon("alice", 1)
        [reply, _] = await eventually(lambda: fourth.closing and fourth.take())
        assert reply.body.result == LogonResult.BUSY
        assert a.engine.counters["takeovers_refused"] == 1
        assert not held.closing
        assert int(redis_server.command("PTTL", "esf:tb:alice\t1")[1:]) > 0
    finally:
        for node in (a, b):
            node.engine.stop()
            await Deferred.fromCoroutine(node.presence.stop())


@pytest_twisted.ensureDeferred
async def test_query_to_a_device_on_another_node(pair):
    a, b = pair
    await joined(a, b)
    bob = await b.logon("bob", 1)
    await eventually(lambda: a.engine.user_manager.is_user_online("bob"))
    # b's engine has a query of its own outstanding to bob: the forwarded
    # one must not be confused with it.
    own = b.engine.query("bob", 9, b"b's own")
    [b_request] = await eventually(bob.take)
    answer = a.engine.query("bob", 7, b"\xff\x00question")
    [request] = await eventually(bob.take, what="the forwarded Request")
    assert (request.message_type, request.user_id) == (MessageType.REQUEST, "_0")
    assert request.body == Information(7, b"\xff\x00question")
    assert request.message_id != b_request.message_id
    bob.send(MessageType.RESPONSE, Information(7, b"\xfe answer"), dest="_0",
             message_id=request.message_id)  # fmt: skip
    await eventually(lambda: answer.called, what="the answer forwarded back")
    assert await answer == b"\xfe answer"
    assert not own.called  # b's own query still waits for its own answer
    bob.send(MessageType.RESPONSE, Information(9, b"mine"), dest="_0",
             message_id=b_request.message_id)  # fmt: skip
    assert await own == b"mine"
    # An Error answer fails the asking node's Deferred with its code.
    failing = a.engine.query("bob", 8, b"?")
    [request] = await eventually(bob.take)
    bob.send(MessageType.ERROR, ErrorWire(MessageType.REQUEST, ErrorCode.HANDLER_ERROR, "no \u2603"), dest="_0",
             message_id=request.message_id)  # fmt: skip
    await eventually(lambda: failing.called, what="the Error forwarded back")
    with pytest.raises(RequestError) as caught:
        await failing
    assert (caught.value.code, caught.value.text) == (ErrorCode.HANDLER_ERROR, "no \u2603")
    # An answer repeated, or never asked for, goes nowhere.
    bob.send(MessageType.RESPONSE, Information(8, b"again"), dest="_0",
             message_id=request.message_id)  # fmt: skip
    assert b.engine.counters["unexpected_answers"] == 1
    assert b.presence.stats["answers_dropped"] == 0


@pytest_twisted.ensureDeferred
async def test_query_across_nodes_times_out_and_is_forgotten(pair):
    a, b = pair
    await joined(a, b)
    bob = await b.logon("bob", 1)
    await eventually(lambda: a.engine.user_manager.is_user_online("bob"))
    answer = a.engine.query("bob", 7, b"?", timeout=5)
    [request] = await eventually(bob.take)
    a.engine.clock.advance(5)
    with pytest.raises(RequestError) as caught:
        await answer
    assert caught.value.code == ErrorCode.TIMEOUT
    # The holder forgets it after the same time: a late answer is not sent.
    b.engine.clock.advance(5)
    bob.send(MessageType.RESPONSE, Information(7, b"late"), dest="_0",
             message_id=request.message_id)  # fmt: skip
    assert b.engine.counters["unexpected_answers"] == 1
    assert len(b.presence.queries.forwarded) == 0
    # The table is bounded: past max_forwarded the oldest is forgotten.
    b.presence.max_forwarded = 2
    for _ in range(3):
        a.engine.query("bob", 7, b"?")
    await eventually(lambda: b.presence.stats["queries_forgotten"] == 1, what="a bounded table")
    assert len(b.presence.queries.forwarded) == 2


@pytest_twisted.ensureDeferred
async def test_forged_answers_across_nodes_go_nowhere(pair):
    """
    alice (node a) asks bob (node b).  mallory, on b with bob and on a with
    alice, answers in bob's place with alice's MessageID: neither forgery
    reaches alice, each is counted, and bob's own answer still does.
    """
    a, b = pair
    await joined(a, b)
    alice = await a.logon("alice")
    bob = await b.logon("bob")
    mallory_b = await b.logon("mallory")
    mallory_a = await a.logon("mallory", 1)
    await eventually(
        lambda: (
            a.engine.user_manager.is_user_online("bob")
            and b.engine.user_manager.is_user_online("alice")
        )
    )
    alice.send(MessageType.REQUEST, Information(3, b"?"), dest="bob", message_id=41)
    [request] = await eventually(bob.take, what="alice's Request at bob")
    assert (request.user_id, request.message_id) == ("alice", 41)
    for mallory in (mallory_b, mallory_a):
        mallory.send(MessageType.RESPONSE, Information(3, b"forged"), dest="alice", message_id=41)
        mallory.send(MessageType.ACK, b"", dest="alice", message_id=41)
    await eventually(
        lambda: (
            a.engine.counters["unsolicited_answers"] + b.engine.counters["unsolicited_answers"]
            == 4
        ),
        what="four forgeries dropped",
    )
    assert alice.take() == []
    bob.send(MessageType.RESPONSE, Information(3, b"real"), dest="alice", message_id=41)
    [answer] = await eventually(alice.take, what="bob's answer at alice")
    assert (answer.user_id, answer.message_id, answer.body) == (
        "bob",
        41,
        Information(3, b"real"),
    )


async def used_memory(node) -> int:
    info = await node.presence.link.execute("INFO", "memory")
    [line] = [x for x in info.split(b"\r\n") if x.startswith(b"used_memory:")]
    return int(line.split(b":")[1])


@pytest_twisted.ensureDeferred
async def test_what_was_delivered_leaves_redis(pair, redis_server):
    """
    alice on a sends bob on b 40 Sends of 256 KiB; bob reads them all:
    Redis holds none of them afterwards (it held all 10 MiB, for good).
    """
    a, b = pair
    await joined(a, b)
    alice = await a.logon("alice")
    bob = await b.logon("bob")
    await eventually(lambda: a.engine.user_manager.is_user_online("bob"))
    before = await used_memory(b)
    payloads = [bytes([i]) * (256 * 1024) for i in range(40)]
    got: list = []
    for payload in payloads:
        alice.send(MessageType.SEND, Information(1, payload), dest="bob")
    await eventually(lambda: got.extend(bob.take()) or len(got) == 40, what=lambda: len(got))
    assert [f.body.payload for f in got] == payloads
    await b.presence.inbox.settled()  # deleted before the next read, or now
    usage = await b.presence.link.execute("MEMORY", "USAGE", "esf:inbox:b")
    assert usage is None or int(usage) < 4096, usage
    assert ledger(redis_server, "b") == (0, 0)
    assert await used_memory(b) - before < 1024 * 1024


@pytest_twisted.ensureDeferred
async def test_a_full_inbox_answers_the_sender(redis_server):
    a, b = Node(redis_server, "a"), Node(redis_server, "b", inbox_bytes=1024 * 1024)
    try:
        await joined(a, b)
        alice = await a.logon("alice")
        bob = await b.logon("bob")
        await eventually(lambda: a.engine.user_manager.is_user_online("bob"))
        await pause_reading(b.presence)  # b falls behind
        for i in range(4):  # one entry each; three fit in b's 1 MiB
            alice.send(MessageType.SEND, Information(1, bytes([i]) * 300_000), dest="bob")
        await a.presence.link.execute("PING")  # a's appends are answered
        assert a.engine.counters["dropped"] == 1  # the one-way Send refused
        big = b"?" * 300_000  # no room left for it
        alice.send(MessageType.SEND_CERTAINLY, Information(1, big), dest="bob", message_id=7)
        alice.send(MessageType.REQUEST, Information(1, big), dest="bob", message_id=8)
        a.presence.outbox.flush()
        await a.presence.link.execute("PING")
        errors = alice.take()
        assert [(e.message_type, e.message_id, e.body.code) for e in errors] == [
            (MessageType.ERROR, 7, ErrorCode.RATE_LIMITED),
            (MessageType.ERROR, 8, ErrorCode.RATE_LIMITED),
        ]
        assert errors[0].body.request_message_type == MessageType.SEND_CERTAINLY
        assert not alice.protocol.session.asked  # their request slots are free again
        assert errors[0].body.text == (
            "bob is not reachable now: the node that holds it is behind "
            "(its cluster inbox is full); try later"
        )
        # The server's own query to bob fails at once, the same way.
        query = a.engine.query("bob", 3, big)
        a.presence.outbox.flush()
        await a.presence.link.execute("PING")
        with pytest.raises(RequestError) as caught:
            await query
        assert caught.value.code == ErrorCode.RATE_LIMITED
        assert a.presence.stats["inbox_refused"] == 4
        metrics = {m.name: m for m in ServerMetrics(a.engine).collect()}
        [sample] = metrics["esf_cluster_inbox_refused"].samples
        assert sample.value == 4
        b.engine.clock.advance(LEASE / 3)  # b's upkeep: it fell behind
        await eventually(lambda: b.presence.stats["inbox_full"] == 4)
        metrics = {m.name: m for m in ServerMetrics(b.engine).collect()}
        assert metrics["esf_cluster_inbox_full"].samples[0].value == 4
        # b reads again: what was kept arrives, in order.
        resume_reading(b.presence)
        got: list = []
        await eventually(lambda: got.extend(bob.take()) or len(got) == 3, what=lambda: got)
        assert [f.body.payload[:1] for f in got] == [b"\x00", b"\x01", b"\x02"]
    finally:
        for node in (a, b):
            node.engine.stop()
            await Deferred.fromCoroutine(node.presence.stop())


async def stop_nodes(*nodes):
    for node in nodes:
        node.engine.stop()
        await Deferred.fromCoroutine(node.presence.stop())


@pytest_twisted.ensureDeferred
async def test_a_broadcast_to_many_members_of_another_node_goes_through_redis_once(redis_server):
    """
    The copies of a Broadcast for 20 members of another node are one
    inbox record naming their sessions, the frame once (20 copies before):
    every member gets it.  Such a record is for the process that said it
    reads it, and refused if another holds the node's lease by then; a
    node whose process does not say so (an older esf: its lease's token
    without the mark) is sent a record per member, as before.
    """
    a, b = Node(redis_server, "a"), Node(redis_server, "b")
    try:
        names = [f"m{i}" for i in range(20)]
        a.engine.group_manager = Groups({"crowd": ["alice", *names]})
        await joined(a, b)
        alice = await a.logon("alice")
        members = [await b.logon(name) for name in names]
        await eventually(lambda: all(a.engine.user_manager.is_user_online(n) for n in names))
        # a learns what b reads with its first append there.
        alice.send(MessageType.SEND, Information(1, b"hi"), dest="m0")
        await eventually(members[0].take, what="m0's Send")
        token = await a.presence.link.execute("GET", "esf:lease:b")
        assert a.presence.inbox.reads_many["b"] == token
        await pause_reading(b.presence)
        body = Information(3, bytes(10_000))
        alice.send(MessageType.BROADCAST, body, dest="crowd", message_id=9)
        a.presence.outbox.flush()
        await a.presence.link.execute("PING")
        entries, held = ledger(redis_server, "b")
        assert entries == 1 and 10_000 < held < 11_000  # (200 KB as 20 copies)
        resume_reading(b.presence)
        for member in members:
            got = await eventually(member.take, what="each member's copy")
            assert [(f.message_type, f.body) for f in got] == [(MessageType.BROADCAST, body)]
        # Another process holds b's lease by the time the record comes
        # (its sessions are not these): refused, as for a node that stopped.
        await pause_reading(b.presence)
        await a.presence.link.execute("SET", "esf:lease:b", b"another:m", "KEEPTTL")
        stale = a.presence.stats["inbox_stale"]
        alice.send(MessageType.BROADCAST, body, dest="crowd", message_id=10)
        a.presence.outbox.flush()
        await a.presence.link.execute("PING")
        assert a.presence.stats["inbox_stale"] == stale + 20
        assert "b" not in a.presence.inbox.reads_many
        # An older process at b: told apart by its lease's token.
        await a.presence.link.execute("SET", "esf:lease:b", b"0123456789abcdef", "KEEPTTL")
        await a.presence.inbox.append("b", b"")
        assert "b" not in a.presence.inbox.reads_many
        await a.presence.link.execute("SET", "esf:lease:b", token, "KEEPTTL")
    finally:
        await stop_nodes(a, b)


@pytest.mark.parametrize("mode", [RelogonMode.REPLACE_OLD, RelogonMode.IGNORE_NEW])
@pytest_twisted.ensureDeferred
async def test_a_split_is_settled_by_the_logon_times(redis_server, mode):
    # Node a pauses with alice's device logged on; the janitor reaps it and
    # alice logs on again at b, later.  When a resumes it claims its session
    # again: replace-old keeps the later logon (b's), ignore-new the
    # earlier (a's).  Each logon's time is the one stored at its claim.
    config = ServerConfig(relogon_mode=mode)
    a, b = Node(redis_server, "a", config), Node(redis_server, "b", config)
    try:
        await joined(a, b)
        a.engine.clock.advance(100)
        b.engine.clock.advance(200)
        first = await a.logon("alice", 1)
        await eventually(lambda: b.engine.user_manager.is_user_online("alice"))
        await pause_reading(a.presence)
        assert await b.presence.membership.janitor.reap("a", force=True) == 1  # a's lease ran out
        await eventually(lambda: not b.engine.user_manager.is_user_online("alice"))
        second = await b.logon("alice", 1)
        resume_reading(a.presence)  # a comes back and claims alice again
        loser, winner = (first, second) if mode is RelogonMode.REPLACE_OLD else (second, first)
        frames = await eventually(lambda: loser.closing and loser.take(), what="the loser ends")
        expected = (
            DisconnectedType.BEING_PUSHED_OUT
            if mode is RelogonMode.REPLACE_OLD
            else DisconnectedType.NEW_CONNECTION_IGNORED
        )
        assert frames[-1].body.reason == expected
        await eventually(
            lambda: (
                [h.session_id for h in a.presence.devices("alice")]
                == [h.session_id for h in b.presence.devices("alice")]
                and len(a.presence.devices("alice")) == 1
            )
        )
        assert not winner.closing
        [holder] = b.presence.devices("alice")
        assert holder.user_data.logon_time == (200 if winner is second else 100)
    finally:
        await stop_nodes(a, b)


@pytest_twisted.ensureDeferred
async def test_a_node_whose_lease_expired_is_not_sent_to(pair, redis_server):
    # b stopped renewing its lease (dead or paused) and is not reaped yet:
    # what would go to its inbox is lost at the reap, so it is refused at
    # once and its senders told.
    a, b = pair
    await joined(a, b)
    alice = await a.logon("alice")
    bob = await b.logon("bob")
    await eventually(lambda: a.engine.user_manager.is_user_online("bob"))
    redis_server.command("DEL", "esf:lease:b")  # as when it ran out
    alice.send(MessageType.SEND_CERTAINLY, Information(1, b"hi"), dest="bob", message_id=7)
    [error] = await eventually(alice.take, what="alice is told")
    assert (error.message_type, error.message_id) == (MessageType.ERROR, 7)
    assert error.body.code == ErrorCode.USER_OFFLINE
    assert error.body.text == (
        "bob is not reachable: its node stopped answering (its cluster lease expired)"
    )
    assert a.presence.stats["inbox_stale"] == 1
    assert ledger(redis_server, "b")[0] == 0 and bob.take() == []


@pytest_twisted.ensureDeferred
async def test_a_hung_redis_fails_a_send_at_once_and_never_runs_it_later(pair, redis_server):
    # Redis hangs (SIGSTOP) while alice's message to bob's node is on its
    # way: alice is told within the bound, and the append, when Redis runs
    # it at last, is refused (its deadline passed): bob never gets it.
    a, b = pair
    await joined(a, b)
    alice = await a.logon("alice")
    bob = await b.logon("bob")
    await eventually(lambda: a.engine.user_manager.is_user_online("bob"))
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        alice.send(MessageType.SEND_CERTAINLY, Information(1, b"lost?"), dest="bob", message_id=7)
        started = time.monotonic()
        [error] = await eventually(alice.take, what="alice is told")
        # Told once the outcome is settled: the link's timeout (1 s here)
        # after it was sent.
        assert 0.9 < time.monotonic() - started < 1.6
        assert (error.message_type, error.message_id) == (MessageType.ERROR, 7)
        assert error.body.code == ErrorCode.TIMEOUT
        assert error.body.text == (
            "bob did not confirm in time: the cluster's Redis did not answer; the message "
            "was delivered by now or never will be"
        )
        # Counted where operators look.
        assert cluster_metric(a, "remote_send_failed_total") == 1
        await sleep(0.5)
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    await eventually(lambda: a.presence.up and b.presence.up, timeout=10)
    assert cluster_metric(a, "up") == 1
    await eventually(lambda: a.engine.user_manager.is_user_online("bob"))
    alice.send(MessageType.SEND_CERTAINLY, Information(1, b"after"), dest="bob", message_id=8)
    got = await eventually(bob.take, what=lambda: ("the later message arrives", alice.take()))
    assert [f.body.payload for f in got] == [b"after"]


def cluster_metric(node: Node, name: str) -> float:
    """
    The value of C{esf_cluster_<name>} that C{node}'s metrics show.
    """
    [sample] = [
        sample
        for family in ServerMetrics(node.engine).collect()
        for sample in family.samples
        if sample.name == f"esf_cluster_{name}"
    ]
    return sample.value


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_ignore_new_takes_a_device_whose_node_stopped_renewing(redis_server):
    # With ignore-new a live holder keeps its device; one whose node's
    # lease expired (dead or paused, not reaped yet) does not lock its user
    # out: the new logon takes the device, and the old session, should its
    # node come back, is ended.
    config = ServerConfig(relogon_mode=RelogonMode.IGNORE_NEW)
    a, b = Node(redis_server, "a", config), Node(redis_server, "b", config)
    try:
        await joined(a, b)
        old = await a.logon("alice", 1)
        await eventually(lambda: b.engine.user_manager.is_user_online("alice"))
        refused = Client(b.engine)
        refused.logon("alice", 1)
        replies = await eventually(refused.take, what="refused while a renews its lease")
        assert replies[0].body.result == LogonResult.HAD_LOGGED_ON
        redis_server.command("DEL", "esf:lease:a")  # as when it ran out
        new = await b.logon("alice", 1)  # asserts it succeeded
        a.engine.clock.advance(a.presence.push_out_grace)
        frames = await eventually(lambda: old.closing and old.take(), what="the old one ends")
        assert frames[-1].body.reason == DisconnectedType.BEING_PUSHED_OUT
        assert not new.closing
        await eventually(
            lambda: (
                [h.session_id for h in a.presence.devices("alice")]
                == [h.session_id for h in b.presence.devices("alice")]
                and len(b.presence.devices("alice")) == 1
            )
        )
    finally:
        await stop_nodes(a, b)


@pytest_twisted.ensureDeferred
async def test_requests_a_reaped_node_never_read_are_answered(redis_server):
    # b stops reading (paused) with requests from alice (node a) and carol
    # (node c) in its inbox; its lease runs out and a's janitor reaps it,
    # deleting its inbox: both senders are told, each at its own node.
    a, b, c = Node(redis_server, "a"), Node(redis_server, "b"), Node(redis_server, "c")
    try:
        await joined(a, b, c)
        alice, carol = await a.logon("alice"), await c.logon("carol")
        bob = await b.logon("bob")
        await eventually(
            lambda: (
                a.engine.user_manager.is_user_online("bob")
                and c.engine.user_manager.is_user_online("bob")
                and a.engine.user_manager.is_user_online("carol")
            )
        )
        await pause_reading(b.presence)
        alice.send(MessageType.SEND_CERTAINLY, Information(1, b"1"), dest="bob", message_id=7)
        alice.send(MessageType.SEND, Information(1, b"one-way"), dest="bob")
        carol.send(MessageType.REQUEST, Information(1, b"2"), dest="bob", message_id=9)
        await eventually(lambda: ledger(redis_server, "b")[0] == 2, what="both appended")
        redis_server.command("DEL", "esf:lease:b")  # as when it ran out
        a.presence.membership.janitor.page = 1  # the inbox is read page by page
        await a.presence.membership.janitor.run()
        expected = (
            "bob is not online: its node stopped answering and left the cluster "
            "before delivering this"
        )
        for client, message_id in ((alice, 7), (carol, 9)):
            [error] = await eventually(client.take, what=f"message {message_id}'s sender told")
            assert (error.message_type, error.message_id) == (MessageType.ERROR, message_id)
            assert (error.body.code, error.body.text) == (ErrorCode.USER_OFFLINE, expected)
        assert a.presence.stats["inbox_reaped"] == 2
        # No offline store: the one-way message is counted as dropped.
        assert a.presence.stats["inbox_dropped"] == 1
        metrics = {m.name: m for m in ServerMetrics(a.engine).collect()}
        assert metrics["esf_cluster_inbox_reaped"].samples[0].value == 2
        assert metrics["esf_cluster_inbox_dropped"].samples[0].value == 1
        assert bob.take() == []
        assert redis_server.reply("KEYS", "esf:reaped:*") == []  # all read, deleted
    finally:
        await stop_nodes(a, b, c)


@pytest_twisted.ensureDeferred
async def test_a_reaped_inbox_of_any_size_is_answered(redis_server):
    # 1,000 requests in 10 entries wait in b's inbox when it is reaped:
    # every sender is told, the entries read a page (here 3) at a time.
    a, b = Node(redis_server, "a"), Node(redis_server, "b")
    try:
        await joined(a, b)
        alice, bob = await a.logon("alice"), await b.logon("bob")
        await eventually(lambda: a.engine.user_manager.is_user_online("bob"))
        await pause_reading(b.presence)
        for n in range(1, 1001):
            alice.send(MessageType.SEND_CERTAINLY, Information(1, b"x"), dest="bob", message_id=n)
            if n % 100 == 0:  # an entry per reactor turn
                await deferLater(reactor, 0, lambda: None)
        await eventually(lambda: ledger(redis_server, "b")[0] == 10, what="all appended")
        a.presence.membership.janitor.page = 3
        await a.presence.membership.janitor.reap("b", force=True)
        errors = await eventually(alice.take, what="the senders told")
        assert sorted(e.message_id for e in errors) == list(range(1, 1001))
        assert {(e.message_type, e.body.code) for e in errors} == {
            (MessageType.ERROR, ErrorCode.USER_OFFLINE)
        }
        assert a.presence.stats["inbox_reaped"] == 1000
        assert bob.take() == []
        assert redis_server.reply("KEYS", "esf:reaped:*") == []
    finally:
        await stop_nodes(a, b)


async def logon_with_kept(node, user_id, count):
    """
    Log C{user_id} on at C{node}: the C{count} messages kept for them,
    which follow the Logon reply.
    """
    client = Client(node.engine)
    client.logon(user_id)
    got = []
    while len(got) < count + 1:
        got += await eventually(client.take, what=f"{user_id}'s kept messages")
    assert got[0].message_type == MessageType.LOGON and len(got) == count + 1, got
    return got[1:]


@pytest_twisted.ensureDeferred
async def test_one_way_messages_a_reaped_node_never_read_are_kept(redis_server):
    # With an offline store, the one-way messages b never read reach bob
    # at his next logon, in order, as if he had been offline when they
    # were sent; a request among them is answered (it asked to be).
    a, b = Node(redis_server, "a", offline=True), Node(redis_server, "b", offline=True)
    try:
        await joined(a, b)
        alice, _bob = await a.logon("alice"), await b.logon("bob")
        await eventually(lambda: a.engine.user_manager.is_user_online("bob"))
        await pause_reading(b.presence)
        # One read of three Sends: relayed as a run, one record.
        run = [alice.frame(MessageType.SEND, Information(1, b"one-way %d" % n), dest="bob")
               for n in range(3)]  # fmt: skip
        alice.send_raw(b"".join(run))
        alice.send(MessageType.SEND_CERTAINLY, Information(1, b"asked"), dest="bob", message_id=7)
        await eventually(lambda: ledger(redis_server, "b")[0] >= 1, what="appended")
        await a.presence.membership.janitor.reap("b", force=True)
        [error] = await eventually(alice.take, what="the request's sender told")
        assert (error.message_id, error.body.code) == (7, ErrorCode.USER_OFFLINE)
        await eventually(lambda: a.engine.counters["offline_stored"] == 3)
        assert a.presence.stats["inbox_kept"] == 3
        got = await logon_with_kept(a, "bob", 3)
        assert [(f.user_id, f.body.payload) for f in got] == [
            ("alice", b"one-way %d" % n) for n in range(3)
        ]
    finally:
        await stop_nodes(a, b)


@pytest_twisted.ensureDeferred
async def test_what_reaches_a_session_that_ended_is_not_lost_silently(redis_server):
    # bob's session on b ends while messages to him wait in b's inbox:
    # alice's request is answered UserOffline (no other device of bob's
    # could have it), her one-way message kept for bob's next logon.
    # A request to a user with another device online is left to it.
    a, b = Node(redis_server, "a", offline=True), Node(redis_server, "b", offline=True)
    try:
        await joined(a, b)
        alice, bob = await a.logon("alice"), await b.logon("bob")
        carol_pc, carol_phone = await b.logon("carol", 1), await a.logon("carol", 2)
        await eventually(lambda: len(a.presence.devices("carol")) == 2)
        await eventually(lambda: a.engine.user_manager.is_user_online("bob"))
        await pause_reading(b.presence)
        alice.send(MessageType.SEND_CERTAINLY, Information(1, b"asked"), dest="bob", message_id=7)
        alice.send(MessageType.SEND, Information(1, b"one-way"), dest="bob")
        alice.send(MessageType.REQUEST, Information(1, b"q"), dest="carol", message_id=8)
        await eventually(lambda: ledger(redis_server, "b")[0] >= 1, what="appended")
        [asked] = await eventually(carol_phone.take, what="carol's phone has the request")
        bob.lose()
        carol_pc.lose()
        resume_reading(b.presence)
        [error] = await eventually(alice.take, what="the request's sender told")
        assert (error.message_type, error.message_id) == (MessageType.ERROR, 7)
        assert (error.body.code, error.body.text) == (
            ErrorCode.USER_OFFLINE,
            "bob is not online: the session this went to ended before its node delivered it",
        )
        await eventually(lambda: b.presence.stats["inbox_kept"] == 1)
        assert b.presence.stats["inbox_ended_told"] == 1
        [kept] = await logon_with_kept(a, "bob", 1)
        assert (kept.user_id, kept.body.payload) == ("alice", b"one-way")
        carol_phone.send(MessageType.RESPONSE, asked.body, dest="alice", message_id=8)
        [answer] = await eventually(alice.take, what="carol's answer")
        assert (answer.message_type, answer.message_id) == (MessageType.RESPONSE, 8)
    finally:
        await stop_nodes(a, b)


@pytest_twisted.ensureDeferred
async def test_a_request_to_a_device_that_logged_on_again_in_flight_is_answered(redis_server):
    # alice's request to bob waits in b's inbox while bob's one device logs
    # off and on again at b: the new session never had it (nor any other
    # device of bob's), so alice is told UserOffline, not left to wait for
    # her client's timeout.
    a, b = Node(redis_server, "a"), Node(redis_server, "b")
    try:
        await joined(a, b)
        alice, bob = await a.logon("alice"), await b.logon("bob")
        await eventually(lambda: a.engine.user_manager.is_user_online("bob"))
        await pause_reading(b.presence)
        alice.send(MessageType.SEND_CERTAINLY, Information(1, b"asked"), dest="bob", message_id=7)
        await eventually(lambda: ledger(redis_server, "b")[0] >= 1, what="appended")
        bob.lose()
        again = await b.logon("bob")
        resume_reading(b.presence)
        [error] = await eventually(alice.take, what="the request's sender told")
        assert (error.message_type, error.message_id) == (MessageType.ERROR, 7)
        assert error.body.code == ErrorCode.USER_OFFLINE
        assert b.presence.stats["inbox_ended_told"] == 1
        assert [f for f in again.take() if f.message_type == MessageType.SEND_CERTAINLY] == []
    finally:
        await stop_nodes(a, b)


@pytest_twisted.ensureDeferred
async def test_a_broadcast_copy_refused_at_the_append_answers_nothing(redis_server):
    # alice asks the user "team" (on b) something, and while that request
    # waits she broadcasts to the group "team" with the same MessageID.  b's
    # inbox is full, so the member's copy is refused at the append: alice
    # has the Broadcast's Ack from her own node, and nothing else.  Her
    # request is not answered for it (it still waits for team's answer).
    a = Node(redis_server, "a")
    b = Node(redis_server, "b", inbox_bytes=1024 * 1024)
    try:
        a.engine.group_manager = Groups({"team": ["alice", "bob"]})
        await joined(a, b)
        alice = await a.logon("alice")
        team = await b.logon("team")
        await b.logon("bob")
        await eventually(lambda: a.engine.user_manager.is_user_online("bob"))
        alice.send(MessageType.REQUEST, Information(1, b"?"), dest="team", message_id=9)
        await eventually(team.take, what="the request")
        await pause_reading(b.presence)  # b falls behind
        for i in range(3):  # three fit in b's 1 MiB
            alice.send(MessageType.SEND, Information(1, bytes([i]) * 300_000), dest="bob")
        await a.presence.link.execute("PING")
        before = dict(a.presence.stats)
        alice.send(
            MessageType.BROADCAST, Information(3, b"!" * 300_000), dest="team", message_id=9
        )
        a.presence.outbox.flush()
        await a.presence.link.execute("PING")
        assert a.presence.stats["inbox_refused"] == before.get("inbox_refused", 0) + 1
        got = alice.take()
        assert [(f.message_type, f.message_id) for f in got] == [(MessageType.ACK, 9)]
        assert alice.protocol.session.asked  # the request still waits
        resume_reading(b.presence)
        team.send(MessageType.RESPONSE, Information(1, b"yes"), dest="alice", message_id=9)
        [answer] = await eventually(alice.take, what="team's answer")
        assert (answer.message_type, answer.message_id) == (MessageType.RESPONSE, 9)
    finally:
        await stop_nodes(a, b)


@pytest_twisted.ensureDeferred
async def test_a_broadcast_copy_a_session_never_got_is_counted_never_answered(redis_server):
    # alice's Broadcast (with a MessageID) goes to bob's session on b, which
    # ends before b reads it.  alice has her Ack from her own node, and
    # only that: b counts the member's copy as dropped, as one node counts
    # a member that is gone, not as a request whose sender it told (nor
    # kept).
    a, b = Node(redis_server, "a", offline=True), Node(redis_server, "b", offline=True)
    try:
        a.engine.group_manager = Groups({"team": ["alice", "bob"]})
        await joined(a, b)
        alice, bob = await a.logon("alice"), await b.logon("bob")
        carol = await b.logon("carol")
        await eventually(lambda: a.engine.user_manager.is_user_online("bob"))
        await pause_reading(b.presence)
        alice.send(MessageType.BROADCAST, Information(3, b"all"), dest="team", message_id=9)
        [ack] = await eventually(alice.take, what="the Ack")
        assert (ack.message_type, ack.message_id, ack.user_id) == (MessageType.ACK, 9, "_0")
        await eventually(lambda: ledger(redis_server, "b")[0] >= 1, what="appended")
        bob.lose()
        resume_reading(b.presence)
        await eventually(lambda: b.presence.stats["inbox_fenced"] == 1, what="fenced")
        assert b.presence.stats["inbox_dropped"] == 1
        assert b.presence.stats["inbox_ended_told"] == 0
        # What b would have told alice comes before carol's Send after it.
        carol.send(MessageType.SEND, Information(1, b"after"), dest="alice")
        got = await eventually(alice.take, what="carol's Send")
        assert [(f.message_type, f.user_id) for f in got] == [(MessageType.SEND, "carol")]
    finally:
        await stop_nodes(a, b)


@pytest_twisted.ensureDeferred
async def test_a_reaped_node_coming_back_gets_what_was_stored_for_its_users(redis_server):
    # With a Redis offline store: b pauses, is reaped while bob is still
    # connected to it, and alice's message to bob is stored.  When b comes
    # back and claims bob again, bob gets it then, not at his next logon.
    a, b = Node(redis_server, "a", offline=True), Node(redis_server, "b", offline=True)
    try:
        await joined(a, b)
        alice, bob = await a.logon("alice"), await b.logon("bob")
        await eventually(lambda: a.engine.user_manager.is_user_online("bob"))
        await pause_reading(b.presence)
        await a.presence.membership.janitor.reap("b", force=True)  # b's lease ran out
        await eventually(lambda: not a.engine.user_manager.is_user_online("bob"))
        alice.send(MessageType.SEND_CERTAINLY, Information(1, b"kept"), dest="bob", message_id=7)
        [ack] = await eventually(alice.take, what="stored")
        assert (ack.message_type, ack.message_id, ack.user_id) == (MessageType.ACK, 7, "_0")
        resume_reading(b.presence)  # b comes back and claims bob again
        got = await eventually(bob.take, what="the stored message delivered")
        assert [(f.message_type, f.user_id, f.body.payload) for f in got] == [
            (MessageType.SEND_CERTAINLY, "alice", b"kept")
        ]
    finally:
        await stop_nodes(a, b)


@pytest.mark.parametrize("kept_before", [0, 1])
@pytest_twisted.ensureDeferred
async def test_a_message_stored_as_its_user_logs_on_elsewhere_reaches_him_at_once(
    redis_server, kept_before
):
    # a has not seen bob log on at b yet (its reading is paused), so it
    # stores what alice sends him: b is told, and bob gets it now, not at
    # his next logon; whether b's delivery of what was stored before had
    # ended (kept_before=0) or waits for bob's acknowledgement (1: a window
    # with room takes it at once).  What a relays to him once it knows he
    # is online comes after it.
    a, b = Node(redis_server, "a", offline=True), Node(redis_server, "b", offline=True)
    try:
        await joined(a, b)
        alice = await a.logon("alice")
        for n in range(1, kept_before + 1):
            alice.send(MessageType.SEND_CERTAINLY, Information(n, b"before"), dest="bob",
                       message_id=n)  # fmt: skip
            [ack] = await eventually(alice.take, what="stored")
            assert (ack.message_type, ack.message_id) == (MessageType.ACK, n)
        await pause_reading(a.presence)
        bob = Client(b.engine)
        bob.logon("bob")
        got = []
        while len(got) < 1 + kept_before:
            got += await eventually(bob.take, what="bob's Logon reply and what was kept before")
        assert not a.engine.user_manager.is_user_online("bob")
        alice.send(MessageType.SEND_CERTAINLY, Information(9, b"as he logs on"), dest="bob",
                   message_id=9)  # fmt: skip
        [ack] = await eventually(alice.take, what="stored")
        assert (ack.message_type, ack.message_id, ack.user_id) == (MessageType.ACK, 9, "_0")
        [late] = await eventually(bob.take, what="the message stored as he logged on")
        assert (late.message_type, late.user_id, late.dest_user_id) == (
            MessageType.SEND_CERTAINLY, "alice", "_0",
        )  # fmt: skip
        assert late.body.payload == b"as he logs on" and late.message_id == kept_before + 1
        assert b.engine.counters["offline_drains_stalled"] == 0
        assert a.presence.stats["offline_told"] == 1
        bob.send(MessageType.ACK, Information(0, b""), dest="_0", message_id=late.message_id)
        await eventually(lambda: redis_server.command("ZCARD", "esf:off:bob:m") == b":0",
                         what="forgotten once acknowledged")  # fmt: skip
        resume_reading(a.presence)
        await eventually(lambda: a.engine.user_manager.is_user_online("bob"))
        alice.send(MessageType.SEND, Information(10, b"live"), dest="bob")
        [live] = await eventually(bob.take, what="a live message")
        assert (live.dest_user_id, live.body.payload) == ("bob", b"live")
    finally:
        await stop_nodes(a, b)


@pytest_twisted.ensureDeferred
async def test_nothing_is_stored_while_the_cluster_settles_after_a_data_loss(redis_server):
    # Redis restarts empty: until every node has claimed its devices again
    # (within a lease) a user may be online without Redis knowing it, so
    # the offline store refuses rather than keep a message for bob, who
    # never left.
    a = Node(redis_server, "a", offline=True)
    try:
        await joined(a)
        alice = await a.logon("alice")
        before = a.presence.membership.epoch
        redis_server.restart()
        await eventually(
            lambda: a.presence.up and a.presence.membership.epoch not in (None, before), timeout=10
        )
        alice.send(MessageType.SEND_CERTAINLY, Information(1, b"x"), dest="bob", message_id=7)
        [error] = await eventually(alice.take, what="alice is answered")
        assert (error.message_type, error.message_id) == (MessageType.ERROR, 7)
        assert error.body.code == ErrorCode.USER_OFFLINE
        assert error.body.text == "bob is not online and the offline store cannot keep it now"
        assert a.engine.counters["offline_errors"] == 1
        assert redis_server.command("EXISTS", "esf:off:bob:m") == b":0"
        redis_server.command("DEL", "esf:settling")  # as when the lease has passed
        alice.send(MessageType.SEND_CERTAINLY, Information(1, b"x"), dest="bob", message_id=8)
        [ack] = await eventually(alice.take, what="stored")
        assert (ack.message_type, ack.message_id) == (MessageType.ACK, 8), ack
    finally:
        await stop_nodes(a)


@pytest.mark.parametrize(
    "request_type, body",
    [(t, b) for t, b in REQUESTS],
    ids=[t.name for t, _ in REQUESTS],
)
@pytest_twisted.ensureDeferred
async def test_a_request_to_a_backed_up_receiver_on_another_node_is_answered(
    redis_server, request_type, body
):
    """
    As on one node: an acknowledged message that the receiver's node
    refuses because its one device is backed up is answered
    Error(RateLimited) at the sender's node, naming the receiver, and its
    request slot is freed.  With a second device of the receiver that
    reads, it goes there and nobody is told.
    """
    config = ServerConfig(max_output_buffer=10_000)
    a, b = Node(redis_server, "a", config), Node(redis_server, "b", config)
    try:
        await joined(a, b)
        alice = await a.logon("alice")
        carol = await b.logon("carol")
        bob = await b.logon("bob", 1)
        await eventually(lambda: a.engine.user_manager.is_user_online("bob"))
        stalled(b.engine, carol, bob)
        alice.send(request_type, body, dest="bob", message_id=77)
        (error,) = await eventually(alice.take, what="the refusal")
        assert (error.message_type, error.message_id) == (MessageType.ERROR, 77)
        assert error.body.request_message_type == request_type
        assert error.body.code == ErrorCode.RATE_LIMITED
        assert error.body.text == (
            "not delivered: bob is backed up (it does not read what is relayed to it "
            "fast enough); try later"
        )
        assert not alice.protocol.session.asked  # no answer is let through for it
        # A second device of bob's that reads: the request reaches it, and
        # the first's refusal tells nobody.
        bob_phone = await b.logon("bob", 2)
        await eventually(lambda: len(a.engine.presence.devices("bob")) == 2)
        alice.send(request_type, body, dest="bob", message_id=78)
        (got,) = await eventually(bob_phone.take, what="bob's second device's copy")
        assert (got.message_type, got.message_id) == (request_type, 78)
        await a.presence.link.execute("PING")
        await b.presence.link.execute("PING")
        assert alice.take() == []
    finally:
        for node in (a, b):
            node.engine.stop()
            await Deferred.fromCoroutine(node.presence.stop())


@pytest_twisted.ensureDeferred
async def test_a_backed_up_receiver_on_another_node_is_refused_at_the_senders_node(
    redis_server,
):
    """
    What one receiver does not read is not carried across the cluster to
    be refused there: once its node says it is backed up, the sender's
    node refuses what is relayed to it at once (a request answered
    RateLimited), holds a sender that keeps relaying to it back as one
    node does, and sends it again once the receiver's node stops saying
    so.
    """
    config = ServerConfig(max_output_buffer=10_000)
    a, b = Node(redis_server, "a", config), Node(redis_server, "b", config)
    try:
        await joined(a, b)
        alice = await a.logon("alice")
        carol = await b.logon("carol")
        bob = await b.logon("bob")
        await eventually(lambda: a.engine.user_manager.is_user_online("bob"))
        stalled(b.engine, carol, bob)

        # The first Sends reach b, which refuses them and says so to a.
        refused_at_b = b.engine.counters[Count.RECEIVER_BEHIND]

        def refused_at_a() -> int:
            alice.send(MessageType.SEND, Information(1, b"x"), dest="bob")
            return a.engine.counters[Count.RECEIVER_BEHIND]

        await eventually(refused_at_a, what="a refuses what alice relays to bob")
        assert b.engine.counters[Count.RECEIVER_BEHIND] > refused_at_b

        # From now on nothing for bob leaves a: carol's copy of a marker,
        # sent after them, is the one record b reads.
        refused_at_a_before = a.engine.counters[Count.RECEIVER_BEHIND]
        refused_at_b = b.engine.counters[Count.RECEIVER_BEHIND]
        delivered_at_b = b.presence.stats["inbox_delivered"]
        for _ in range(20):
            alice.send(MessageType.SEND, Information(1, b"y" * 100), dest="bob")
        alice.send(MessageType.SEND_CERTAINLY, Information(1, b"z"), dest="bob", message_id=9)
        alice.send(MessageType.SEND, Information(1, b"marker"), dest="carol")
        [marker] = await eventually(carol.take, what="carol's marker")
        assert marker.body == Information(1, b"marker")
        assert b.presence.stats["inbox_delivered"] == delivered_at_b + 1
        assert b.engine.counters[Count.RECEIVER_BEHIND] == refused_at_b
        assert a.engine.counters[Count.RECEIVER_BEHIND] == refused_at_a_before + 21
        [error] = alice.take()
        assert (error.message_type, error.message_id) == (MessageType.ERROR, 9)
        assert error.body.code == ErrorCode.RATE_LIMITED
        assert "bob is backed up" in error.body.text

        # A sender that keeps relaying what is refused is held back, as on
        # one node (twice --max-output-buffer, then at its rate).
        for _ in range(25):
            alice.send(MessageType.SEND, Information(1, bytes(1000)), dest="bob")
        assert alice.transport.producerState == "paused"

        # bob reads again; once a's mark ends, what alice sends reaches him.
        bob.protocol.resumeProducing()
        a.engine.clock.advance(max(BEHIND_SECONDS, 3.0))
        assert alice.transport.producerState == "producing"
        bob.take()
        alice.send(MessageType.SEND, Information(1, b"after"), dest="bob")
        got = await eventually(bob.take, what="bob gets what alice sends after")
        assert [f.body for f in got] == [Information(1, b"after")]
    finally:
        for node in (a, b):
            node.engine.stop()
            await Deferred.fromCoroutine(node.presence.stop())


@pytest.mark.parametrize("past", ["stalled", "hard-bound"])
@pytest_twisted.ensureDeferred
async def test_a_receiver_that_stops_reading_is_refused_at_its_senders_node(redis_server, past):
    """
    bob (node b) stops reading while alice (node a) relays to him.  As on
    one node, past half his bound the push back's time runs (there is no
    sender at b to hold back), and then he is stalled: what comes past his
    bound is refused, and a is told, which refuses it at once from then
    on.  With a push back that does not end in time, what passes his hard
    bound is dropped at b, and a is told the same.  bob stays online.
    """
    timeout = 0.05 if past == "stalled" else 600.0
    config = ServerConfig(max_output_buffer=10_000, push_back_timeout=timeout)
    a, b = Node(redis_server, "a", config), Node(redis_server, "b", config)
    try:
        await joined(a, b)
        alice = await a.logon("alice")
        bob = await b.logon("bob")
        await eventually(lambda: a.engine.user_manager.is_user_online("bob"))
        bob.protocol.pauseProducing()
        body = Information(1, bytes(1000))
        for _ in range(8):  # past half of bob's bound
            alice.send(MessageType.SEND, body, dest="bob")
        await eventually(lambda: bob.protocol.session._push_back_timer is not None)
        b.engine.clock.advance(timeout if past == "stalled" else 0)

        def refused_at_a() -> int:
            alice.send(MessageType.SEND, body, dest="bob")
            a.engine.clock.advance(1)  # alice's allowance of refusals refills
            return a.engine.counters[Count.RECEIVER_BEHIND]

        await eventually(refused_at_a, what="a refuses what alice relays to bob")
        if past == "stalled":
            assert b.engine.counters[Count.RECEIVER_BEHIND] > 0
            assert b.engine.counters[Count.OUTPUT_DROPPED] == 0
        else:
            assert b.engine.counters[Count.OUTPUT_DROPPED] > 0
        assert bob.protocol.session.logged_on
    finally:
        for node in (a, b):
            node.engine.stop()
            await Deferred.fromCoroutine(node.presence.stop())


@pytest_twisted.ensureDeferred
async def test_ignore_new_refuses_busy_when_the_holders_node_does_not_confirm(redis_server):
    """
    With ignore-new, a logon that loses to a holder on another node is
    refused HadLoggedOn (final, for a client) only when that node confirms
    its session; a node that does not answer (dead or paused, its lease
    still alive) gets the logon refused Busy, which a client retries.
    """
    config = ServerConfig(relogon_mode=RelogonMode.IGNORE_NEW)
    a, b = Node(redis_server, "a", config), Node(redis_server, "b", config)
    try:
        await joined(a, b)
        await a.logon("alice", 1)
        await eventually(lambda: b.engine.user_manager.is_user_online("alice"))
        refused = Client(b.engine)
        refused.logon("alice", 1)
        replies = await eventually(refused.take, what="refused: a confirms its session")
        assert replies[0].body.result == LogonResult.HAD_LOGGED_ON
        await pause_reading(a.presence)  # as a node that died: its lease lives on
        busy = Client(b.engine)
        busy.logon("alice", 1)
        await eventually(lambda: b.presence.probes.waiting, what="b's probe of a")
        assert busy.take() == []
        b.engine.clock.advance(1.0)
        replies = await eventually(busy.take, what="refused Busy")
        assert replies[0].body.result == LogonResult.BUSY
        assert replies[0].body.failure_cause == (
            "alice is held by node a, which does not answer; try again shortly"
        )
        assert b.presence.stats["probes_unanswered"] == 1
    finally:
        await stop_nodes(a, b)


@pytest_twisted.ensureDeferred
async def test_a_request_read_too_late_is_answered_once_and_not_delivered(pair):
    # b reads alice's request past the time a wanted it delivered by (here:
    # b's idea of Redis's clock is 10 s ahead, as if b had been paused): b
    # answers it RateLimited at alice's node instead of delivering it, and
    # delivers the one-way message that came with it.  A second failure
    # reported for the same request is not told again: alice's request no
    # longer waits.
    from esf.cluster._records import READ_LATE, Failed
    from esf.wire._frames import encode_frame

    a, b = pair
    await joined(a, b)
    alice = await a.logon("alice")
    bob = await b.logon("bob")
    await eventually(lambda: a.engine.user_manager.is_user_online("bob"))
    b.presence.inbox._offset_ms += 10_000
    alice.send(MessageType.SEND_CERTAINLY, Information(1, b"late"), dest="bob", message_id=7)
    alice.send(MessageType.SEND, Information(1, b"one-way"), dest="bob")
    [error] = await eventually(alice.take, what="alice is told")
    assert (error.message_type, error.message_id) == (MessageType.ERROR, 7)
    assert error.body.code == ErrorCode.RATE_LIMITED
    assert error.body.text.startswith("bob was not reached in time: the node that holds it read")
    [got] = await eventually(bob.take, what="the one-way message")
    assert got.body == Information(1, b"one-way")
    assert b.presence.stats["inbox_read_late"] == 1
    # The same request reported failed again (as when a's own call to Redis
    # had timed out too): not answered twice.
    [session_id] = [sid for sid, h in a.presence.claims.local.items() if h.user_id == "alice"]
    frame = encode_frame(
        a.engine.config.wire, MessageType.SEND_CERTAINLY, Information(1, b"late").encode(),
        message_id=7, user_id="alice", dest_user_id="bob",
    )  # fmt: skip
    a.presence.delivery.deliver(Failed(session_id, frame, READ_LATE).encode())
    assert alice.take() == [] and bob.take() == []


def test_a_process_started_again_with_the_same_node_id_never_reuses_a_session_id(monkeypatch):
    """
    A session ID (node/logon order) fences what other nodes send a
    session: a process that starts again with the same --node-id must not
    give its sessions the IDs of the one before (a record for the old
    process's session would reach the new one's, another user).  The
    second process starts a second after the first (its clock is the
    wall clock, read when it starts).
    """
    from esf.server import _logon

    started = iter([1_765_000_000_000_000_000, 1_765_000_001_000_000_000])
    monkeypatch.setattr(_logon.time, "time_ns", lambda: next(started, 1_765_000_002_000_000_000))
    first = ServerEngine(ServerConfig(), clock=task.Clock(), node_id="n1")
    old = Client(first)
    old.logon("alice")
    again = ServerEngine(ServerConfig(), clock=task.Clock(), node_id="n1")
    new = Client(again)
    new.logon("bob")
    old_id, new_id = old.protocol.session.session_id, new.protocol.session.session_id
    assert old_id.startswith("n1/") and new_id.startswith("n1/")
    assert new.protocol.session.logon_order > old.protocol.session.logon_order
