"""
Tests of the cluster's presence (esf.cluster._presence) against a real redis-server
of the test's own: the scripts' races (fenced claim and release, a late
release, a late kick), the inbox, leases and the janitor on a clock, and
outages of Redis.

Leases and the janitor run on a L{task.Clock}; Redis and its sockets run
on the real reactor, so the tests wait (boundedly) for Redis's answers.
"""

from __future__ import annotations

import collections
import time

import pytest
import pytest_twisted
from _helpers import LogCapture
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from zope.interface import implementer
from zope.interface.verify import verifyObject

from esf import DisconnectedType, MessageType, RelogonMode, UserData
from esf.cluster._inbox import GONE, LATE, InboxLedger
from esf.cluster._link import NotSent, RedisUnavailable
from esf.cluster._presence import ClusterPresence, RedisURL, RemoteHandle, check_node_id
from esf.cluster._records import Holder
from esf.interfaces import IDeviceHandle, IPresence
from esf.wire import BeingKickedOutNotify, BeingPushedOutNotify

LEASE = 2.0  # seconds, real: Redis expires leases on its own clock, and a node
# whose lease expired is sent nothing: long enough for a test's sends


def sleep(seconds: float) -> Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


async def eventually(check, timeout: float = 5.0, what: str = ""):
    """
    Wait (at most C{timeout} s) until C{check()} is true; return it.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what() if callable(what) else what}")
        await sleep(0.01)


@implementer(IDeviceHandle)
class Device:
    """
    A device held by one node (what the engine's sessions are to presence),
    recording what it is told.
    """

    _ids = iter(range(1, 10**9))

    def __init__(self, node: str, user_id: str, client_type: int = 0, logon_time: float = 0.0):
        self.node = node
        self.user_id = user_id
        self.client_type = client_type
        self.session_id = f"{node}/{next(self._ids)}"
        self.logon_order = 1
        self.user_data = UserData(user_id, client_type, "10.0.0.1:5000", logon_time)
        self.sent: list[bytes] = []
        self.notified: list[tuple] = []
        self.kicked: list[tuple] = []

    def __repr__(self):
        return f"<Device {self.session_id}>"

    def send(self, data):
        self.sent.append(data)

    def notify(self, message_type, body=b"", client_type=0):
        self.notified.append((message_type, body, client_type))

    def kick(self, reason, text):
        self.kicked.append((reason, text))

    # What a session does for these (esf.server._session.Session), minus the events.

    def push_out(self, new_address, cause):
        self.notify(MessageType.BEING_PUSHED_OUT_NOTIFY, BeingPushedOutNotify(cause).encode())
        self.kick(DisconnectedType.BEING_PUSHED_OUT, cause)

    def kick_out(self, operator, reason, text):
        self.notify(
            MessageType.BEING_KICKED_OUT_NOTIFY, BeingKickedOutNotify(operator, reason).encode()
        )
        self.kick(DisconnectedType.BEING_KICKED_OUT, text)

    def ask(self, message_id, body, timeout):
        self.sent.append((message_id, body))


class Nodes:
    """
    The cluster's nodes of one test, each a started L{ClusterPresence} on
    its own clock.
    """

    def __init__(self, redis_server):
        self.redis = redis_server
        self.nodes: list[ClusterPresence] = []

    async def add(self, node_id: str, **options) -> ClusterPresence:
        options.setdefault("lease", LEASE)
        options.setdefault("timeout", 1.0)
        options.setdefault("block", 0.2)
        presence = ClusterPresence(reactor, self.redis.url, node_id, clock=task.Clock(), **options)
        presence.start()
        self.nodes.append(presence)
        await eventually(lambda: presence.up, what=f"{node_id} joins")
        return presence

    async def stop(self):
        for presence in self.nodes:
            await Deferred.fromCoroutine(presence.stop())


@pytest.fixture
def nodes(redis_server):
    cluster = Nodes(redis_server)
    yield cluster
    pytest_twisted.blockon(Deferred.fromCoroutine(cluster.stop()))


def holder(presence, user_id, client_type=0):
    handle = presence.get(user_id, client_type)
    return handle.session_id if handle is not None else None


# -- values ------------------------------------------------------------------------


def test_redis_url():
    url = RedisURL.parse("rediss://user:p%40ss@redis.example:6380/3")
    assert (url.host, url.port, url.db, url.username, url.password, url.tls) == (
        "redis.example",
        6380,
        3,
        "user",
        "p@ss",
        True,
    )
    assert "p@ss" not in str(url) and "p@ss" not in repr(url)
    assert RedisURL.parse("redis://h") == RedisURL("h", 6379, 0)
    assert RedisURL.parse("rediss://h?ssl_ca_certs=/etc/ca.pem").ca_file == "/etc/ca.pem"
    for bad in (
        "http://h",
        "redis://h/x",
        "redis://h:99999",
        "redis://h?ssl_ca_certs=/x",
        "rediss://h?timeout=3",
    ):
        with pytest.raises(ValueError):
            RedisURL.parse(bad)


def test_node_id_checked():
    assert check_node_id("host-1-abc") == "host-1-abc"
    for bad in ("", "a b", "a\tb", "x" * 101, "é"):
        with pytest.raises(ValueError):
            check_node_id(bad)


def test_holder_round_trip():
    h = Holder("n/1", "n", 1764583212.25, "[::1]:5000")
    assert Holder.parse(h.encode()) == h


def test_interfaces():
    presence = ClusterPresence(reactor, "redis://127.0.0.1:1/0", "n1", clock=task.Clock())
    verifyObject(IPresence, presence)
    handle = RemoteHandle("u", 1, Holder("n2/1", "n2", 0.0, "a:1"), lambda *a: None)
    verifyObject(IDeviceHandle, handle)
    assert (handle.node, handle.session_id, handle.logon_order) == ("n2", "n2/1", 0)
    # Its UserData is made when first asked for, then kept (with the tag an
    # application gives it).
    data = handle.user_data
    assert (data.user_id, data.client_type, data.address, data.logon_time) == ("u", 1, "a:1", 0.0)
    data.tag = "mine"
    assert handle.user_data is data and handle.user_data.tag == "mine"


# -- claim and release ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_claim_is_seen_by_every_node(nodes):
    a = await nodes.add("a")
    b = await nodes.add("b")
    alice = Device("a", "alice", 1)
    claim = await a.claim(alice, True)
    assert (claim.won, claim.previous) == (True, None)
    # The claimant's mirror has its own session at once, the other's soon.
    assert a.devices("alice") == (alice,)
    await eventually(lambda: b.devices("alice"))
    [remote] = b.devices("alice")
    assert isinstance(remote, RemoteHandle)
    assert (remote.session_id, remote.node, remote.client_type) == (alice.session_id, "a", 1)
    assert remote.user_data.address == "10.0.0.1:5000"
    assert (b.user_count(), b.user_ids(), b.get("alice", 1) is remote) == (1, ["alice"], True)
    assert b.get("alice", 2) is None


@pytest_twisted.ensureDeferred
async def test_the_claims_and_releases_of_a_turn_are_one_call_and_one_entry(nodes):
    """
    What a node claims and releases during one reactor turn (a logon
    storm, the end of every session at shutdown) is one call of the
    script and one entry of the presence stream: each answered on its
    own, in order, and mirrored by every node.
    """
    a = await nodes.add("a")
    b = await nodes.add("b")
    redis = nodes.redis
    first = Device("a", "alice")
    await a.claim(first, True)
    entries = int(redis.reply("XLEN", "esf:presence"))
    link = a.claims.scripts.link
    calls = []

    def counted(script, keys, args):
        calls.append(len(args))
        return link.eval(script, keys, args)

    a.claims.scripts.link = type("Counted", (), {"eval": staticmethod(counted)})()
    devices = [Device("a", f"u{i}") for i in range(5)]
    taken = Device("a", "alice")  # first holds it
    claims = [a.claim(d, True) for d in devices] + [a.claim(taken, False)]
    released = a.release(devices[0])
    answers = [await c for c in claims]
    assert [c.won for c in answers] == [True] * 5 + [False]
    assert answers[-1].previous is first
    assert await released is True  # u0's last device
    assert calls == [5 + 6 * 8 + 4]  # one call: the header, six claims, a release
    assert int(redis.reply("XLEN", "esf:presence")) == entries + 1
    [[_, flat]] = redis.reply("XREVRANGE", "esf:presence", "+", "-", "COUNT", "1")
    assert flat[::6] == [b"u"] * 6 and flat[4::6] == [b"v"] * 5 + [b"d"]
    want = ["alice", "u1", "u2", "u3", "u4"]
    await eventually(lambda: b.user_ids() == want)
    assert a.user_ids() == want and holder(b, "u1") == devices[1].session_id


@pytest_twisted.ensureDeferred
async def test_replace_across_nodes_and_a_late_release(nodes):
    a = await nodes.add("a")
    b = await nodes.add("b")
    old = Device("a", "alice")
    await a.claim(old, True)
    await eventually(lambda: holder(b, "alice") == old.session_id)
    new = Device("b", "alice")
    claim = await b.claim(new, True)
    assert claim.won
    assert isinstance(claim.previous, RemoteHandle)
    assert claim.previous.session_id == old.session_id
    await eventually(lambda: holder(a, "alice") == new.session_id)
    # The old session's release comes late: it must not remove the new one.
    assert await a.release(old) is False
    await sleep(0.1)
    assert holder(a, "alice") == holder(b, "alice") == new.session_id
    assert b.devices("alice") == (new,)


@pytest_twisted.ensureDeferred
async def test_keep_refuses_and_names_the_holder(nodes):
    a = await nodes.add("a")
    b = await nodes.add("b")
    first = Device("a", "alice")
    await a.claim(first, True)
    second = Device("b", "alice")
    claim = await b.claim(second, False)
    assert claim.won is False
    assert claim.previous.session_id == first.session_id
    await sleep(0.1)
    assert holder(a, "alice") == holder(b, "alice") == first.session_id


@pytest_twisted.ensureDeferred
async def test_release_reports_the_users_last_device_cluster_wide(nodes):
    a = await nodes.add("a")
    b = await nodes.add("b")
    pc, phone = Device("a", "alice", 1), Device("b", "alice", 5)
    await a.claim(pc, True)
    await b.claim(phone, True)
    await eventually(lambda: len(a.devices("alice")) == 2 and len(b.devices("alice")) == 2)
    assert await a.release(pc) is False  # the phone is still on, on b
    assert await b.release(phone) is True
    await eventually(lambda: not a.devices("alice") and a.user_count() == 0)
    assert a.user_ids() == b.user_ids() == []


@pytest_twisted.ensureDeferred
async def test_racing_claims_leave_one_holder(nodes):
    """
    Both nodes claim the same devices at once, many times: every device ends
    with exactly one holder, the same in every mirror, and each claim that
    lost its place was told who took it.
    """
    a = await nodes.add("a")
    b = await nodes.add("b")
    pairs = [(Device("a", f"u{i}"), Device("b", f"u{i}")) for i in range(100)]
    claims = []
    for x, y in pairs:
        claims.append((x, y, a.claim(x, True), b.claim(y, True)))
    for x, y, dx, dy in claims:
        cx, cy = await dx, await dy
        assert cx.won and cy.won
        # Exactly one of the two found the other there.
        found = [c.previous.session_id for c in (cx, cy) if c.previous is not None]
        assert len(found) == 1 and found[0] in (x.session_id, y.session_id)
    await eventually(
        lambda: all(holder(a, f"u{i}") == holder(b, f"u{i}") is not None for i in range(100)),
        what="mirrors agree",
    )
    for i, (x, y) in enumerate(pairs):
        assert holder(a, f"u{i}") in (x.session_id, y.session_id)
        assert len(a.devices(f"u{i}")) == len(b.devices(f"u{i}")) == 1
    assert a.user_count() == b.user_count() == 100


# -- the inbox ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_inbox_delivers_in_order_once_bytes_as_they_are(nodes):
    a = await nodes.add("a")
    b = await nodes.add("b")
    alice = Device("a", "alice", 1)
    await a.claim(alice, True)
    [remote] = await eventually(lambda: b.devices("alice"))
    payloads = [bytes([i % 256, 0xFF, 0xFE, 0x00]) + b"\x80not utf-8" for i in range(300)]
    for p in payloads:
        remote.send(p)
    remote.notify(105, b"\xffbody", 5)
    remote.kick(DisconnectedType.BEING_KICKED_OUT, "kicked by carol: spam \u2603")
    await eventually(lambda: alice.kicked)
    assert alice.sent == payloads
    assert alice.notified == [(105, b"\xffbody", 5)]
    assert alice.kicked == [(DisconnectedType.BEING_KICKED_OUT, "kicked by carol: spam \u2603")]
    await sleep(0.5)  # several more reads: nothing comes twice
    assert len(alice.sent) == 300 and len(alice.kicked) == 1


@pytest_twisted.ensureDeferred
async def test_a_late_kick_does_not_reach_a_newer_session(nodes):
    a = await nodes.add("a")
    b = await nodes.add("b")
    old = Device("a", "alice")
    await a.claim(old, True)
    [stale] = await eventually(lambda: b.devices("alice"))
    await a.release(old)
    new = Device("a", "alice")
    await a.claim(new, True)
    # b still holds a handle of the old session: its kick is fenced.
    stale.kick(DisconnectedType.BEING_KICKED_OUT, "late")
    stale.send(b"late")
    await eventually(lambda: a.stats["inbox_fenced"] == 2)
    assert new.kicked == [] and new.sent == [] and old.kicked == []


@pytest_twisted.ensureDeferred
async def test_a_reader_reconnecting_loses_nothing(nodes, redis_server):
    a = await nodes.add("a")
    b = await nodes.add("b")
    alice = Device("a", "alice")
    await a.claim(alice, True)
    [remote] = await eventually(lambda: b.devices("alice"))
    remote.send(b"1")
    await eventually(lambda: alice.sent == [b"1"])
    # Drop a's reading connection; send while it is away.
    a.reader._protocol.transport.abortConnection()
    await eventually(lambda: not a.reader.connected)
    for p in (b"2", b"3", b"4"):
        remote.send(p)
    await eventually(lambda: a.reader.connected, what="a's reader back")
    await eventually(lambda: alice.sent == [b"1", b"2", b"3", b"4"], what=lambda: alice.sent)


# -- leases and the janitor ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_janitor_releases_a_dead_nodes_devices(nodes):
    a = await nodes.add("a")
    b = await nodes.add("b")
    alice, bob = Device("a", "alice"), Device("b", "bob")
    await a.claim(alice, True)
    await b.claim(bob, True)
    await eventually(lambda: b.devices("alice") and a.devices("bob"))
    # a dies: no more lease refreshes, no goodbye.
    a.membership.ticker.stop()
    a.membership.running = False
    await a.link.stop()
    await a.reader.stop()
    nodes.nodes.remove(a)
    # While a's lease lives, b's janitor leaves its devices alone...
    b.clock.advance(LEASE / 3)
    await sleep(0.05)
    assert b.devices("alice")
    # ...once it expired, the next round releases them.
    await sleep(LEASE)
    b.clock.advance(LEASE / 3)
    await eventually(lambda: not b.devices("alice"), what="alice released")
    assert b.user_ids() == ["bob"]
    assert holder(b, "bob") == bob.session_id


def start_another(nodes, node_id: str) -> ClusterPresence:
    """
    Start a process's presence as C{node_id}, without waiting for it to join.
    """
    presence = ClusterPresence(
        reactor, nodes.redis.url, node_id, clock=task.Clock(), lease=LEASE, timeout=1.0, block=0.2
    )
    presence.start()
    nodes.nodes.append(presence)
    return presence


@pytest_twisted.ensureDeferred
async def test_a_second_process_with_a_node_id_in_use_stays_out_while_it_lives(nodes):
    # Two processes started with one --node-id: the second would reap the
    # first's devices and read its inbox.  It waits instead, alone, saying
    # why, as long as the first renews its lease.
    a = await nodes.add("a")
    b = await nodes.add("b")
    alice = Device("a", "alice")
    await a.claim(alice, True)
    await eventually(lambda: b.devices("alice"))
    with LogCapture() as logs:
        twin = start_another(nodes, "a")
        for _ in range(4):
            a.clock.advance(LEASE / 3)  # a renews its lease
            await sleep(LEASE / 3)
        assert logs.esf("cluster_node_id_in_use"), logs.esf("cluster_node_id_held")
        assert twin.membership.stats["node_id_in_use"] >= 1
    assert not twin.up and a.up
    assert await b.link.execute("GET", "esf:lease:a") == a.membership.hold.token.encode()
    assert holder(b, "alice") == alice.session_id
    # Alone, the second takes its own logons; nobody else sees them yet.
    ivy = Device("a", "ivy")
    await twin.claim(ivy, True)
    await sleep(0.1)
    assert not b.devices("ivy")
    # The first leaves: the second joins, holding the ID from then on, and
    # its logons are claimed in the cluster.
    nodes.nodes.remove(a)
    await Deferred.fromCoroutine(a.stop())
    await eventually(lambda: twin.up, timeout=LEASE + 3, what="the second joins")
    assert not b.devices("alice")
    await eventually(lambda: holder(b, "ivy") == ivy.session_id, what="ivy claimed")
    assert await b.link.execute("GET", "esf:lease:a") == twin.membership.hold.token.encode()


@pytest_twisted.ensureDeferred
async def test_a_process_with_a_dead_ones_node_id_joins_once_its_lease_ends(nodes):
    a = await nodes.add("a")
    b = await nodes.add("b")
    alice = Device("a", "alice")
    await a.claim(alice, True)
    await eventually(lambda: b.devices("alice"))
    # a renews its lease (a full one left), then dies without leaving; a
    # new process starts with its node ID.
    renewed = a.membership.hold.sure_until
    a.clock.advance(LEASE / 3)
    await eventually(lambda: a.membership.hold.sure_until > renewed, what="a renews")
    a.membership.ticker.stop()
    a.membership.running = False
    await a.link.stop()
    await a.reader.stop()
    nodes.nodes.remove(a)
    with LogCapture() as logs:
        again = start_another(nodes, "a")
        await eventually(lambda: again.up, timeout=LEASE + 2, what="it joins")
        [held] = logs.esf("cluster_node_id_held")
        assert 0 < held["left"] <= LEASE
        assert not logs.esf("cluster_node_id_in_use")
    # What the dead one held is released (by the new process, or b's janitor).
    await eventually(lambda: not b.devices("alice"), what="alice released")


@pytest_twisted.ensureDeferred
async def test_a_paused_node_whose_id_was_taken_over_stays_out(nodes, redis_server):
    a = await nodes.add("a")
    b = await nodes.add("b")
    await a.claim(Device("a", "alice"), True)
    await eventually(lambda: b.devices("alice"))
    # a is paused past its lease; meanwhile a new process takes its ID over.
    await pause_reading(a)
    await sleep(LEASE + 0.2)
    twin = start_another(nodes, "a")
    await eventually(lambda: twin.up, timeout=LEASE + 2, what="the new process joins")
    await pause_reading(twin)
    await twin.membership.hold.renew()  # (its clock stands still: its lease is renewed by hand)
    entry_id = await b.inbox.append("a", b"for the new process")
    with LogCapture() as logs:
        # a resumes.  What it reads while unsure of its lease it must take
        # first: the new process's entries are not its to take.
        assert not await a.inbox.take(a.link, [(entry_id, 19)], LEASE, a.membership.hold.token)
        assert ledger(redis_server, "a")[0] == 1
        # Its upkeep finds the lease another's: out of the cluster, saying so.
        a.clock.advance(LEASE / 3)
        await eventually(lambda: not a.up, what="a leaves")
        assert logs.esf("cluster_node_id_in_use")
    assert twin.up
    assert await b.link.execute("GET", "esf:lease:a") == twin.membership.hold.token.encode()
    # a stops: it leaves the ID, the new process's devices and inbox as they are.
    await twin.claim(Device("a", "ann"), True)
    await eventually(lambda: b.devices("ann"))
    nodes.nodes.remove(a)
    await Deferred.fromCoroutine(a.stop())
    assert await b.link.execute("GET", "esf:lease:a") == twin.membership.hold.token.encode()
    assert ledger(redis_server, "a")[0] == 1
    await twin.membership.hold.renew()
    b.clock.advance(LEASE / 3)  # b's janitor looks
    await sleep(0.1)
    assert b.devices("ann")
    await twin.inbox.take(twin.link, [(entry_id, 19)], LEASE, twin.membership.hold.token)
    assert ledger(redis_server, "a") == (0, 0)


@pytest_twisted.ensureDeferred
async def test_a_live_node_keeps_its_devices(nodes):
    a = await nodes.add("a")
    b = await nodes.add("b")
    alice = Device("a", "alice")
    await a.claim(alice, True)
    await eventually(lambda: b.devices("alice"))
    for _ in range(4):
        a.clock.advance(LEASE / 3)  # a refreshes its lease
        await sleep(LEASE / 3)
        b.clock.advance(LEASE / 3)  # b's janitor looks
        await sleep(0.02)
    assert holder(b, "alice") == alice.session_id


@pytest_twisted.ensureDeferred
async def test_a_node_reaped_while_alive_claims_again(nodes):
    a = await nodes.add("a")
    b = await nodes.add("b")
    alice = Device("a", "alice")
    await a.claim(alice, True)
    await eventually(lambda: b.devices("alice"))
    # a stalls past its lease (it does not tick); b's janitor reaps it.
    await sleep(LEASE + 0.1)
    b.clock.advance(LEASE / 3)
    # a sees its device released behind its back and claims it again.
    await eventually(lambda: a.stats["reclaimed"] == 1, what="a learns it was reaped")
    await eventually(lambda: holder(b, "alice") == alice.session_id and a.up, what="reclaimed")
    assert alice.kicked == []


# -- Redis outages ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_outage_alone_then_restored(nodes, redis_server):
    a = await nodes.add("a")
    b = await nodes.add("b")
    alice, bob = Device("a", "alice"), Device("b", "bob")
    await a.claim(alice, True)
    await b.claim(bob, True)
    await eventually(lambda: a.devices("bob") and b.devices("alice"))
    redis_server.stop()
    await eventually(lambda: not a.up and not b.up, what="both alone")
    # Alone: only this node's users; remote ones read offline; local claims
    # and releases go on.
    assert a.devices("bob") == () and a.get("bob", 0) is None
    assert a.user_ids() == ["alice"] and a.user_count() == 1
    carol = Device("a", "carol")
    assert (await a.claim(carol, True)).won
    assert a.user_ids() == ["alice", "carol"]
    # A send to a remote device fails at once rather than hangs.
    [stale] = list(b.mirror.users["alice"])
    started = time.monotonic()
    stale.send(b"x")
    assert time.monotonic() - started < 0.5
    await eventually(lambda: b.stats["remote_send_failed"] == 1)
    assert await a.release(alice) is True
    # Redis comes back empty: both notice, claim their devices again.
    redis_server.start()
    await eventually(lambda: a.up and b.up, timeout=10, what="both rejoin")
    await eventually(
        lambda: b.user_ids() == ["bob", "carol"] and a.user_ids() == ["bob", "carol"],
        what=lambda: (a.user_ids(), b.user_ids()),
    )
    assert holder(b, "carol") == carol.session_id
    assert redis_server.command("EXISTS", "esf:epoch") == b":1"
    # Routing works again.
    [remote] = b.devices("carol")
    remote.send(b"back")
    await eventually(lambda: carol.sent == [b"back"])


@pytest_twisted.ensureDeferred
async def test_logons_during_a_join_do_not_keep_the_node_out(nodes, redis_server):
    """
    A node joining again (after an outage) decides its logons alone until
    it is in; those made while it reads the cluster's presence are claimed
    once that read is done, not by reading it all again: a node that took
    logons faster than it read every user's hash never joined, reading
    them again and again.
    """
    b = await nodes.add("b")
    others = [Device("b", f"u{i}") for i in range(2000)]
    for chunk in range(0, len(others), 250):
        await gatherResults([b.claim(d, True) for d in others[chunk : chunk + 250]])
    a = await nodes.add("a")
    snapshots = 0
    snapshot = a.membership._snapshot

    async def counted():
        nonlocal snapshots
        snapshots += 1
        return await snapshot()

    a.membership._snapshot = counted
    a.membership.alone("a test's outage")
    logons: list[Device] = []

    def logon():
        device = Device("a", f"new{len(logons)}")
        logons.append(device)
        a.claim(device, True)

    storm = task.LoopingCall(logon)
    storm.start(0.02)  # fewer than a snapshot of 2,000 users takes here
    try:
        joining = Deferred.fromCoroutine(a.membership.join())
        await eventually(lambda: a.up, timeout=10, what=lambda: f"{snapshots} snapshots")
    finally:
        storm.stop()
    await joining
    assert snapshots == 1
    # Every logon made meanwhile is claimed in Redis and shown everywhere.
    await eventually(
        lambda: (
            all(holder(b, d.user_id) == d.session_id for d in logons)
            and all(holder(a, d.user_id) == d.session_id for d in logons)
        ),
        what="the logons made during the join",
    )


@pytest_twisted.ensureDeferred
async def test_a_logon_and_a_logoff_in_every_round_trip_of_a_join_do_not_keep_the_node_out(
    nodes, redis_server
):
    """
    Once a joining node has read the cluster's presence, the logons and
    logoffs it takes go to Redis as they come, not into the confirmations
    still to make: a node that took one logon (or logoff) per round trip of
    its confirmations never joined.
    """
    a = await nodes.add("a")
    a.membership.alone("a test's outage")
    passes = 0
    confirm = a.claims.confirm
    logons: list[Device] = []

    async def busy():
        # A logon and a logoff come in during every pass's round trip.
        nonlocal passes
        passes += 1
        confirming = Deferred.fromCoroutine(confirm())
        device = Device("a", f"new{len(logons)}")
        logons.append(device)
        a.claim(device, True)
        if len(logons) > 1:
            a.release(logons[-2])
        await confirming

    a.claims.confirm = busy
    joining = Deferred.fromCoroutine(a.membership.join())
    await eventually(lambda: a.up, timeout=5, what=lambda: f"joined ({passes} passes)")
    await joining
    assert passes <= 3
    # What was claimed and released meanwhile is as it is in Redis.
    await eventually(
        lambda: holder(a, logons[-1].user_id) == logons[-1].session_id,
        what="the last logon claimed",
    )
    await eventually(
        lambda: all(
            redis_server.command("HLEN", f"esf:u:{d.user_id}") == b":0" for d in logons[:-1]
        ),
        what="the logoffs made in Redis",
    )


@pytest_twisted.ensureDeferred
async def test_releases_made_while_alone_are_made_in_redis_together(nodes, redis_server):
    """
    What was released while Redis was away is released in Redis once it
    answers, in one call; after a failure it all stays to release.
    """
    a = await nodes.add("a")
    devices = [Device("a", f"u{i}") for i in range(300)]
    for d in devices:
        await a.claim(d, True)
    stale = {d.session_id: (d.user_id, 0) for d in devices}
    link = a.claims.scripts.link
    lost = RedisUnavailable("Redis at redis://127.0.0.1/0: Lost connection")
    a.claims.scripts.link = type("Lost", (), {"eval": staticmethod(lambda *a: fail(lost))})()
    a.claims.stale = dict(stale)
    with pytest.raises(RedisUnavailable):
        await Deferred.fromCoroutine(a.claims.release_stale())
    assert a.claims.stale == stale
    a.claims.scripts.link = link
    await Deferred.fromCoroutine(a.claims.release_stale())
    assert a.claims.stale == {}
    assert redis_server.reply("SCARD", "esf:online") == 0


@pytest.mark.parametrize("mode", [RelogonMode.REPLACE_OLD, RelogonMode.IGNORE_NEW])
@pytest_twisted.ensureDeferred
async def test_split_logons_settled_by_relogon_mode(nodes, redis_server, mode):
    a = await nodes.add("a")
    b = await nodes.add("b")
    redis_server.stop()
    await eventually(lambda: not a.up and not b.up)
    earlier, later = Device("a", "alice", logon_time=100.0), Device("b", "alice", logon_time=200.0)
    replace = mode is RelogonMode.REPLACE_OLD
    assert (await a.claim(earlier, replace)).won
    assert (await b.claim(later, replace)).won
    redis_server.start()
    await eventually(lambda: a.up and b.up, timeout=10)
    winner, loser = (later, earlier) if mode is RelogonMode.REPLACE_OLD else (earlier, later)
    await eventually(lambda: loser.kicked, what="the loser is ended")
    reason = (
        DisconnectedType.BEING_PUSHED_OUT
        if mode is RelogonMode.REPLACE_OLD
        else DisconnectedType.NEW_CONNECTION_IGNORED
    )
    assert loser.kicked[0][0] == reason
    assert winner.kicked == []
    await eventually(lambda: holder(a, "alice") == holder(b, "alice") == winner.session_id)


@pytest_twisted.ensureDeferred
async def test_split_logons_settled_by_the_mode_each_was_claimed_with(nodes, redis_server):
    """
    The relogon mode is per user and device kind: each device logged on at
    both nodes while Redis was away is settled by the mode its logons were
    claimed with, whichever node claims it again first.
    """
    a = await nodes.add("a")
    b = await nodes.add("b")
    redis_server.stop()
    await eventually(lambda: not a.up and not b.up)
    dev_earlier = Device("a", "dev-7", logon_time=100.0)
    dev_later = Device("b", "dev-7", logon_time=200.0)
    op_earlier = Device("b", "op-ann", logon_time=100.0)
    op_later = Device("a", "op-ann", logon_time=200.0)
    assert (await a.claim(dev_earlier, True)).won
    assert (await b.claim(dev_later, True)).won
    assert (await b.claim(op_earlier, False)).won
    assert (await a.claim(op_later, False)).won
    redis_server.start()
    await eventually(lambda: a.up and b.up, timeout=10)
    await eventually(lambda: dev_earlier.kicked and op_later.kicked, what="the losers are ended")
    assert [k[0] for k in dev_earlier.kicked] == [DisconnectedType.BEING_PUSHED_OUT]
    assert [k[0] for k in op_later.kicked] == [DisconnectedType.NEW_CONNECTION_IGNORED]
    assert dev_later.kicked == [] and op_earlier.kicked == []
    for node in (a, b):
        await eventually(
            lambda node=node: (
                holder(node, "dev-7") == dev_later.session_id
                and holder(node, "op-ann") == op_earlier.session_id
            ),
            what=lambda node=node: (holder(node, "dev-7"), holder(node, "op-ann")),
        )
    # What each node remembers of the modes goes with its sessions.
    assert a.claims.ignore_new == {op_later.session_id} and b.claims.ignore_new == {
        op_earlier.session_id
    }
    await a.release(dev_earlier)
    await a.release(op_later)
    assert not a.claims.local and not a.claims.ignore_new


@pytest_twisted.ensureDeferred
async def test_flushed_redis_is_repaired(nodes, redis_server):
    a = await nodes.add("a")
    b = await nodes.add("b")
    alice = Device("a", "alice")
    await a.claim(alice, True)
    await eventually(lambda: b.devices("alice"))
    redis_server.command("FLUSHALL")
    # The next lease refresh sees the epoch gone and rejoins.
    a.clock.advance(LEASE / 3)
    await eventually(lambda: redis_server.command("HLEN", "esf:u:alice") == b":1", what="repaired")
    await eventually(lambda: a.up)
    b.clock.advance(LEASE / 3)
    await eventually(lambda: b.up and holder(b, "alice") == alice.session_id)


@pytest_twisted.ensureDeferred
async def test_stop_leaves_the_cluster(nodes, redis_server):
    a = await nodes.add("a")
    b = await nodes.add("b")
    await a.claim(Device("a", "alice"), True)
    await eventually(lambda: b.devices("alice"))
    nodes.nodes.remove(a)
    await Deferred.fromCoroutine(a.stop())
    await eventually(lambda: not b.devices("alice"))
    assert redis_server.command("EXISTS", "esf:lease:a") == b":0"
    assert redis_server.command("SISMEMBER", "esf:nodes", "a") == b":0"


@pytest_twisted.ensureDeferred
async def test_a_join_under_way_as_the_node_leaves_does_not_bring_it_back(nodes, redis_server):
    """
    A join that a reconnection began and that is still under way when the
    node leaves (seen under load) must not renew the lease after the
    node's leaving removed it: the node would be listed a lease longer.
    """
    a = await nodes.add("a")
    nodes.nodes.remove(a)
    joining = Deferred.fromCoroutine(a.membership.join())
    await Deferred.fromCoroutine(a.stop())
    await joining  # every command it sent was answered
    assert redis_server.command("EXISTS", "esf:lease:a") == b":0"
    assert redis_server.command("SISMEMBER", "esf:nodes", "a") == b":0"


@pytest_twisted.ensureDeferred
async def test_posts_to_a_slow_redis_are_bounded(nodes, redis_server):
    a = await nodes.add("a")
    b = await nodes.add("b", max_posts_in_flight=5, timeout=3.0)
    alice = Device("a", "alice")
    await a.claim(alice, True)
    [remote] = await eventually(lambda: b.devices("alice"))
    redis_server.command("CLIENT", "PAUSE", "300", "WRITE")
    for i in range(20):
        remote.send(b"%d" % i)
    assert b.stats["remote_send_dropped"] == 15
    await eventually(lambda: len(alice.sent) == 5, what=lambda: alice.sent)
    assert alice.sent == [b"0", b"1", b"2", b"3", b"4"]
    remote.send(b"after")
    await eventually(lambda: alice.sent[-1:] == [b"after"])


class Batch:
    """Records begin/flush the way the engine's OutputBatch is used."""

    def __init__(self):
        self.calls = []

    def begin(self):
        self.calls.append("begin")
        return True

    def flush(self):
        self.calls.append("flush")


@pytest_twisted.ensureDeferred
async def test_one_read_of_the_inbox_is_one_batch(nodes):
    a = await nodes.add("a")
    b = await nodes.add("b")
    a.delivery_batch = batch = Batch()
    alice = Device("a", "alice")
    await a.claim(alice, True)
    [remote] = await eventually(lambda: b.devices("alice"))
    for _i in range(50):
        remote.send(b"x")
    await eventually(lambda: len(alice.sent) == 50)
    assert batch.calls and batch.calls.count("begin") == batch.calls.count("flush")
    assert batch.calls.count("begin") < 50


# -- twistd esf options ---------------------------------------------------------------


def test_tap_cluster_options():
    from twisted.python import usage

    from esf import tap

    options = tap.Options()
    options.parseOptions(
        ["--cluster", "redis://:secret@127.0.0.1:6390/2", "--node-id", "n7", "--cluster-lease", "3",
         "--cluster-inbox-bytes", "2097152"]
    )  # fmt: skip
    assert options["cluster-url"] == RedisURL("127.0.0.1", 6390, 2, password="secret")
    assert (options["node-id"], options["cluster-lease"]) == ("n7", 3.0)
    service = tap.makeService(options)
    assert isinstance(service.presence, ClusterPresence)
    assert service.engine.presence is service.presence
    assert service.engine.node_id == service.presence.node_id == "n7"
    assert service.presence.lease == 3.0
    assert service.presence.inbox.max_bytes == 2 * 1024 * 1024
    assert tap.Options()["cluster-inbox-bytes"] == 64 * 1024 * 1024
    assert service.presence.delivery_batch is service.engine.batch
    for bad in (
        ["--cluster", "http://x"],
        ["--cluster", "redis://h/db"],
        ["--node-id", "a b"],
        ["--cluster-lease", "0"],
        ["--cluster-lease", "x"],
        ["--cluster-inbox-bytes", "1000"],
    ):
        with pytest.raises(usage.UsageError):
            tap.Options().parseOptions(bad)


def test_tap_without_cluster_is_unchanged():
    from esf import tap
    from esf.server._presence import LocalPresence
    from esf.server._protocol import ServerService

    options = tap.Options()
    options.parseOptions([])
    service = tap.makeService(options)
    assert isinstance(service, ServerService)
    assert isinstance(service.engine.presence, LocalPresence)


@pytest_twisted.ensureDeferred
async def test_a_replaced_session_ends_even_if_the_push_out_is_lost(nodes):
    a = await nodes.add("a")
    b = await nodes.add("b")
    old = Device("a", "alice")
    await a.claim(old, True)
    await eventually(lambda: b.devices("alice"))
    # b's claim replaces it; the engine would push the old one out through
    # a's inbox, but here nobody does.
    await b.claim(Device("b", "alice"), True)
    await eventually(lambda: holder(a, "alice") != old.session_id)
    assert old.kicked == []
    a.clock.advance(a.push_out_grace)
    assert [reason for reason, _ in old.kicked] == [DisconnectedType.BEING_PUSHED_OUT]
    assert a.stats["pushed_out_without_notice"] == 1


@pytest_twisted.ensureDeferred
async def test_user_ids_with_separators(nodes):
    """
    The scripts split "user TAB kind" members and "session TAB node ..."
    values: a user ID holding tabs and colons goes through claim, the
    mirrors and the janitor unharmed.
    """
    a = await nodes.add("a")
    b = await nodes.add("b")
    odd = "ev\til:1\t2"
    device = Device("a", odd, 7)
    await a.claim(device, True)
    await eventually(lambda: b.get(odd, 7))
    assert b.user_ids() == [odd]
    [remote] = b.devices(odd)
    remote.send(b"\xff")
    await eventually(lambda: device.sent == [b"\xff"])
    # a dies; the janitor releases the odd user too.
    a.membership.ticker.stop()
    a.membership.running = False
    await a.link.stop()
    await a.reader.stop()
    nodes.nodes.remove(a)
    await sleep(LEASE + 0.1)
    b.clock.advance(LEASE / 3)
    await eventually(lambda: b.user_ids() == [], what="odd user released")


@pytest_twisted.ensureDeferred
async def test_password_from_the_url(tmp_path):
    from _redis import RedisServer

    server = RedisServer(tmp_path, args=("--requirepass", "s3 cr:et")).start()
    right = ClusterPresence(
        reactor, f"redis://:s3%20cr%3Aet@127.0.0.1:{server.port}/0", "a",
        clock=task.Clock(), lease=LEASE, timeout=1.0, block=0.2,
    )  # fmt: skip
    wrong = ClusterPresence(
        reactor, f"redis://:nope@127.0.0.1:{server.port}/0", "b",
        clock=task.Clock(), lease=LEASE, timeout=1.0, block=0.2,
    )  # fmt: skip
    try:
        right.start()
        wrong.start()
        await eventually(lambda: right.up, what="joins with the password")
        await sleep(0.3)
        # Refused by Redis: it runs alone, claims decided locally, at once.
        assert not wrong.up and not wrong.link.connected
        device = Device("b", "bob")
        assert (await wrong.claim(device, True)).won
        assert wrong.devices("bob") == (device,)
    finally:
        await Deferred.fromCoroutine(right.stop())
        await Deferred.fromCoroutine(wrong.stop())
        server.stop()


@pytest.mark.parametrize("trusted", [True, False])
@pytest_twisted.ensureDeferred
async def test_tls_from_the_url(tmp_path, trusted):
    from _redis import RedisServer
    from test_tls import make_certificate

    from esf.bench import free_port

    cert, key, _ = make_certificate(tmp_path)
    other = cert
    if not trusted:  # another self-signed certificate, trusting nothing Redis shows
        (tmp_path / "other").mkdir()
        other, _, _ = make_certificate(tmp_path / "other")
    tls_port = free_port()
    server = RedisServer(
        tmp_path,
        args=("--tls-port", str(tls_port), "--tls-cert-file", str(cert),
              "--tls-key-file", str(key), "--tls-auth-clients", "no"),
    ).start()  # fmt: skip
    url = f"rediss://localhost:{tls_port}/0?ssl_ca_certs={other}"
    assert RedisURL.parse(url).tls
    presence = ClusterPresence(
        reactor, url, "a", clock=task.Clock(), lease=LEASE, timeout=1.0, block=0.2
    )
    try:
        presence.start()
        if trusted:
            await eventually(lambda: presence.up, what="joins over TLS")
            device = Device("a", "alice")
            assert (await presence.claim(device, True)).won
            assert server.command("HLEN", "esf:u:alice") == b":1"
        else:
            await sleep(1.0)
            assert not presence.up and not presence.link.connected
    finally:
        await Deferred.fromCoroutine(presence.stop())
        server.stop()


@pytest_twisted.ensureDeferred
async def test_a_node_that_fell_behind_the_presence_stream_reloads(nodes):
    a = await nodes.add("a", presence_maxlen=10)
    b = await nodes.add("b")
    # b stops taking in what it reads (as if it lagged far behind) while a
    # logs 300 devices on; the stream keeps about 10 entries.
    process = b.streams.process
    b.streams.process = lambda reply, generation, **kw: None
    for i in range(300):
        await a.claim(Device("a", f"u{i:03}"), True)
    assert b.user_count() == 0
    b.clock.advance(LEASE / 3)  # b's upkeep sees the stream trimmed past it
    await eventually(lambda: b.up and b.user_count() == 300, what=b.user_count)
    b.streams.process = process
    await a.claim(Device("a", "u300"), True)
    await eventually(lambda: b.user_count() == 301)
    assert b.user_ids(0, 3) == ["u000", "u001", "u002"]


async def pause_reading(presence):
    """
    Stop C{presence} reading its streams (once its current read ends).
    """
    presence.membership.running = False
    presence.membership.changed()
    await presence._reading


def resume_reading(presence):
    presence.membership.running = True
    presence._reading = Deferred.fromCoroutine(presence.streams.run())


def ledger(redis_server, node):
    """
    What Redis holds of C{node}'s inbox: C{(entries, bytes counted)}.
    """
    length = int(redis_server.command("XLEN", f"esf:inbox:{node}")[1:])
    held = redis_server.command(
        "EVAL", "return tonumber(redis.call('HGET', KEYS[1], 'b')) or 0", "1", f"esf:ib:{node}"
    )
    return length, int(held[1:])


@pytest_twisted.ensureDeferred
async def test_an_inbox_trimmed_unread_is_counted_and_reading_goes_on(nodes, redis_server):
    # esf never trims an inbox (a full one refuses); something outside it
    # (an operator's XTRIM) may, and the node that finds it says so.  (a's
    # appends get a long deadline: 300 at once on a loaded machine may run
    # past the default's half second and be refused, which is not this
    # test's matter.)
    a = await nodes.add("a", timeout=10.0)
    b = await nodes.add("b")
    bob = Device("b", "bob")
    await b.claim(bob, True)
    [remote] = await eventually(lambda: a.devices("bob"))
    await pause_reading(b)
    for i in range(300):
        remote.send(b"%d" % i)
        a.outbox.flush()  # one inbox entry each
    await a.link.execute("PING")  # a's appends are done
    assert ledger(redis_server, "b")[0] == 300
    redis_server.command("XTRIM", "esf:inbox:b", "MAXLEN", "10")
    b.clock.advance(LEASE / 3)
    await eventually(lambda: b.stats["inbox_overrun"] == 1)
    resume_reading(b)
    remote.send(b"last")
    await eventually(lambda: bob.sent[-1:] == [b"last"], what=lambda: bob.sent[-3:])
    # What was kept arrives, in order, the oldest ones lost.
    assert bob.sent[:-1] == [b"%d" % i for i in range(290, 300)]
    # The inbox is empty again, and so is its count, which the trim had
    # left too high.
    await b.inbox.settled()
    assert ledger(redis_server, "b") == (0, 0)


@pytest_twisted.ensureDeferred
async def test_an_inbox_read_and_deleted_with_more_to_read_is_not_taken_for_trimmed(
    nodes, redis_server
):
    # The node deletes what it delivered: its inbox then starts after what
    # it read, with entries it has not read yet, as it does under any
    # steady traffic.  Nothing was lost, and nothing is said to be.
    a = await nodes.add("a")
    b = await nodes.add("b")
    bob = Device("b", "bob")
    await b.claim(bob, True)
    [remote] = await eventually(lambda: a.devices("bob"))
    for i in range(3):
        remote.send(b"%d" % i)
        a.outbox.flush()
    await eventually(lambda: len(bob.sent) == 3)
    await pause_reading(b)
    await b.inbox.settled()  # what it delivered is deleted
    for i in range(3, 6):
        remote.send(b"%d" % i)
        a.outbox.flush()
    await a.link.execute("PING")  # a's appends are done
    assert ledger(redis_server, "b")[0] == 3  # the three unread ones
    await b.membership.tick()
    assert b.stats["inbox_overrun"] == 0
    resume_reading(b)
    await eventually(lambda: len(bob.sent) == 6, what=lambda: bob.sent)
    assert bob.sent == [b"%d" % i for i in range(6)]
    await b.membership.tick()
    assert b.stats["inbox_overrun"] == 0


@pytest_twisted.ensureDeferred
async def test_leaving_during_an_upkeep_warns_of_nothing(nodes):
    """
    A node that leaves the cluster while its upkeep is under way closes
    the connections under it: the upkeep ends, and nothing failed (a
    clean shutdown warned "cluster upkeep failed: Lost connection").  An
    upkeep that fails otherwise still warns.
    """
    a = await nodes.add("a")
    link = a.membership.link
    lost = RedisUnavailable("Redis at redis://127.0.0.1/0: Lost connection")
    failing = type(
        "Lost",
        (),
        {
            "connected": True,
            "eval": staticmethod(lambda *args, **kw: fail(lost)),
            "execute": staticmethod(lambda *args, **kw: fail(lost)),
        },
    )()
    a.membership.link = failing
    try:
        with LogCapture() as logs:
            await Deferred.fromCoroutine(a.membership.tick())
            [warned] = logs.esf("cluster_tick_failed")
            assert "Lost connection" in str(warned["error"])
            a.membership.stop()  # leaving
            await Deferred.fromCoroutine(a.membership.tick())
        assert len(logs.esf("cluster_tick_failed")) == 1
    finally:
        a.membership.link = link


# -- the inbox's bounds -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_full_inbox_refuses_and_both_nodes_say_so(nodes, redis_server):
    a = await nodes.add("a")
    b = await nodes.add("b", inbox_bytes=1024 * 1024)
    bob = Device("b", "bob")
    await b.claim(bob, True)
    [remote] = await eventually(lambda: a.devices("bob"))
    await pause_reading(b)  # b falls behind
    payloads = [bytes([i]) * 300_000 for i in range(8)]
    with LogCapture() as logs:
        for payload in payloads:
            remote.send(payload)  # past 256 KiB: one entry each, at once
        await a.link.execute("PING")  # a's appends are answered
        # Three entries fit in b's 1 MiB; the other five are refused.
        length, held = ledger(redis_server, "b")
        assert length == 3 and 900_000 < held <= 1024 * 1024
        assert a.stats["inbox_refused"] == 5 and a.stats["remote_send_failed"] == 0
        [refused] = logs.esf("cluster_inbox_refused")  # once per upkeep
        assert refused["node"] == "b"
        # b learns at its upkeep that it fell behind: counted, logged once.
        b.clock.advance(LEASE / 3)
        await eventually(lambda: b.stats["inbox_full"] == 5, what=lambda: b.stats)
        [full] = logs.esf("cluster_inbox_full")
        assert full["refused"] == 5 and full["length"] == 3
    # b reads again: what was kept arrives in order and leaves Redis; then
    # there is room again.
    resume_reading(b)
    await eventually(lambda: len(bob.sent) == 3)
    assert bob.sent == payloads[:3]
    await b.inbox.settled()
    assert ledger(redis_server, "b") == (0, 0)
    remote.send(b"room again")
    await eventually(lambda: bob.sent[-1:] == [b"room again"])
    assert a.stats["inbox_refused"] == 5


@pytest_twisted.ensureDeferred
async def test_an_inbox_is_bounded_in_entries(nodes, redis_server):
    a = await nodes.add("a")
    b = await nodes.add("b", inbox_maxlen=5)
    bob = Device("b", "bob")
    await b.claim(bob, True)
    [remote] = await eventually(lambda: a.devices("bob"))
    await pause_reading(b)
    for i in range(8):
        remote.send(b"%d" % i)
        a.outbox.flush()  # one entry each
    await a.link.execute("PING")
    assert ledger(redis_server, "b")[0] == 5
    assert a.stats["inbox_refused"] == 3
    resume_reading(b)
    await eventually(lambda: len(bob.sent) == 5)
    assert bob.sent == [b"0", b"1", b"2", b"3", b"4"]


@pytest_twisted.ensureDeferred
async def test_a_dead_nodes_inbox_goes_and_stays_gone(nodes, redis_server):
    a = await nodes.add("a")
    b = await nodes.add("b")
    bob = Device("b", "bob")
    await b.claim(bob, True)
    [remote] = await eventually(lambda: a.devices("bob"))
    await pause_reading(b)
    remote.send(b"never read")
    a.outbox.flush()
    await a.link.execute("PING")
    assert ledger(redis_server, "b")[0] == 1
    # b dies; once its lease expired, a's janitor reaps it.
    b.membership.ticker.stop()
    await b.link.stop()
    await b.reader.stop()
    nodes.nodes.remove(b)
    await sleep(LEASE)
    a.clock.advance(LEASE / 3)
    await eventually(lambda: not a.devices("bob"), what="bob released")
    assert redis_server.command("EXISTS", "esf:inbox:b", "esf:ib:b") == b":0"
    # A send a's mirror let through just before is not kept for nobody.
    remote.send(b"too late")
    a.outbox.flush()
    await a.link.execute("PING")
    assert a.stats["inbox_gone"] == 1
    assert redis_server.command("EXISTS", "esf:inbox:b", "esf:ib:b") == b":0"


@pytest_twisted.ensureDeferred
async def test_a_refused_append_leaves_the_inbox_as_it_was(nodes, redis_server):
    """
    An append that Redis runs past its deadline, or to a node that is not
    in the cluster, adds nothing: no entry, no bytes counted, no inbox made
    for the absent node; what the inbox held arrives, in order.
    """
    a = await nodes.add("a")
    b = await nodes.add("b")
    bob = Device("b", "bob")
    await b.claim(bob, True)
    [remote] = await eventually(lambda: a.devices("bob"))
    remote.send(b"kept")
    a.outbox.flush()
    await eventually(lambda: bob.sent == [b"kept"])
    await pause_reading(b)
    await b.membership.hold.renew()  # (b's clock stands still: its lease is renewed by hand)
    remote.send(b"waiting")
    a.outbox.flush()
    await a.link.execute("PING")
    before = ledger(redis_server, "b")
    assert before[0] == 1
    # Redis runs it after its deadline (as when it was hung): refused.
    assert await a.inbox.append("b", b"x" * 1000, within=-1.0) == LATE
    assert ledger(redis_server, "b") == before
    # A node that is not in the cluster: refused, and no stream made.
    assert await a.inbox.append("ghost", b"y" * 1000) == GONE
    assert redis_server.command("EXISTS", "esf:inbox:ghost", "esf:ib:ghost") == b":0"
    # The next one is admitted, and counted.
    await b.membership.hold.renew()
    remote.send(b"after")
    a.outbox.flush()
    await a.link.execute("PING")
    length, held = ledger(redis_server, "b")
    assert length == 2 and held > before[1]
    # b reads on: nothing refused reaches bob, and the order holds.
    resume_reading(b)
    await eventually(lambda: len(bob.sent) == 3, what=lambda: bob.sent)
    assert bob.sent == [b"kept", b"waiting", b"after"]
    await b.inbox.settled()
    assert ledger(redis_server, "b") == (0, 0)


class RecordingLink:
    """
    An IRedisLink that records C{eval} calls and answers them with
    C{answer}, and C{eval_unanswered} calls (which raise C{answer} if it is
    an exception).
    """

    def __init__(self, answer=0):
        self.evals = []
        self.unanswered = []
        self.answer = answer

    def eval(self, script, keys, args):
        self.evals.append(list(args))
        if isinstance(self.answer, Exception):
            return fail(self.answer)
        return succeed(self.answer)

    def eval_unanswered(self, script, keys, args):
        if isinstance(self.answer, Exception):
            raise self.answer
        self.unanswered.append(list(args))


@pytest_twisted.ensureDeferred
async def test_an_unanswered_script_runs_and_leaves_no_reply_behind(redis_server):
    # Its reply skipped, the next call's reply is the next call's: were it
    # left behind, the GET would take the script's reply for its own.
    from _redis import connected_link

    link = await connected_link(redis_server.url)
    try:
        script = b"redis.call('SET', KEYS[1], ARGV[1]); return 'the reply'"
        link.eval_unanswered(script, ["k"], [b"set"])
        link.eval_unanswered(script, ["k"], [b"set again"])
        assert await link.execute("GET", "k") == b"set again"
        assert await link.execute("PING") == b"PONG"
    finally:
        await link.stop()
    with pytest.raises(NotSent):
        link.eval_unanswered(script, ["k"], [b"after the stop"])
    # A user whom an ACL forbids CLIENT: the script is answered, and the
    # answer let go; the calls after it get their own replies still.
    redis_server.command("ACL", "SETUSER", "limited", "on", ">pw", "~*", "&*", "+@all", "-client")
    url = redis_server.url.replace("redis://", "redis://limited:pw@")
    link = await connected_link(url)
    try:
        link.eval_unanswered(script, ["k"], [b"set by limited"])
        assert await link.execute("GET", "k") == b"set by limited"
        assert await link.execute("PING") == b"PONG"
    finally:
        await link.stop()


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
@pytest_twisted.ensureDeferred
async def test_the_links_commands_leave_at_once_with_nagle_off(tmp_path, tls):
    """
    A command written on a link, over TCP or TLS, reaches Redis before the
    reactor's next turn, not at its next look at the socket (so that the
    deletion of what an inbox read delivered goes before the devices'
    bytes, which leave at the next turn), and Nagle's algorithm is off.
    """
    import socket

    from _redis import RedisServer, connected_link
    from test_tls import make_certificate

    from esf.bench import free_port

    args: tuple[str, ...] = ()
    if tls:
        cert, key, _ = make_certificate(tmp_path)
        tls_port = free_port()
        args = ("--tls-port", str(tls_port), "--tls-cert-file", str(cert),
                "--tls-key-file", str(key), "--tls-auth-clients", "no")  # fmt: skip
    server = RedisServer(tmp_path, args=args).start()
    url = f"rediss://localhost:{tls_port}/0?ssl_ca_certs={cert}" if tls else server.url
    link = await connected_link(url)
    try:
        transport = link._protocol.transport
        tcp = transport.transport if tls else transport  # (beneath TLS)
        assert tcp.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        for n, send in enumerate(
            (
                lambda key: link.execute("SET", key, "v"),
                lambda key: link.eval_unanswered(b"redis.call('SET', KEYS[1], 'v')", [key], []),
            )
        ):
            key = f"k{n}"
            answer = send(key)
            # No return to the reactor until Redis has it (a bounded wait:
            # a command the transport kept would never get there).
            deadline = time.monotonic() + 2
            while server.command("EXISTS", key) != b":1":
                assert time.monotonic() < deadline, f"{key} is not in Redis before the turn ends"
            if answer is not None:
                assert await answer == b"OK"
        assert await link.execute("GET", "k1") == b"v"
    finally:
        await link.stop()
        server.stop()


def test_delivered_entries_are_deleted_by_the_next_drop_on_the_link_it_names():
    clock, commands, reads = task.Clock(), RecordingLink(), RecordingLink()
    inbox = InboxLedger(clock, commands, "esf:", "b", stats=collections.Counter())
    inbox.delivered([(b"1-0", 10), (b"1-1", 20)])
    inbox.delivered([(b"2-0", 30)])
    assert commands.evals == reads.evals == []  # nothing until the next drop
    inbox.drop(reads)  # the reader's link, before its next read: no reply
    assert reads.unanswered == [[b"1-0", 10, b"1-1", 20, b"2-0", 30]]
    assert reads.evals == commands.evals == []
    inbox.drop(reads)
    assert len(reads.unanswered) == 1  # nothing more to delete
    assert clock.getDelayedCalls() == []
    # A deletion that could not be sent is asked again with the next one.
    broken = RecordingLink(NotSent("gone"))
    inbox.delivered([(b"3-0", 5)])
    inbox.drop(broken)
    inbox.delivered([(b"4-0", 1)])
    inbox.settled()  # deletes what waits now, on the command link
    assert commands.evals == [[b"3-0", 5, b"4-0", 1]]


def test_an_unanswered_deletion_whose_read_failed_is_asked_for_again():
    # The read sent after it on its connection is what says Redis ran it:
    # if that read fails (the connection dropped), the deletion may never
    # have run, and goes again with the next.
    clock, commands, reads = task.Clock(), RecordingLink(), RecordingLink()
    inbox = InboxLedger(clock, commands, "esf:", "b", stats=collections.Counter())
    inbox.delivered([(b"1-0", 10)])
    inbox.drop(reads)
    inbox.read_ended(answered=True)  # ran before the read
    inbox.delivered([(b"2-0", 20)])
    inbox.drop(reads)
    inbox.read_ended(answered=False)
    inbox.delivered([(b"3-0", 30)])
    inbox.drop(reads)
    assert reads.unanswered == [[b"1-0", 10], [b"2-0", 20], [b"2-0", 20, b"3-0", 30]]
    inbox.read_ended(answered=False)
    inbox.settled()  # on the command link: what no answered read followed
    assert commands.evals == [[b"2-0", 20, b"3-0", 30]]


@pytest_twisted.ensureDeferred
async def test_what_a_node_reads_after_its_lease_may_have_run_out_is_taken_first(
    nodes, redis_server
):
    # A node whose lease may have run out (it was paused) delivers what it
    # reads only after taking it from Redis (deleted, and its lease renewed,
    # in one step); what the janitor reaped meanwhile (its senders told) it
    # skips.
    a = await nodes.add("a")
    b = await nodes.add("b")
    alice = Device("a", "alice")
    assert (await a.claim(alice, True)).won
    await eventually(lambda: b.devices("alice"))
    [to_alice] = b.devices("alice")

    async def read_after_a_pause(data, reaped=False):
        await pause_reading(a)
        to_alice.send(data)
        await eventually(lambda: ledger(redis_server, "a")[0] == 1, what="appended")
        a.membership.hold.sure_until = 0.0  # as after a pause
        redis_server.command("PEXPIRE", "esf:lease:a", "50")
        if reaped:
            take = a.inbox.take

            def reaped_first(link, entries, lease, token):
                redis_server.command("DEL", "esf:inbox:a", "esf:ib:a")  # the janitor's reap
                return take(link, entries, lease, token)

            a.inbox.take = reaped_first
        resume_reading(a)

    await read_after_a_pause(b"one")
    await eventually(lambda: alice.sent == [b"one"], what="delivered once taken")
    assert ledger(redis_server, "a") == (0, 0)
    assert int(redis_server.command("PTTL", "esf:lease:a")[1:]) > LEASE * 1000 * 0.9
    assert a.membership.hold.sure()

    await read_after_a_pause(b"two", reaped=True)
    await eventually(lambda: a.stats["inbox_reaped_unread"] == 1, what="skipped")
    assert alice.sent == [b"one"]
    a.clock.advance(LEASE / 3)  # its upkeep renews its lease
    await eventually(a.membership.hold.sure, what="the lease renewed")
    to_alice.send(b"three")
    await eventually(lambda: alice.sent == [b"one", b"three"], what="reading goes on")
