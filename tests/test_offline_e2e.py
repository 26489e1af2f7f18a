"""
Offline messages end to end: real C{twistd esf --offline ...} processes on
127.0.0.1, the raw-socket client written from the wire contract.  A
message the sender was told is stored survives C{kill -9} of the server; in
a cluster it reaches its user at another node than the one that kept it.
"""

from __future__ import annotations

import signal
import struct
import subprocess

import pytest
import rawclient as rc
from test_cluster_e2e import start_node
from test_e2e import REPO, server_env, start_server, twistd_command

pytestmark = pytest.mark.e2e

SEND, SEND_CERTAINLY, ACK = 202, 205, 206
USER_OFFLINE = 2


def logged_on(port, user, client_type=0):
    client = rc.connect(port)
    reply = client.logon(user, "", client_type)
    assert reply["result"] == 0, reply
    return client


def information(information_type, payload):
    return struct.pack("<i", information_type) + payload


def test_stored_messages_survive_kill_9(tmp_path):
    db = tmp_path / "offline.db"
    server = start_server(tmp_path / "one.log", ["--offline", f"sqlite:{db}"])
    try:
        alice = logged_on(server.port, "alice", client_type=5)
        for n in range(1, 21):
            alice.send(SEND_CERTAINLY, information(n, b"kept %d" % n), dest="bob", msg_id=n)
        for n in range(1, 21):
            header, body = alice.recv_until(ACK)
            # From the server: stored, not delivered.
            assert header["user_id"] == rc.SERVER and header["message_id"] == n
            assert struct.unpack("<i", body) == (n,)
        # Every one of them was acknowledged as stored: now the server dies
        # without a chance to flush anything.
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(10)
        alice.close()
    finally:
        server.stop()

    again = start_server(tmp_path / "two.log", ["--offline", f"sqlite:{db}"])
    try:
        bob = logged_on(again.port, "bob")
        for n in range(1, 21):
            header, body = bob.recv_until(SEND_CERTAINLY)
            # The frame alice sent: type, sender, device kind, body; the
            # MessageID is the stored message's ID, DestUserID is _0.
            assert header["user_id"] == "alice" and header["client_type"] == 5
            assert header["dest_user_id"] == rc.SERVER and header["message_id"] == n
            assert body == information(n, b"kept %d" % n)
        bob.send(ACK, struct.pack("<i", 20), dest=rc.SERVER, msg_id=20)
        bob.close()
        # Acknowledged: nothing comes at the next logon.
        bob = logged_on(again.port, "bob")
        alice = logged_on(again.port, "alice")
        alice.send(SEND, information(99, b"live"), dest="bob")
        header, body = bob.recv_until(SEND)
        assert header["dest_user_id"] == "bob" and body == information(99, b"live")
        bob.close()
        alice.close()
    finally:
        again.stop()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a database, not at all" * 50, "not a usable SQLite database"),
        (None, "does not exist"),
    ],
)
def test_a_bad_database_stops_the_server_at_start_with_a_clear_error(tmp_path, content, message):
    if content is None:
        db = tmp_path / "missing" / "offline.db"
    else:
        db = tmp_path / "offline.db"
        db.write_bytes(content)
    result = subprocess.run(
        twistd_command() + ["-n", "--pidfile=", "esf", "--offline", f"sqlite:{db}"],
        cwd=REPO,
        env=server_env(),
        capture_output=True,
        timeout=30,
    )
    assert result.returncode != 0
    output = (result.stdout + result.stderr).decode()
    assert f"--offline: {db}" in output and message in output, output


def test_a_user_logs_on_at_another_node_than_the_one_that_kept_the_messages(
    tmp_path, redis_server
):
    url = redis_server.url
    one = start_node(tmp_path / "a.log", url, "node-a", "--offline", "redis")
    two = start_node(tmp_path / "b.log", url, "node-b", "--offline", "redis")
    try:
        alice = logged_on(one.port, "alice")
        for n in range(1, 6):
            alice.send(SEND_CERTAINLY, information(n, b"to bob"), dest="bob", msg_id=n)
            header, _ = alice.recv_until(ACK)
            assert header["user_id"] == rc.SERVER and header["message_id"] == n
        alice.send(SEND, information(6, b"one-way"), dest="bob")
        bob = logged_on(two.port, "bob")
        for n in range(1, 7):
            header, body = bob.recv_until(SEND_CERTAINLY if n < 6 else SEND)
            assert header["user_id"] == "alice" and header["dest_user_id"] == rc.SERVER
            assert header["message_id"] == n
            assert body[:4] == struct.pack("<i", n)
        bob.send(ACK, struct.pack("<i", 6), dest=rc.SERVER, msg_id=6)
        # Live messages from node A still reach bob at node B.
        alice.send(SEND, information(7, b"live"), dest="bob")
        header, body = bob.recv_until(SEND)
        assert header["dest_user_id"] == "bob" and body == information(7, b"live")
        bob.close()
        alice.close()
    finally:
        one.stop()
        two.stop()
    assert redis_server.command("ZCARD", "esf:off:bob:m") == b":0"


def test_one_way_messages_a_killed_node_never_read_reach_their_user_at_the_next_logon(
    tmp_path, redis_server
):
    """
    bob's node stops reading (SIGSTOP) with alice's one-way messages on
    their way, and is then killed: the janitor that reaps it keeps them for
    bob, who is offline now, and bob gets them, in order, when he logs on
    at the other node.  Nobody could have told alice: she asked for no
    answer.
    """
    url = redis_server.url
    one = start_node(tmp_path / "a.log", url, "node-a", "--offline", "redis")
    two = start_node(tmp_path / "b.log", url, "node-b", "--offline", "redis")
    try:
        alice = logged_on(one.port, "alice")
        bob = logged_on(two.port, "bob")
        alice.send(SEND, information(0, b"before"), dest="bob")
        header, body = bob.recv_until(SEND)  # bob online at node B, seen from node A
        assert body == information(0, b"before")
        two.process.send_signal(signal.SIGSTOP)
        # Within its lease (1.5 s, renewed every 0.5 s): appended to its inbox.
        for n in range(1, 6):
            alice.send(SEND, information(n, b"one-way"), dest="bob")
        alice.send(rc.GET_MY_IPE, dest=rc.SERVER, msg_id=99)  # node A has taken them all
        assert alice.recv_until(rc.GET_MY_IPE)[0]["message_id"] == 99
        two.process.send_signal(signal.SIGKILL)
        two.process.wait(5)
        bob.close()
        one.wait_for_log("node node-b's lease expired", timeout=10)
        again = logged_on(one.port, "bob")
        for n in range(1, 6):
            header, body = again.recv_until(SEND)
            assert header["user_id"] == "alice" and body == information(n, b"one-way")
        again.send(ACK, struct.pack("<i", 5), dest=rc.SERVER, msg_id=5)
        again.close()
        alice.close()
    finally:
        one.stop()
        two.stop()


def test_a_small_soak_every_message_once_and_in_order(tmp_path):
    """benchmarks/offline_soak.py at a small size (the full one is not a test)."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import offline_soak
    finally:
        sys.path.pop(0)
    figures = offline_soak.run(
        users=30, per_user=20, senders=3, receivers=5, kill=True, directory=tmp_path, timeout=30
    )
    assert figures["messages"] == 600 and figures["restart"] == "kill -9"
