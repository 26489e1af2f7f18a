"""
Tests of the cluster's Redis through Sentinel, and of a failover: the
C{redis+sentinel://} URL, L{SentinelEndpoint} and the link's master check
on fakes and a clock; then, against real redis-servers, a failover to a
replica that missed the last writes (the node finds another server and
repairs what was lost), and a cluster that follows a real Sentinel's
failover.
"""

from __future__ import annotations

import re
import time
from types import SimpleNamespace

import pytest
import pytest_twisted
from _redis import RedisServer, SentinelSet
from test_cluster import Device, eventually, holder
from twisted.internet import endpoints, reactor, task
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from esf.cluster import ClusterPresence, RedisUnavailable, RedisURL
from esf.cluster._link import IRedisLink, RedisLink, _LinkFactory
from esf.cluster._sentinel import MasterNotFound, SentinelEndpoint

# -- the URL ---------------------------------------------------------------------


def test_sentinel_url():
    url = RedisURL.parse(
        "redis+sentinel://user:p%40ss@s1.example:26380,s2.example,[::1]:26390/my-master/3"
        "?sentinel_password=s%26cret&sentinel_username=watch"
    )
    assert url.sentinels == (("s1.example", 26380), ("s2.example", 26379), ("::1", 26390))
    assert (url.service, url.db, url.username, url.password) == ("my-master", 3, "user", "p@ss")
    assert (url.sentinel_username, url.sentinel_password) == ("watch", "s&cret")
    assert not url.tls
    # Never a password where logs can see it.
    for shown in (str(url), repr(url)):
        assert "p@ss" not in shown and "s&cret" not in shown
    assert str(url) == ("redis+sentinel://s1.example:26380,s2.example:26379,::1:26390/my-master/3")
    plain = RedisURL.parse("redis+sentinel://10.0.0.5/mymaster")
    assert (plain.sentinels, plain.service, plain.db) == ((("10.0.0.5", 26379),), "mymaster", 0)
    assert (plain.password, plain.username, plain.sentinel_password) == (None, None, None)
    assert RedisURL.parse("redis+sentinel://:pw@h/m/").password == "pw"
    # A plain URL is unchanged.
    assert RedisURL.parse("redis://h").service is None
    assert RedisURL.parse("redis://h").sentinels == ()


@pytest.mark.parametrize(
    "url, message",
    [
        ("redis+sentinel://h:26379", "a Sentinel URL names the service: redis+sentinel://HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB]"),
        ("redis+sentinel://h/", "a Sentinel URL names the service"),
        ("redis+sentinel://h/m/0/x", "a Sentinel URL names the service"),
        ("redis+sentinel://h/m/zero", "the database must be a number, not 'zero'"),
        ("redis+sentinel://h:x/m", "bad port in the Sentinel address 'h:x'"),
        ("redis+sentinel://h:99999/m", "bad port in the Sentinel address 'h:99999'"),
        ("redis+sentinel://:pw@h1,,h2/m", "bad Sentinel address '': HOST[:PORT]"),
        ("redis+sentinel:///m", "bad Sentinel address '': HOST[:PORT]"),
        ("redis+sentinel://h/m%20x", "bad service name 'm x'"),
        ("redis+sentinel://h/m?ssl_ca_certs=/ca.pem", "unknown parameters in a Redis URL: ssl_ca_certs"),
        ("redis+sentinel://h/m?timeout=1", "unknown parameters in a Redis URL: timeout"),
        ("rediss+sentinel://h/m", "TLS with Sentinel (rediss+sentinel://) is not supported: use redis+sentinel:// on a private network"),
        ("redis://h?sentinel_password=x", "unknown parameters in a Redis URL: sentinel_password"),
        ("sentinel://h/m", "a Redis URL starts with redis://, rediss:// or redis+sentinel://, not sentinel://"),
        ("redis://:secret@h:port/0", "bad port in 'h:port'"),
    ],
)  # fmt: skip
def test_bad_sentinel_urls_say_what_is_wrong(url, message):
    with pytest.raises(ValueError) as caught:
        RedisURL.parse(url)
    text = str(caught.value)
    assert text.startswith(message), text
    assert "\n" not in text and "secret" not in text and "pw" not in text


def test_tap_takes_a_sentinel_url():
    from twisted.python import usage

    from esf import tap

    options = tap.Options()
    options.parseOptions(["--cluster", "redis+sentinel://:pw@127.0.0.1:26390/esf/2"])
    url = options["cluster-url"]
    assert (url.sentinels, url.service, url.db, url.password) == (
        (("127.0.0.1", 26390),),
        "esf",
        2,
        "pw",
    )
    service = tap.makeService(options)
    assert isinstance(service.presence.link.url.endpoint(reactor, 1.0), SentinelEndpoint)
    with pytest.raises(usage.UsageError, match=r"^--cluster: a Sentinel URL names the service"):
        tap.Options().parseOptions(["--cluster", "redis+sentinel://127.0.0.1"])


# -- the endpoint, on fakes and a clock -------------------------------------------


class FakeSentinel:
    """
    What a Sentinel at one address does with a connection: refuse it,
    leave it hanging, or answer each command (after C{delay} seconds on
    the clock; never, if C{answers} says C{None} for it).
    """

    def __init__(self, clock, answers=None, *, refuse=False, hang=False, delay=0.1):
        self.clock = clock
        self.answers = answers or {}
        self.refuse = refuse
        self.hang = hang
        self.delay = delay
        self.commands: list[list[bytes]] = []
        self.transports: list[StringTransport] = []

    def connect(self, factory):
        if self.refuse:
            return fail(ConnectionRefusedError())
        if self.hang:
            return Deferred()
        protocol = factory.buildProtocol(None)
        transport = _AnsweringTransport(self, protocol)
        self.transports.append(transport)
        protocol.makeConnection(transport)
        return succeed(protocol)


class _AnsweringTransport(StringTransport):
    def __init__(self, sentinel, protocol):
        super().__init__()
        self.sentinel, self.protocol = sentinel, protocol

    def write(self, data):
        super().write(data)
        command = data.split(b"\r\n")[2::2]
        self.sentinel.commands.append(command)
        answer = self.sentinel.answers.get(command[0].upper())
        if answer is not None:
            self.sentinel.clock.callLater(self.sentinel.delay, self._answer, answer)

    def loseConnection(self):
        if not self.disconnecting:
            super().loseConnection()
            self.sentinel.clock.callLater(
                0, self.protocol.connectionLost, Failure(ConnectionDone())
            )

    def _answer(self, answer):
        if not self.disconnecting:
            self.protocol.dataReceived(answer)


MASTER = b"*2\r\n$8\r\n10.0.0.9\r\n$4\r\n6390\r\n"
UNKNOWN = b"*-1\r\n"


@implementer(IStreamClientEndpoint)
class MasterEndpoint:
    """Where the endpoint connects once it knows the master: records it."""

    def __init__(self):
        self.connected = []

    def connect(self, factory):
        protocol = Protocol()
        self.connected.append(factory)
        return succeed(protocol)


def fake_endpoint(clock, sentinels, **options):
    master = MasterEndpoint()
    asked = []

    def endpoint_for(host, port):
        asked.append((host, port))
        if (host, port) == ("10.0.0.9", 6390):
            return master
        fake = sentinels[(host, port)]

        @implementer(IStreamClientEndpoint)
        class One:
            def connect(self, factory):
                return fake.connect(factory)

        return One()

    endpoint = SentinelEndpoint(
        clock, list(sentinels), "esf", timeout=2.0, endpoint_for=endpoint_for, **options
    )
    return endpoint, master, asked


def test_the_sentinels_are_asked_in_turn_and_the_one_that_answers_goes_first(logs):
    clock = task.Clock()
    refusing = FakeSentinel(clock, refuse=True)
    unaware = FakeSentinel(clock, {b"SENTINEL": UNKNOWN})
    knowing = FakeSentinel(clock, {b"SENTINEL": MASTER})
    sentinels = {("s1", 1): refusing, ("s2", 2): unaware, ("s3", 3): knowing}
    endpoint, master, asked = fake_endpoint(clock, sentinels)
    verifyObject(IStreamClientEndpoint, endpoint)
    factory = Factory.forProtocol(Protocol)
    connected = endpoint.connect(factory)
    clock.advance(0.1)
    clock.advance(0.1)
    assert connected.called and master.connected == [factory]
    assert asked == [("s1", 1), ("s2", 2), ("s3", 3), ("10.0.0.9", 6390)]
    assert knowing.commands == [[b"SENTINEL", b"GET-MASTER-ADDR-BY-NAME", b"esf"]]
    assert endpoint.master == ("10.0.0.9", 6390)
    assert endpoint.sentinels == [("s3", 3), ("s1", 1), ("s2", 2)]
    # Every question's connection is closed.
    assert all(t.disconnecting for s in (unaware, knowing) for t in s.transports)
    # The next connection asks the one that answered first.
    asked.clear()
    endpoint.connect(factory)
    clock.advance(0.1)
    assert asked == [("s3", 3), ("10.0.0.9", 6390)]
    # A new master is logged once, when it changes.
    [event] = logs.esf("cluster_sentinel_master")
    assert event["master"] == "10.0.0.9:6390" and event["sentinel"] == "s3:3"


def test_a_sentinel_that_does_not_answer_is_passed_over_within_the_bound():
    clock = task.Clock()
    hanging = FakeSentinel(clock, hang=True)
    mute = FakeSentinel(clock, {})  # connects, never answers
    knowing = FakeSentinel(clock, {b"SENTINEL": MASTER})
    sentinels = {("s1", 1): hanging, ("s2", 2): mute, ("s3", 3): knowing}
    endpoint, master, _ = fake_endpoint(clock, sentinels)
    connected = endpoint.connect(Factory.forProtocol(Protocol))
    clock.advance(1.99)
    assert not master.connected
    clock.advance(0.01)  # the first one's bound
    clock.advance(2.0)  # the second one's
    [transport] = mute.transports
    assert transport.disconnected  # aborted: no late answer is read
    clock.advance(0.1)
    assert connected.called and len(master.connected) == 1
    assert clock.getDelayedCalls() == []


def test_no_sentinel_names_a_master(logs):
    clock = task.Clock()
    sentinels = {
        ("s1", 1): FakeSentinel(clock, refuse=True),
        ("s2", 2): FakeSentinel(clock, {b"SENTINEL": UNKNOWN}),
        ("s3", 3): FakeSentinel(clock, {b"SENTINEL": b"-ERR unknown command\r\n"}),
    }
    endpoint, master, _ = fake_endpoint(clock, sentinels)
    failures = []
    endpoint.connect(Factory.forProtocol(Protocol)).addErrback(failures.append)
    clock.advance(0.1)
    clock.advance(0.1)
    [failure] = failures
    assert failure.check(MasterNotFound) and not master.connected
    text = str(failure.value)
    assert text.startswith("no Sentinel named the master of 'esf': s1:1: Connection was refused")
    assert "s2:2: does not know 'esf'" in text
    assert text.endswith("; s3:3: ERR unknown command")
    # Logged once, not at every attempt alike.
    endpoint.connect(Factory.forProtocol(Protocol)).addErrback(failures.append)
    clock.advance(0.1)
    clock.advance(0.1)
    assert len(failures) == 2
    [logged] = logs.esf("cluster_redis_error")
    assert logged["failure"] == text


def test_the_sentinels_own_password():
    clock = task.Clock()
    knowing = FakeSentinel(clock, {b"AUTH": b"+OK\r\n", b"SENTINEL": MASTER})
    refusing = FakeSentinel(
        clock, {b"AUTH": b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"}
    )
    sentinels = {("s1", 1): refusing, ("s2", 2): knowing}
    endpoint, master, _ = fake_endpoint(clock, sentinels, username="watch", password="s3cret")
    failures = []
    connected = endpoint.connect(Factory.forProtocol(Protocol))
    connected.addErrback(failures.append)
    for _ in range(4):
        clock.advance(0.1)
    assert refusing.commands == [[b"AUTH", b"watch", b"s3cret"]]
    assert knowing.commands[0] == [b"AUTH", b"watch", b"s3cret"]
    assert knowing.commands[1][0] == b"SENTINEL"
    assert failures == [] and len(master.connected) == 1


def test_a_connection_given_up_stops_asking():
    clock = task.Clock()
    mute = FakeSentinel(clock, {})
    other = FakeSentinel(clock, {b"SENTINEL": MASTER})
    endpoint, master, asked = fake_endpoint(clock, {("s1", 1): mute, ("s2", 2): other})
    connecting = endpoint.connect(Factory.forProtocol(Protocol))
    failures = []
    connecting.addErrback(failures.append)
    connecting.cancel()
    assert failures[0].check(CancelledError)
    assert mute.transports[0].disconnected
    clock.advance(5)
    assert asked == [("s1", 1)] and not master.connected


# -- the link's master check, on a fake connection ----------------------------------


def role(name: bytes) -> bytes:
    return b"*3\r\n$%d\r\n%s\r\n:0\r\n*0\r\n" % (len(name), name)


def info(run_id: bytes) -> bytes:
    text = b"# Server\r\nredis_version:7.0.15\r\nrun_id:%s\r\n" % run_id
    return b"$%d\r\n%s\r\n" % (len(text), text)


def fake_link(url="redis+sentinel://127.0.0.1/esf/2"):
    clock = task.Clock()
    link = RedisLink(clock, RedisURL.parse(url), timeout=2.0)
    verifyObject(IRedisLink, link)
    ups = []
    link._on_connected = lambda: ups.append(1)
    protocol = _LinkFactory(link).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    ready = link._prepare(protocol)
    outcome = []
    ready.addBoth(outcome.append)
    return SimpleNamespace(
        clock=clock, link=link, protocol=protocol, transport=transport, outcome=outcome, ups=ups
    )


def feed(f, data: bytes) -> None:
    """
    C{data} from Redis; txredisapi's parser goes on after each bulk string
    a turn later (on the link's clock).
    """
    f.protocol.dataReceived(data)
    for _ in range(10):
        f.clock.advance(0)


def commands(transport: StringTransport) -> list[bytes]:
    return [c.split(b"\r\n")[2] for c in transport.value().split(b"*")[1:]]


def test_the_link_uses_a_connection_only_once_role_says_master():
    f = fake_link()
    feed(f, b"+OK\r\n")  # SELECT 2
    assert commands(f.transport) == [b"SELECT", b"ROLE"]
    feed(f, role(b"master"))
    assert commands(f.transport)[-1] == b"INFO"
    assert not f.link.connected
    feed(f, info(b"abc123"))
    assert commands(f.transport)[-1] == b"CLIENT"  # CLIENT REPLY ON: may it skip replies?
    feed(f, b"+OK\r\n")
    assert f.outcome == [None] and f.ups == [1]
    assert f.link.connected and f.link.server == "abc123"
    assert not f.transport.disconnecting


def test_a_replica_named_as_master_is_left(logs):
    f = fake_link()
    feed(f, b"+OK\r\n")
    feed(f, role(b"slave"))
    [failure] = f.outcome
    assert "which a Sentinel named, is not the master of 'esf' (ROLE: b'slave')" in str(
        failure.value
    )
    [logged] = logs.esf("cluster_redis_error")
    assert "is not the master of 'esf'" in str(logged["error"])
    assert f.transport.disconnected and not f.link.connected and f.ups == []


def test_a_master_check_without_an_answer_fails_within_the_bound():
    f = fake_link()
    feed(f, b"+OK\r\n")
    f.clock.advance(2.0)
    [failure] = f.outcome
    assert failure.check(RedisUnavailable) and f.transport.disconnected and f.ups == []


def test_without_sentinel_role_is_not_asked_and_info_may_be_refused():
    f = fake_link("redis://127.0.0.1/0")
    feed(f, b"+OK\r\n")
    assert commands(f.transport) == [b"SELECT", b"INFO"]
    feed(f, b"-NOPERM this user has no permissions to run the 'info' command\r\n")
    feed(f, b"+OK\r\n")  # CLIENT REPLY ON
    assert f.outcome == [None] and f.link.connected
    assert f.link.server == "127.0.0.1:6379"  # the URL's: its address is all it knows
    # With Sentinel, the master's address (which a failover changes).
    f = fake_link()
    feed(f, b"+OK\r\n" + role(b"master"))
    feed(f, b"-NOPERM this user has no permissions to run the 'info' command\r\n")
    feed(f, b"+OK\r\n")  # CLIENT REPLY ON
    peer = f.transport.getPeer()
    assert f.outcome == [None] and f.link.server == f"{peer.host}:{peer.port}"


@pytest.mark.parametrize(
    "error",
    [
        b"-READONLY You can't write against a read only replica.",
        b"-UNBLOCKED force unblock from blocking operation, instance state changed",
        b"-MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
    ],
)
def test_an_answer_from_a_server_no_longer_master_drops_the_connection(error):
    f = fake_link()
    feed(f, b"+OK\r\n" + role(b"master") + info(b"abc") + b"+OK\r\n")
    assert f.link.connected
    failures = []
    f.link.execute("SET", "k", "v").addErrback(failures.append)
    feed(f, error + b"\r\n")
    [failure] = failures
    assert failure.check(RedisUnavailable) and f.transport.disconnected
    # Any other error is the command's own.
    f = fake_link()
    feed(f, b"+OK\r\n" + role(b"master") + info(b"abc") + b"+OK\r\n")
    f.link.execute("INCR", "k").addErrback(failures.append)
    feed(f, b"-ERR value is not an integer or out of range\r\n")
    assert not failures[-1].check(RedisUnavailable) and not f.transport.disconnecting
    # Without Sentinel it is the command's own too: a new connection would
    # reach the same server.
    f = fake_link("redis://127.0.0.1/0")
    feed(f, b"+OK\r\n" + info(b"abc") + b"+OK\r\n")
    f.link.execute("SET", "k", "v").addErrback(failures.append)
    feed(f, error + b"\r\n")
    assert not failures[-1].check(RedisUnavailable) and not f.transport.disconnecting


def test_a_user_who_may_not_skip_replies_gets_its_unanswered_scripts_answered():
    # CLIENT REPLY refused (an ACL): a CLIENT REPLY SKIP would be refused
    # too, its error a reply nobody waits for, taken for the next call's.
    # The script goes as an ordinary call instead, its answer let go.
    f = fake_link("redis://127.0.0.1/0")
    feed(f, b"+OK\r\n" + info(b"abc"))
    feed(f, b"-NOPERM this user has no permissions to run the 'client|reply' command\r\n")
    assert f.outcome == [None] and f.link.connected
    f.transport.clear()
    f.link.eval_unanswered(b"return 1", ["k"], [b"a"])
    assert commands(f.transport) == [b"EVAL"]  # no CLIENT REPLY SKIP in front
    got = []
    f.link.execute("PING").addCallback(got.append)
    feed(f, b":1\r\n+PONG\r\n")
    assert got == [b"PONG"]
    # Where it may, the script goes after CLIENT REPLY SKIP, past the protocol.
    f = fake_link("redis://127.0.0.1/0")
    feed(f, b"+OK\r\n" + info(b"abc") + b"+OK\r\n")
    f.transport.clear()
    f.link.eval_unanswered(b"return 1", ["k"], [b"a"])
    assert commands(f.transport) == [b"CLIENT", b"EVAL"]


# -- a failover to a replica that missed the last writes, on real Redis ----------------


@implementer(IStreamClientEndpoint)
class Switch:
    """
    Connects to the Redis server it points at now: what Sentinel names the
    master, without Sentinel.
    """

    def __init__(self, server: RedisServer):
        self.server = server

    def connect(self, factory):
        return endpoints.TCP4ClientEndpoint(
            reactor, "127.0.0.1", self.server.port, timeout=1
        ).connect(factory)


def replica_pair(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = RedisServer(tmp_path / "old").start()
    new = RedisServer(tmp_path / "new", args=("--replicaof", "127.0.0.1", str(old.port))).start()
    return old, new


def in_sync(old: RedisServer, new: RedisServer) -> bool:
    offset = re.compile(rb"master_repl_offset:(\d+)")
    return (
        b"master_link_status:up" in new.info("replication")
        and offset.search(old.info("replication"))[1] == offset.search(new.info("replication"))[1]
    )


def run_id(server: RedisServer) -> str:
    return re.search(rb"run_id:(\w+)", server.info("server"))[1].decode()


def switched_presence(node_id, url, commands_switch, reader_switch=None):
    switches = {"commands": commands_switch, "inbox": reader_switch or commands_switch}

    def link(reactor, url, *, timeout, name):
        return RedisLink(reactor, url, timeout=timeout, name=name, endpoint=switches[name])

    presence = ClusterPresence(
        reactor, url, node_id, clock=task.Clock(), lease=60.0, timeout=1.0, block=0.2,
        link_factory=link,
    )  # fmt: skip
    presence.start()
    return presence


@pytest_twisted.ensureDeferred
async def test_a_failover_to_a_replica_that_missed_the_last_writes(tmp_path, logs):
    """
    The replica stops taking the master's writes; a release, a claim and
    an inbox entry go to the master only; the master dies and the replica
    is the master.  Both nodes notice another server, claim their devices
    again, release what Redis lost the release of, set the settling mark,
    and read their inboxes on from what the new master has, so that an
    entry it gives an ID at or below what was read on the old master (its
    clock behind) is delivered, and none twice.
    """
    old, new = replica_pair(tmp_path)
    switch = Switch(old)
    a = switched_presence("a", old.url, switch)
    b = switched_presence("b", old.url, switch)
    try:
        await eventually(lambda: a.up and b.up, what="both join")
        assert a.link.server == a.reader.server == run_id(old)
        alice, gone = Device("a", "alice"), Device("a", "gone")
        bob = Device("b", "bob")
        for presence, device in ((a, alice), (a, gone), (b, bob)):
            assert (await presence.claim(device, True)).won
        await eventually(lambda: b.devices("alice") and b.devices("gone") and a.devices("bob"))
        # An entry a delivers but whose deletion never reaches the replica.
        entries = []
        append = b.inbox.append
        b.inbox.append = lambda node, entry, within=None, deliver_within=None, process=b"": (
            entries.append(entry),
            append(node, entry, within, deliver_within, process),
        )[1]
        a.inbox.delivered = lambda read: None
        [to_alice] = b.devices("alice")
        to_alice.send(b"early")
        await eventually(lambda: alice.sent == [b"early"])
        await eventually(lambda: in_sync(old, new), what="the replica in sync")
        replicated_at = a.streams.inbox_at

        # From here on the replica misses the master's writes.
        new.reply("REPLICAOF", "NO", "ONE")
        assert await a.release(gone) is True
        carol = Device("b", "carol")
        assert (await b.claim(carol, True)).won
        to_alice.send(b"lost with the old master")
        await eventually(
            lambda: len(alice.sent) == 2,
            what=lambda: (alice.sent, a.stats, b.stats, a.up, b.up, entries),
        )
        read_on_old = a.streams.inbox_at
        assert read_on_old > replicated_at

        switch.server = new
        old.stop()
        await eventually(
            lambda: a.up and b.up and a.membership.server == b.membership.server == run_id(new),
            timeout=10,
            what="both join on the new master",
        )
        lost = logs.esf("cluster_data_lost")
        assert len(lost) == 2 and all("another Redis server answers" in e["what"] for e in lost)
        assert new.command("EXISTS", "esf:settling") == b":1"
        # Presence is right, in Redis and on both nodes.
        for presence in (a, b):
            await eventually(
                lambda p=presence: (
                    holder(p, "carol") == carol.session_id
                    and holder(p, "gone") is None
                    and holder(p, "alice") == alice.session_id
                ),
                what=lambda p=presence: p.user_ids(),
            )
        assert new.command("SISMEMBER", "esf:online", "gone") == b":0"
        assert new.command("HGET", "esf:u:carol", "0").startswith(b"$")
        # A new master whose clock is behind gives the next entry an ID at
        # or below what a read on the old one: a reads it all the same.
        assert a.streams.inbox_at == replicated_at  # read on from what it has
        new.reply("XADD", "esf:inbox:a", "{}-{}".format(*read_on_old), "m", entries[-1])
        await eventually(lambda: len(alice.sent) == 3, what=lambda: alice.sent)
        to_alice = b.get("alice", 0)
        to_alice.send(b"after")
        await eventually(lambda: len(alice.sent) == 4, what=lambda: alice.sent)
        assert alice.sent == [
            b"early",
            b"lost with the old master",
            b"lost with the old master",  # the one given the old ID again
            b"after",
        ]
    finally:
        for presence in (a, b):
            await Deferred.fromCoroutine(presence.stop())
        old.stop()
        new.stop()


@pytest_twisted.ensureDeferred
async def test_the_inbox_link_follows_the_server_the_node_joined_on(tmp_path, logs):
    """
    The inbox's connection reaches another server than the node's (it
    stayed on a demoted master): both are dropped and made again, until
    they reach one server; then the inbox is read there.
    """
    old, new = replica_pair(tmp_path)
    commands_switch, reader_switch = Switch(old), Switch(old)
    a = switched_presence("a", old.url, commands_switch, reader_switch)
    b = switched_presence("b", old.url, Switch(old))
    try:
        await eventually(lambda: a.up and b.up, what="both join")
        alice = Device("a", "alice")
        await a.claim(alice, True)
        await eventually(lambda: b.devices("alice"))
        await eventually(lambda: in_sync(old, new))
        new.reply("REPLICAOF", "NO", "ONE")
        reader_switch.server = new
        a.reader.drop()
        await eventually(
            lambda: logs.esf("cluster_links_apart"),
            what="the links apart",
        )
        reader_switch.server = old
        await eventually(lambda: a.up and a.reader.server == a.link.server == run_id(old))
        b.get("alice", 0).send(b"read on the old one")
        await eventually(lambda: alice.sent == [b"read on the old one"])
    finally:
        for presence in (a, b):
            await Deferred.fromCoroutine(presence.stop())
        old.stop()
        new.stop()


# -- a real Sentinel's failover ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_cluster_follows_a_sentinel_failover(tmp_path, logs):
    """
    Three Sentinels watch a master and its replica; the master dies; the
    Sentinels promote the replica, and both nodes follow it: both links on
    the new master, presence whole, the settling mark set.
    """
    sentinels = SentinelSet(tmp_path).start()
    a = b = None
    try:
        a, b = (
            ClusterPresence(
                reactor, sentinels.url(), node, clock=task.Clock(), lease=60.0, timeout=1.0,
                block=0.2,
            )
            for node in ("a", "b")
        )  # fmt: skip
        a.start()
        b.start()
        await eventually(lambda: a.up and b.up, what="both join")
        assert a.link.server == b.reader.server == run_id(sentinels.master)
        alice, bob = Device("a", "alice"), Device("b", "bob")
        await a.claim(alice, True)
        await b.claim(bob, True)
        await eventually(lambda: a.devices("bob") and b.devices("alice"))
        killed_at = time.monotonic()
        sentinels.master.stop()
        new = sentinels.replica
        await eventually(
            lambda: all(
                p.up and p.link.server == p.reader.server == p.membership.server == run_id(new)
                for p in (a, b)
            ),
            timeout=15,
            what="both follow the failover",
        )
        assert time.monotonic() - killed_at < 15
        assert sentinels.master_port() == new.port
        assert new.command("EXISTS", "esf:settling") == b":1"
        for presence in (a, b):
            assert holder(presence, "alice") == alice.session_id
            assert holder(presence, "bob") == bob.session_id
        b.get("alice", 0).send(b"after the failover")
        await eventually(lambda: alice.sent == [b"after the failover"])
        masters = {e["master"] for e in logs.esf("cluster_sentinel_master")}
        assert masters == {f"127.0.0.1:{sentinels.master.port}", f"127.0.0.1:{new.port}"}
    finally:
        for presence in (a, b):
            if presence is not None:
                await Deferred.fromCoroutine(presence.stop())
        sentinels.stop()


@pytest_twisted.ensureDeferred
async def test_after_a_failover_the_janitor_gives_the_other_nodes_a_lease_to_come_back(
    tmp_path, logs
):
    """
    The other nodes' leases ran out during the failover: the node that
    joins the new master first does not reap them before they had a
    lease's time to join again; one that does not come back is reaped
    after that.
    """
    old, new = replica_pair(tmp_path)
    to_a, to_b, to_c = Switch(old), Switch(old), Switch(old)
    a = switched_presence("a", old.url, to_a)
    b = switched_presence("b", old.url, to_b)
    c = switched_presence("c", old.url, to_c)
    try:
        await eventually(lambda: a.up and b.up and c.up, what="all join")
        bob = Device("b", "bob")
        await b.claim(bob, True)
        await eventually(lambda: a.devices("bob"))
        await eventually(lambda: in_sync(old, new))
        new.reply("REPLICAOF", "NO", "ONE")
        to_a.server = new
        old.stop()
        await eventually(lambda: a.up and a.membership.server == run_id(new), what="a moves")
        # b and c are still away; their leases ran out meanwhile.
        new.command("DEL", "esf:lease:b", "esf:lease:c")
        await a.membership.tick()
        assert logs.esf("cluster_node_reaped") == []
        assert new.command("SISMEMBER", "esf:nodes", "b") == b":1"
        assert holder(a, "bob") == bob.session_id
        to_b.server = new
        await eventually(lambda: b.up and b.membership.server == run_id(new), what="b moves")
        a.clock.advance(a.lease)  # the grace is over (its upkeep runs): c, still away, is dead
        await eventually(lambda: logs.esf("cluster_node_reaped"), what="c reaped")
        assert [e["node"] for e in logs.esf("cluster_node_reaped")] == ["c"]
        assert holder(a, "bob") == holder(b, "bob") == bob.session_id
    finally:
        for presence in (a, b, c):
            await Deferred.fromCoroutine(presence.stop())
        old.stop()
        new.stop()


def test_strays_are_this_nodes_devices_it_no_longer_holds():
    from esf.cluster._claims import strays
    from esf.cluster._records import Holder

    def value(sid, node):
        return Holder(sid, node, 1.0, "10.0.0.1:5000").encode()

    hashes = {
        "alice": {b"0": value("a/1", "a"), b"5": value("a/2", "a")},
        "bob": {b"0": value("b/1", "b")},
    }
    assert strays(hashes, "a", {"a/1"}) == {"a/2": ("alice", 5)}
    assert strays(hashes, "a", {"a/1", "a/2"}) == {}
    assert strays(hashes, "b", set()) == {"b/1": ("bob", 0)}
