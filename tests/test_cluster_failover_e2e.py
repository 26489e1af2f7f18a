"""
End-to-end test of a Redis failover under a cluster: two real C{twistd esf
--cluster redis+sentinel://...} nodes on 127.0.0.1, a master, its replica
and three Sentinels of the test's own (tests/_redis.py), clients on both
nodes sending each other numbered SendCertainly while the master is killed
and the Sentinels promote the replica.

Every message is delivered once or its sender is told (an Error); then
presence is whole on both nodes and a relogon across nodes pushes the old
session out.  Every wait is bounded; the whole test takes about 12 s.
"""

from __future__ import annotations

import collections
import struct
import time

import pytest
import rawclient as rc
from _redis import SentinelSet
from test_cluster_e2e import (
    ACK,
    BEING_PUSHED_OUT,
    SEND,
    SEND_CERTAINLY,
    USER_OFFLINE,
    info,
    start_node,
    wait_online,
)

pytestmark = pytest.mark.e2e

#: The Error code of a request whose append Redis did not answer.
TIMEOUT = 9

#: What may come to a client between the frames a step waits for.
TRAFFIC = (SEND_CERTAINLY, ACK, rc.ERROR, *rc.UNSOLICITED)


class Peer:
    """
    One client sending numbered SendCertainly to another user, and
    acknowledging those it gets, with what became of each.
    """

    def __init__(self, client: rc.Client, to: str):
        self.client = client
        self.to = to
        self.sent = 0
        self.acked: set[int] = set()
        self.errors: dict[int, int] = {}
        #: The numbers the other user sent this one, each as often as it came;
        #: when each first came, and when each Error came.
        self.received: collections.Counter[int] = collections.Counter()
        self.received_at: dict[int, float] = {}
        self.errors_at: dict[int, float] = {}

    def send_next(self) -> None:
        self.sent += 1
        body = info(1, b"#%d" % self.sent)
        self.client.send(SEND_CERTAINLY, body, dest=self.to, msg_id=self.sent)

    def pump(self) -> None:
        """
        Handle what has arrived, without waiting.
        """
        while True:
            try:
                frame = self.client.recv_frame(timeout=0.005)
            except TimeoutError:
                return
            assert frame is not None, f"{self.client.user}'s connection closed"
            header, body = frame
            kind, number = header["message_type"], header["message_id"]
            if kind == SEND_CERTAINLY:
                assert body == info(1, b"#%d" % number), body
                self.received[number] += 1
                self.received_at.setdefault(number, time.monotonic())
                self.client.send(ACK, struct.pack("<i", 1), dest=self.to, msg_id=number)
            elif kind == ACK:
                self.acked.add(number)
            elif kind == rc.ERROR:
                self.errors[number] = rc.parse_error(body)["code"]
                self.errors_at[number] = time.monotonic()

    def told(self) -> set[int]:
        return self.acked | set(self.errors)


def test_the_cluster_follows_a_sentinel_failover(tmp_path):
    """
    The master dies mid-traffic: the Sentinels promote the replica, both
    nodes follow it, and every numbered SendCertainly sent meanwhile
    either way was delivered once, or its sender got an Error
    (UserOffline: the node ran alone, or its append failed; Timeout: the
    dying master did not answer the append, and the message was delivered
    before that Error came, or never); none both, none twice.  Afterwards both nodes list both users, and a logon of
    alice's device at the other node pushes her first session out.
    """
    started = time.monotonic()
    redis = SentinelSet(tmp_path / "redis").start()
    nodes, clients = [], []
    try:
        for name in ("f1", "f2"):
            # A lease longer than the failover takes here (about 2 s).
            nodes.append(
                start_node(tmp_path / f"{name}.log", redis.url(), name, "--cluster-lease", "5")
            )
        n1, n2 = nodes

        def connect(node, user, client_type=0):
            client = rc.connect(node.port)
            clients.append(client)
            assert client.logon(user, "pw", client_type)["result"] == 0
            return client

        alice_client, bob_client = connect(n1, "alice", 1), connect(n2, "bob")
        wait_online(alice_client, "bob", 1)
        wait_online(bob_client, "alice", 1)
        alice, bob = Peer(alice_client, "bob"), Peer(bob_client, "alice")

        def exchange(seconds: float, until=lambda: False) -> None:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and not until():
                for peer in (alice, bob):
                    peer.send_next()
                    peer.pump()
                time.sleep(0.02)

        exchange(1.0)
        assert alice.acked and bob.acked and not alice.errors and not bob.errors
        old_master = redis.master.port
        redis.master.stop()  # kill -9
        killed_at = time.monotonic()

        def rejoined() -> bool:
            return all(len(node.log().split("in the cluster as")) >= 3 for node in nodes)

        exchange(20.0, until=rejoined)
        followed = time.monotonic() - killed_at
        assert rejoined(), "\n".join(node.log() for node in nodes)
        assert redis.master_port() == redis.replica.port != old_master
        exchange(1.0)  # and on, on the new master

        # Every message is accounted for: delivered, or its sender told.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for peer in (alice, bob):
                peer.pump()
            if all(
                set(range(1, sender.sent + 1)) <= set(receiver.received) | set(sender.errors)
                for sender, receiver in ((alice, bob), (bob, alice))
            ):
                break
        for sender, receiver in ((alice, bob), (bob, alice)):
            sent = set(range(1, sender.sent + 1))
            delivered = set(receiver.received)
            told = set(sender.errors)
            assert sent == delivered | told, (sender.client.user, sorted(sent - delivered - told))
            # Both only for a Timeout (the dying master did not answer the
            # append), and only delivered before it came.
            both = [
                n
                for n in delivered & told
                if sender.errors[n] != TIMEOUT or receiver.received_at[n] >= sender.errors_at[n]
            ]
            assert not both, (sender.client.user, sorted(both))
            assert max(receiver.received.values()) == 1, "delivered twice"
            assert USER_OFFLINE in sender.errors.values(), sender.errors
            assert set(sender.errors.values()) <= {USER_OFFLINE, TIMEOUT}, sender.errors
            # Counted at the receiver: an Ack is a one-way message, and one
            # sent while its node ran alone is dropped (its receiver read
            # offline there), so fewer may be acked than were delivered.
            assert sender.acked <= delivered
            # The window was seen: some failed, and messages went through
            # before it (on the old master) and after it (on the new one).
            assert told and min(delivered) < min(told) and max(delivered) > max(told)
        for node in nodes:
            assert "another Redis server answers" in node.log()
            assert f"names 127.0.0.1:{redis.replica.port} the master" in node.log()

        # Presence is whole on both nodes (an Ack of the last messages may
        # still be on its way).
        wait_online(alice_client, "bob", 1, skip=TRAFFIC)
        wait_online(bob_client, "alice", 1, skip=TRAFFIC)
        for client in (alice_client, bob_client):
            client.send(
                rc.GET_ALL_ONLINE_USERS, struct.pack("<II", 0, 0), dest=rc.SERVER, msg_id=5
            )
            _header, body = client.recv_until(rc.GET_ALL_ONLINE_USERS, skip=TRAFFIC)
            assert set(rc.parse_online_users(body)["users"]) == {"alice", "bob"}

        # A relogon across nodes pushes the old session out, through the
        # new master.
        again = connect(n2, "alice", 1)
        _header, body = alice_client.recv_until(rc.PUSHED_OUT, skip=TRAFFIC)
        assert "logged on again" in rc.parse_pushed_out(body)["cause"]
        _header, body = alice_client.recv_until(rc.DISCONNECT, skip=TRAFFIC)
        assert rc.parse_disconnect_notice(body)["type"] == BEING_PUSHED_OUT
        assert alice_client.recv_frame() is None
        carl = connect(n1, "carl")
        wait_online(carl, "alice", 1)
        carl.send(SEND, info(1, b"to the new one"), dest="alice")
        assert again.recv_until(SEND)[1] == info(1, b"to the new one")
        assert followed < 15 and time.monotonic() - started < 50
    finally:
        for client in clients:
            client.close()
        for node in nodes:
            node.stop()
        redis.stop()
