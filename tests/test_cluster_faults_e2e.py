"""
The cluster's fault matrix: three real C{twistd esf --cluster} nodes on one
C{redis-server} of the test's own, a client on each node sending
numbered C{SendCertainly} to a user on the next node every 60 ms and
acknowledging what it gets, while one fault happens (a node killed, a node
paused past its lease, Redis paused, Redis restarted empty, every node
stopped and started again in turn).

Under every fault, each message is delivered once at its receiver or its
sender gets an C{Error} (C{UserOffline}, C{RateLimited}); none both, none
twice, none missing.  The one exception is C{Timeout}, the answer when Redis
did not answer the append: the message was delivered before it came, or
never is.  Each Error comes within its bound (docs/cluster.md,
Guarantees); then every live node lists exactly the users whose clients are
connected (C{GetAllOnlineUsers}, C{QueryOnlines}).  A sender whose own
connection was cut (its node killed or stopped) cannot be told: what it sent
that had no answer when its connection dropped may be missing, never twice.
And a Redis restarted without persistence loses what it had taken and no
node had read yet (documented): a number sent within L{UNREAD} before it was
killed may be missing too.

Each phase lasts C{ESF_FAULT_SECONDS} (1 s by default, so that each case
takes about 7-10 s; three run side by side); set it higher to run the
faults longer.
"""

from __future__ import annotations

import collections
import os
import signal
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import rawclient as rc
from _redis import RedisServer
from test_cluster_e2e import (
    ACK,
    LEASE,
    QUERY_ONLINES,
    SEND_CERTAINLY,
    USER_OFFLINE,
    info,
    launch_node,
    node_ready,
)

pytestmark = pytest.mark.e2e

#: How long traffic runs before, during and after each fault.
PHASE = float(os.environ.get("ESF_FAULT_SECONDS", "1.0"))
#: Seconds between two messages of one sender.
INTERVAL = 0.06
#: How long before a Redis restart a sent number may have been taken and not
#: read by its receiver's node (the documented loss).
UNREAD = 0.25
RATE_LIMITED = 8
#: LogonResult.Busy: a logon refused for now (clients retry).
BUSY = 5
TIMEOUT = 9
#: Each node's user, and whom that user sends to (a user on the next node).
USERS = ("amy", "ben", "cat")
#: Held while a case starts nodes (cases run side by side: L{SIDE_BY_SIDE}).
STARTING = threading.Lock()


class Peer:
    """
    One user's client (replaced when it connects again) sending numbered
    SendCertainly to another user and acknowledging those it gets, with
    what became of each number.
    """

    def __init__(self, user: str, to: str):
        self.user = user
        self.to = to
        self.client: rc.Client | None = None
        self.sent = 0
        self.last_sent_at = 0.0
        self.acked: set[int] = set()
        #: Error code per number, for the Errors answering this user's sends.
        self.errors: dict[int, int] = {}
        #: When each number was sent, and how long each Error took to come.
        self.sent_at: dict[int, float] = {}
        self.error_after: dict[int, float] = {}
        #: The numbers the other user sent this one, each as often as it came,
        #: and when each first came.
        self.received: collections.Counter[int] = collections.Counter()
        self.received_at: dict[int, float] = {}
        #: The numbers in the order they first came.
        self.order: list[int] = []
        #: Numbers sent on a connection that dropped before they were answered.
        self.cut: set[int] = set()
        #: The results of logons refused (retried) by L{connect}.
        self.refusals: list[int] = []
        #: Numbers the server said it stored for the receiver (an Ack from
        #: _0, with --offline): each must reach it later, once.
        self.stored: set[int] = set()

    def connect(self, node, timeout: float = 10.0) -> None:
        """
        Log on at C{node} (retrying a logon refused while the cluster
        settles).
        """
        deadline = time.monotonic() + timeout
        while True:
            client = rc.connect(node.port)
            reply = client.logon(self.user, "pw")
            if reply["result"] == 0:
                self.client = client
                return
            self.refusals.append(reply["result"])
            client.close()
            assert time.monotonic() < deadline, (self.user, reply)
            time.sleep(0.1)

    @property
    def live(self) -> bool:
        return self.client is not None

    def dropped(self) -> None:
        """
        The connection ended: what it sent unanswered cannot be told now.
        """
        if self.client is not None:
            self.client.close()
            self.client = None
        self.cut |= set(range(1, self.sent + 1)) - self.acked - set(self.errors)

    def tick(self, now: float) -> None:
        """
        Send the next number if it is time, then handle what arrived.
        """
        if self.client is None:
            return
        if now - self.last_sent_at >= INTERVAL:
            self.last_sent_at = now
            number = self.sent + 1
            try:
                self.client.send(SEND_CERTAINLY, info(1, b"#%d" % number), self.to, number)
            except OSError:
                self.dropped()
                return
            self.sent = number
            self.sent_at[number] = now
        self.pump()

    def pump(self) -> None:
        """
        Handle what has arrived, without waiting.
        """
        while self.client is not None:
            try:
                frame = self.client.recv_frame(timeout=0.002)
            except TimeoutError:
                return
            except OSError:
                frame = None
            if frame is None:
                self.dropped()
                return
            self.handle(*frame)

    def handle(self, header: dict, body: bytes) -> None:
        """
        Count one frame of the traffic.
        """
        kind, number = header["message_type"], header["message_id"]
        if kind == SEND_CERTAINLY:
            assert body[:5] == info(1, b"#"), body
            stored = header["dest_user_id"] == rc.SERVER  # kept for this user: its store ID
            if not stored:
                assert body == info(1, b"#%d" % number), body
            number_sent = int(body[5:])
            self.received[number_sent] += 1
            if number_sent not in self.received_at:
                self.received_at[number_sent] = time.monotonic()
                self.order.append(number_sent)
            try:
                if stored:  # acknowledged to the server, which then forgets it
                    self.client.send(ACK, struct.pack("<i", 1), rc.SERVER, number)
                else:
                    self.client.send(ACK, struct.pack("<i", 1), self.to, number)
            except OSError:
                pass  # read on until the connection's end
        elif kind == ACK:
            if header["user_id"] == rc.SERVER:
                self.stored.add(number)
            else:
                self.acked.add(number)
        elif kind == rc.ERROR:
            error = rc.parse_error(body)
            if error["request_type"] == SEND_CERTAINLY:
                assert number not in self.errors, f"{self.user}: {number} answered twice"
                self.errors[number] = error["code"]
                self.error_after[number] = time.monotonic() - self.sent_at[number]

    def settled(self, receiver: Peer) -> bool:
        """
        Whether every number sent has come or been answered.
        """
        done = set(receiver.received) | set(self.errors) | self.cut
        return set(range(1, self.sent + 1)) <= done


class Matrix:
    """
    Three nodes on one Redis and a L{Peer} on each, amy on n1 sending to
    ben on n2, ben to cat on n3, cat to amy.
    """

    def __init__(
        self, tmp_path, offline: bool = False, ignore_new: bool = False, persistent: bool = False
    ):
        self.tmp_path = tmp_path
        #: The nodes keep messages to offline users (--offline redis).
        self.offline = offline
        #: The nodes run --relogon-mode ignore-new (replace-old otherwise).
        self.ignore_new = ignore_new
        #: Redis writes every change to its append-only file before it
        #: answers (and so loses nothing when it is killed).
        self.persistent = persistent
        args = ("--appendonly", "yes", "--appendfsync", "always") if persistent else ()
        self.redis = RedisServer(tmp_path, args=args).start()
        self.nodes: list = [None, None, None]
        self.starts = 0
        self.peers = [Peer(user, USERS[(i + 1) % 3]) for i, user in enumerate(USERS)]
        #: When Redis was killed without persistence, if it was: what it
        #: had taken and no node had read yet is lost without an Error (as
        #: docs/cluster.md's Guarantees table says), so a number sent just
        #: before may be neither delivered nor told.
        self.redis_lost_at: float | None = None

    def launch(self, index: int):
        """
        Start node C{index}'s process (L{node_ready} waits for it).
        """
        self.starts += 1
        path = self.tmp_path / f"n{index + 1}-{self.starts}.log"
        options = ("--offline", "redis") if self.offline else ()
        if self.ignore_new:
            options += ("--relogon-mode", "ignore-new")
        self.nodes[index] = launch_node(path, self.redis.url, f"n{index + 1}", *options)
        return self.nodes[index]

    def start(self, index: int):
        with STARTING:
            return node_ready(self.launch(index))

    def up(self) -> None:
        # The three start side by side (and no other case's meanwhile).
        with STARTING:
            for index in range(3):
                self.launch(index)
            for node in self.nodes:
                node_ready(node)
        for peer, node in zip(self.peers, self.nodes):
            peer.connect(node)
        self.wait_listing(USERS)

    def run(self, seconds: float, until=lambda: False) -> None:
        """
        Traffic for C{seconds} (or until C{until()}).
        """
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not until():
            now = time.monotonic()
            for peer in self.peers:
                peer.tick(now)
            time.sleep(0.005)

    def drain(self, timeout: float = 10.0) -> None:
        """
        Stop sending; read until every number sent came or was answered.
        """
        deadline = time.monotonic() + timeout
        pairs = self.pairs()
        while time.monotonic() < deadline:
            for peer in self.peers:
                peer.pump()
            if all(sender.settled(receiver) for sender, receiver in pairs):
                return
            time.sleep(0.01)

    def pairs(self) -> list[tuple[Peer, Peer]]:
        return [(peer, self.peers[(i + 1) % 3]) for i, peer in enumerate(self.peers)]

    def ask(self, peer: Peer, kind: int, body: bytes) -> bytes:
        """
        The body of the server's answer to C{kind} at C{peer}'s node
        (traffic read meanwhile is counted).
        """
        assert peer.client is not None
        peer.client.send(kind, body, dest=rc.SERVER, msg_id=-7)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            frame = peer.client.recv_frame(timeout=max(deadline - time.monotonic(), 0.001))
            assert frame is not None, f"{peer.user}'s connection closed"
            header, answer = frame
            if header["message_type"] == kind:
                assert header["message_id"] == -7, header
                return answer
            peer.handle(header, answer)  # traffic that came meanwhile
        raise AssertionError(f"no answer to {kind} at {peer.user}'s node")

    def listing(self, peer: Peer) -> tuple[set[str], set[str]]:
        """
        Whom C{peer}'s node lists (C{GetAllOnlineUsers}), and which of
        L{USERS} it says are online (C{QueryOnlines}).
        """
        body = self.ask(peer, rc.GET_ALL_ONLINE_USERS, struct.pack("<II", 0, 0))
        listed = set(rc.parse_online_users(body)["users"])
        query = struct.pack("<I", len(USERS)) + b"".join(rc.pack_str(u) for u in USERS)
        body = self.ask(peer, QUERY_ONLINES, query)
        assert body[:4] == struct.pack("<I", len(USERS)) and len(body) == 4 + len(USERS), body
        return listed, {user for user, flag in zip(USERS, body[4:]) if flag}

    def wait_listing(self, users, timeout: float = 10.0) -> None:
        """
        Wait until every live client's node lists exactly C{users}, both
        ways.
        """
        expected = (set(users), set(users))
        deadline = time.monotonic() + timeout
        while True:
            seen = {peer.user: self.listing(peer) for peer in self.peers if peer.live}
            if all(listing == expected for listing in seen.values()):
                return
            assert time.monotonic() < deadline, f"listings {seen}, expected {expected}"
            time.sleep(0.1)

    def check(self) -> dict:
        """
        Assert that every number was delivered once or answered, not both;
        the counts.
        """
        self.drain()
        counts = {}
        for sender, receiver in self.pairs():
            sent = set(range(1, sender.sent + 1))
            delivered = set(receiver.received)
            told = set(sender.errors)
            stored = sender.stored
            who = f"{sender.user}->{receiver.user}"
            assert not stored & told, (who, "stored and told", sorted(stored & told))
            # Stored: delivered later (at the receiver's logon, or when its
            # node claimed it again), once.
            assert stored <= delivered, (
                who,
                "stored, never delivered",
                sorted(stored - delivered),
            )
            assert delivered <= sent, (who, sorted(delivered - sent))
            twice = sorted(n for n, times in receiver.received.items() if times > 1)
            assert not twice, (who, "delivered twice", twice)
            # In the order sent, gaps only where a number was answered (or
            # lost with a cut connection), stored ones included.
            late = [(a, b) for a, b in zip(receiver.order, receiver.order[1:]) if b < a]
            assert not late, (who, "out of order", late[:5])
            # Only a Timeout (Redis did not answer the append: delivered by
            # then, or never) may answer a number that was delivered, and
            # only one delivered before it came.
            both = [
                (n, sender.errors[n], round(sender.error_after[n], 2))
                for n in sorted(delivered & told)
                if sender.errors[n] != TIMEOUT
                or receiver.received_at[n] >= sender.sent_at[n] + sender.error_after[n]
            ]
            assert not both, (who, "delivered and told", both)
            missing = sent - delivered - told - sender.cut
            if self.redis_lost_at is not None:
                # Sent within UNREAD before the kill: a node reads its inbox
                # at once, so only these can have been taken and not read.
                lost_at = self.redis_lost_at
                missing = {n for n in missing if not 0 <= lost_at - sender.sent_at[n] <= UNREAD}
            assert not missing, (who, "neither delivered nor told", sorted(missing))
            assert set(sender.errors.values()) <= {USER_OFFLINE, RATE_LIMITED, TIMEOUT}, (
                sender.errors
            )
            counts[who] = (
                len(sent),
                len(delivered),
                len(told),
                len(sender.cut & sent - delivered),
                len(stored),
            )
        return counts

    def close(self) -> None:
        for peer in self.peers:
            if peer.client is not None:
                peer.client.close()
        for node in self.nodes:
            if node is not None:
                if node.process.poll() is None:
                    node.process.send_signal(signal.SIGCONT)
                node.stop()
        if self.redis.process is not None:
            self.redis.process.send_signal(signal.SIGCONT)
        self.redis.stop()


#: A request to a dead or paused node's user is answered when the janitor
#: reaps that node: within lease + lease/3 and one janitor round (lease/3),
#: with a second's slack for a loaded machine.
REAP_BOUND = LEASE * 5 / 3 + 1.0


def assert_answered_within(peer: Peer, seconds: float) -> None:
    """
    Every Error C{peer} got came within C{seconds} of its send.
    """
    slowest = max(peer.error_after.values())
    assert slowest < seconds, f"{peer.user}: an Error came {slowest:.1f} s after its send"


def kill_a_node(matrix: Matrix) -> None:
    """
    n1 is killed (SIGKILL): amy's connection drops; what cat sends her is
    delivered before the kill or answered UserOffline (at once once n1's
    lease ran out, or when the janitor reaps n1); ben and cat go on.
    """
    n1 = matrix.nodes[0]
    n1.process.send_signal(signal.SIGKILL)
    n1.process.wait(5)
    n1.stop()  # closes its log
    matrix.nodes[0] = None
    amy, _ben, cat = matrix.peers
    if matrix.ignore_new:
        # amy logs on again at once at another node.  Her dead node's
        # session still holds her device; that node does not confirm it, so
        # the logon is refused Busy (retried), never HadLoggedOn (final),
        # and soon wins (here after about 1.1 s: the reap comes later).
        matrix.run(0.2)
        assert not amy.live, "amy's connection outlived her node"
        started = time.monotonic()
        amy.connect(matrix.nodes[1])
        assert time.monotonic() - started < LEASE + 2.0, "amy was kept out past her node's lease"
        assert set(amy.refusals) <= {BUSY}, amy.refusals
        matrix.run(LEASE * 4 / 3 + 1.5 + PHASE)
        assert_answered_within(cat, REAP_BOUND)
        matrix.wait_listing(USERS)
        return
    matrix.run(LEASE * 4 / 3 + 1.5 + PHASE)
    assert not amy.live, "amy's connection outlived her node"
    assert cat.errors, "cat was never told amy is gone"
    assert_answered_within(cat, REAP_BOUND)
    matrix.wait_listing(("ben", "cat"))
    if matrix.offline:
        # What was stored for amy meanwhile reaches her at another node.
        assert cat.stored, "nothing was stored for amy while she was offline"
        amy.connect(matrix.nodes[1])
        matrix.wait_listing(USERS)


def restart_a_killed_node(matrix: Matrix) -> None:
    """
    n1 is killed (SIGKILL) and started again at once with its node ID, as a
    supervisor would: the new process joins once the killed one's lease has
    ended (it waits, alone, if it starts before; how soon it starts depends
    on the machine, so only the in-process test holds that wait to
    account), never taking it for a live process with its ID; amy logs on
    there again.  What cat sent her meanwhile was delivered before the
    kill, or answered, or (with --offline) stored and delivered to her there.
    """
    n1 = matrix.nodes[0]
    n1.process.send_signal(signal.SIGKILL)
    n1.process.wait(5)
    n1.stop()
    node = matrix.start(0)  # it joins (within node_ready's bound)
    assert "renews its lease" not in node.log(), node.log()
    matrix.run(PHASE)
    amy = matrix.peers[0]
    assert not amy.live, "amy's connection outlived her node"
    amy.connect(node)
    matrix.wait_listing(USERS)


def pause_a_node(matrix: Matrix) -> None:
    """
    n1 is paused (SIGSTOP) past its lease, reaped, then resumed (SIGCONT):
    it claims amy's session again and traffic to and from her goes on.
    """
    n1 = matrix.nodes[0]
    n1.process.send_signal(signal.SIGSTOP)
    try:
        matrix.run(LEASE * 4 / 3 + 1.0 + PHASE)
    finally:
        n1.process.send_signal(signal.SIGCONT)
    cat = matrix.peers[2]
    assert cat.errors, "cat was never told amy's node is gone"
    assert_answered_within(cat, REAP_BOUND)


def pause_redis(matrix: Matrix) -> None:
    """
    Redis is paused (SIGSTOP) for a few seconds, then resumed: cross-node
    sends meanwhile are answered UserOffline within 2 s, and none of them
    is delivered later.
    """
    matrix.redis.process.send_signal(signal.SIGSTOP)
    try:
        matrix.run(max(PHASE, 3.0))
    finally:
        matrix.redis.process.send_signal(signal.SIGCONT)
    assert all(peer.errors for peer in matrix.peers), "a sender was never told"
    # Every call to Redis is bounded (2 s): the answers came within it
    # (with some slack for a loaded machine).
    for peer in matrix.peers:
        assert_answered_within(peer, 3.5)


def restart_redis(matrix: Matrix) -> None:
    """
    Redis is killed (SIGKILL) and started again, empty (no persistence) or
    with all it had (its append-only file, written before each answer):
    the nodes go on alone meanwhile, then join it again, claiming their
    devices again (another server answers).
    """
    joined = [node.log().count("in the cluster as") for node in matrix.nodes]
    if not matrix.persistent:
        matrix.redis_lost_at = time.monotonic()
    matrix.redis.stop()
    matrix.run(PHASE)
    matrix.redis.start()

    def rejoined() -> bool:
        return all(
            node.log().count("in the cluster as") > count
            for node, count in zip(matrix.nodes, joined)
        )

    matrix.run(15, until=rejoined)
    assert rejoined(), "\n".join(node.log() for node in matrix.nodes)


def rolling_restart(matrix: Matrix) -> None:
    """
    Each node in turn is stopped (SIGTERM) and started again, its user
    logging on again there: messages to her meanwhile are answered
    UserOffline, none is lost or doubled.
    """
    for index, peer in enumerate(matrix.peers):
        matrix.nodes[index].stop()
        matrix.run(PHASE / 2)
        assert not peer.live, f"{peer.user}'s connection outlived the stop"
        peer.connect(matrix.start(index))
        matrix.run(PHASE / 2)


FAULTS = {
    "node-killed": kill_a_node,
    "node-killed-restarted": restart_a_killed_node,
    "node-paused": pause_a_node,
    "redis-paused": pause_redis,
    "redis-restarted": restart_redis,
    "redis-killed-persistent": restart_redis,
    "rolling-restart": rolling_restart,
}


#: Every fault runs again with --offline redis: a SendCertainly to a user
#: the cluster lists as offline is stored (Ack from _0), and must reach her
#: later, once, where she logs on next or when her paused node claims her
#: session again; one to a user who is online is never stored.
OFFLINE_FAULTS = tuple(FAULTS)
#: And with --relogon-mode ignore-new, where a device its dead (or paused,
#: or stopped) node still holds must not keep its user out.
IGNORE_NEW_FAULTS = ("node-killed", "node-killed-restarted", "node-paused", "rolling-restart")


#: Cases run side by side, this many at a time: each is three nodes and a
#: Redis of its own that mostly wait (for a lease of 1.5 s), so the matrix
#: takes about a third of the time.  Nodes start for one case at a time
#: (L{STARTING}): a node starved of CPU while many start could miss its
#: lease, a fault no case asked for.
SIDE_BY_SIDE = 3


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory):
    """
    Every case of this run (those selected), started in a pool of
    L{SIDE_BY_SIDE} threads; each test waits for its own outcome.
    """
    cases = [
        tuple(item.callspec.params[name] for name in ("fault", "offline", "ignore_new"))
        for item in request.session.items
        if item.module is request.module and item.originalname == "test_fault"
    ]
    pool = ThreadPoolExecutor(SIDE_BY_SIDE)
    futures = {
        case: pool.submit(run_case, tmp_path_factory.mktemp("fault"), *case) for case in cases
    }
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize(
    "fault, offline, ignore_new",
    [(fault, False, False) for fault in FAULTS]
    + [(fault, True, False) for fault in OFFLINE_FAULTS]
    + [(fault, False, True) for fault in IGNORE_NEW_FAULTS],
    ids=[
        *FAULTS,
        *(f"{fault}-offline" for fault in OFFLINE_FAULTS),
        *(f"{fault}-ignore-new" for fault in IGNORE_NEW_FAULTS),
    ],
)
def test_fault(outcomes, fault, offline, ignore_new):
    """
    Traffic before, during and after the fault; every numbered
    SendCertainly delivered once, or answered, or (with --offline) stored
    and delivered later; and the listings exact (L{run_case}, run side by
    side with the other cases).
    """
    print(outcomes[fault, offline, ignore_new].result(timeout=180 + 20 * PHASE))


def run_case(tmp_path, fault: str, offline: bool, ignore_new: bool) -> str:
    """
    One case of the matrix; what it counted.
    """
    started = time.monotonic()
    matrix = Matrix(tmp_path, offline, ignore_new, persistent=fault == "redis-killed-persistent")
    try:
        matrix.up()
        matrix.run(PHASE)
        for sender, receiver in matrix.pairs():
            assert receiver.received and not sender.errors, (sender.user, sender.errors)
        FAULTS[fault](matrix)
        live = [peer.user for peer in matrix.peers if peer.live]
        matrix.wait_listing(live, timeout=LEASE * 4 / 3 + 5)
        before = {peer.user: len(peer.received) for peer in matrix.peers}
        matrix.run(PHASE)
        # Traffic flows again between the live users.
        for sender, receiver in matrix.pairs():
            if sender.live and receiver.live:
                assert len(receiver.received) > before[receiver.user], (sender.user, receiver.user)
        counts = matrix.check()
        matrix.wait_listing(live)
        return f"{fault} {offline} {ignore_new} {counts} {time.monotonic() - started:.1f} s"
    finally:
        matrix.close()
