"""
End-to-end tests: a real C{twistd esf} process on 127.0.0.1, driven by the
raw-socket client in L{rawclient}, which is written from the wire contract
and shares no code with the server.

Every wait is bounded by the wall clock.  One server process serves the
tests that leave it running; tests that stop it, or need other options,
start their own.
"""

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import rawclient as rc

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "docs" / "examples"

AUTH = ["--auth", "memory:alice:pa:bob:pb:carol:pc", "--admin", "carol"]
TIMERS = ["--logon-timeout", "2", "--heartbeat-interval", "1", "--heartbeat-timeout", "3"]
LOGON_TIMEOUT, HEARTBEAT_TIMEOUT = 2, 3

# DisconnectedType values.
INVALID_MESSAGE, WRONG_USER_ID, HEARTBEAT_TIMED_OUT, BEING_PUSHED_OUT = 1, 2, 3, 4
BEING_KICKED_OUT, SERVER_SHUTDOWN, LOGON_TIMED_OUT, LOGON_FAILED = 9, 11, 12, 13
NOT_LOGGED_ON, MESSAGE_TOO_LARGE = 14, 15
# ErrorCode values.
UNKNOWN_MESSAGE_TYPE = 4


def twistd_command():
    # "python -m twisted" is the newer "twist" runner; the plugin is twistd's.
    script = Path(sys.executable).with_name("twistd")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def server_env(extra_path=()):
    env = dict(os.environ)
    paths = [str(p) for p in (REPO, *extra_path)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ServerProcess:
    """
    One C{twistd -n esf} process; its stdout and stderr go to C{log_path},
    the ports it listens on to a C{--port-file} beside it.  (Tests that
    need no more than a server that starts and stops cleanly use
    L{esf.testing.TwistdServer}; these also kill it, and start it on
    ports that are taken.)
    """

    def __init__(
        self,
        log_path,
        args,
        extra_path=(),
        port="tcp:0:interface=127.0.0.1",
        twistd_args=("--logfile=-",),
        preexec_fn=None,
    ):
        self.log_path = log_path
        self.log_file = open(log_path, "wb")
        self.port_file = log_path.with_suffix(".ports.json")
        command = twistd_command() + ["-n", "--pidfile=", *twistd_args, "esf"]
        self.process = subprocess.Popen(
            command + ["--port", port, "--port-file", str(self.port_file), *args],
            cwd=REPO,
            env=server_env(extra_path),
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,  # noqa: PLW1509 -- the test runner starts no threads
        )
        self.port = None
        #: The port file's content, once listening.
        self.ports = {}

    def log(self):
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern, timeout=5.0, count=1):
        """Wait until C{pattern} matches C{count} lines of the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(re.findall(pattern, self.log())) >= count:
                return
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not logged within {timeout} s:\n{self.log()}")

    def wait_listening(self, timeout=15.0):
        """
        Learn the ports from the port file, written once every listener
        listens and the reactor runs.
        """
        deadline = time.monotonic() + timeout
        while not self.port_file.exists():
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited early:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"not listening within {timeout} s:\n{self.log()}")
            time.sleep(0.05)
        self.ports = json.loads(self.port_file.read_text())
        self.port = self.ports["esf"][0]["port"]
        return self

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log_file.close()


def start_server(log_path, args, extra_path=(), twistd_args=("--logfile=-",), preexec_fn=None):
    server = ServerProcess(
        log_path, args, extra_path, twistd_args=twistd_args, preexec_fn=preexec_fn
    )
    try:
        return server.wait_listening()
    except BaseException:
        server.stop()
        raise


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("e2e") / "server.log"
    server = start_server(path, AUTH + TIMERS)
    yield server
    server.stop()


@pytest.fixture
def fresh_server(tmp_path):
    """Start a server of one's own: C{fresh_server(*args)}."""
    started = []

    def start(*args, **kwargs):
        started.append(start_server(tmp_path / f"server{len(started)}.log", args, **kwargs))
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def clients():
    """C{clients(port)} connects; every client is closed after the test."""
    made = []

    def connect(port):
        made.append(rc.connect(port))
        return made[-1]

    yield connect
    for client in made:
        client.close()


def logged_on(connect, port, user, password, client_type=0):
    client = connect(port)
    reply = client.logon(user, password, client_type)
    assert reply["result"] == 0, reply
    return client


def expect_notice(client, disconnected_type, timeout=5.0):
    """The next frame is DisconnectNotice(disconnected_type) and then EOF."""
    header, body = client.recv_until(rc.DISCONNECT, timeout)
    notice = rc.parse_disconnect_notice(body)
    assert notice["type"] == disconnected_type, notice
    assert header["user_id"] == rc.SERVER and header["message_id"] == 0
    assert client.recv_frame(timeout) is None, "DisconnectNotice is not the last frame"
    return notice


def query_online(client, user, msg_id=50):
    client.send(rc.QUERY_ONLINE, dest=user, msg_id=msg_id)
    header, body = client.recv_until(rc.QUERY_ONLINE)
    assert header["message_id"] == msg_id and len(body) == 1
    return body[0]


def online_users(client, msg_id=51):
    client.send(rc.GET_ALL_ONLINE_USERS, struct.pack("<II", 0, 0), dest=rc.SERVER, msg_id=msg_id)
    header, body = client.recv_until(rc.GET_ALL_ONLINE_USERS)
    assert header["message_id"] == msg_id
    return rc.parse_online_users(body)


# -- one shared server ---------------------------------------------------------------


def test_presence_and_ping(server, clients):
    alice = logged_on(clients, server.port, "alice", "pa")
    bob = logged_on(clients, server.port, "bob", "pb")

    for me, other in ((alice, "bob"), (bob, "alice")):
        listing = online_users(me)
        assert {"alice", "bob"} <= set(listing["users"])
        assert listing["total"] == len(listing["users"])
        assert query_online(me, other) == 1
    assert query_online(alice, "nobody") == 0

    # alice pings bob through the server; bob's client answers.
    alice.send(rc.PING, dest="bob", msg_id=7)
    header, body = bob.recv_until(rc.PING)
    assert (header["user_id"], header["dest_user_id"], header["message_id"]) == ("alice", "bob", 7)
    bob.send(rc.PING_ACK, dest="alice", msg_id=7)
    header, body = alice.recv_until(rc.PING_ACK)
    assert (header["user_id"], header["message_id"], body) == ("bob", 7, b"")

    # A ping to the server is answered by the server.
    alice.send(rc.PING, dest=rc.SERVER, msg_id=8)
    header, body = alice.recv_until(rc.PING_ACK)
    assert (header["user_id"], header["dest_user_id"], header["message_id"]) == ("_0", "alice", 8)


def test_kick_out(server, clients):
    alice = logged_on(clients, server.port, "alice", "pa")
    bob = logged_on(clients, server.port, "bob", "pb")

    # Only the admin (or the handler) may kick: bob may not.
    bob.send(rc.KICK_OUT, rc.pack_str("go away"), dest="alice", msg_id=3)
    header, body = bob.recv_until(rc.KICK_OUT)
    assert header["message_id"] == 3
    assert rc.parse_kick_out_reply(body)["ok"] == 0
    assert query_online(bob, "alice") == 1

    carol = logged_on(clients, server.port, "carol", "pc")
    carol.send(rc.KICK_OUT, rc.pack_str("spamming"), dest="bob", msg_id=4)
    header, body = carol.recv_until(rc.KICK_OUT)
    assert header["message_id"] == 4
    assert rc.parse_kick_out_reply(body) == {"ok": 1, "cause": ""}

    header, body = bob.recv_until(rc.KICKED_OUT)
    assert rc.parse_kicked_out(body) == {"operator": "carol", "reason": "spamming"}
    expect_notice(bob, BEING_KICKED_OUT)
    assert query_online(carol, "bob") == 0
    assert query_online(alice, "alice") == 1


def test_wrong_password(server, clients):
    client = clients(server.port)
    reply = client.logon("alice", "wrong")
    assert reply["result"] == 1, reply
    assert reply["cause"]
    expect_notice(client, LOGON_FAILED)


def test_replace_old(server, clients):
    first = logged_on(clients, server.port, "alice", "pa")
    second = logged_on(clients, server.port, "alice", "pa")
    new_address = f"127.0.0.1:{second.sock.getsockname()[1]}"

    _header, body = first.recv_until(rc.PUSHED_OUT)
    assert new_address in rc.parse_pushed_out(body)["cause"]
    expect_notice(first, BEING_PUSHED_OUT)

    assert query_online(second, "alice") == 1
    second.send(rc.PING, dest=rc.SERVER, msg_id=9)
    assert second.recv_until(rc.PING_ACK)[0]["message_id"] == 9


@pytest.mark.parametrize("logged_on_first", [False, True], ids=["before-logon", "after-logon"])
def test_garbage(server, clients, logged_on_first):
    bystander = logged_on(clients, server.port, "carol", "pc")
    if logged_on_first:
        client = logged_on(clients, server.port, "bob", "pb")
    else:
        client = clients(server.port)
    # The log says which header length the server expects.
    said = r"INVALID_MESSAGE.*\b36\b.*header|INVALID_MESSAGE.*header.*\b36\b"
    before = len(re.findall(said, server.log()))
    client.send_raw(bytes(40))
    expect_notice(client, INVALID_MESSAGE)
    server.wait_for_log(said, count=before + 1)

    assert query_online(bystander, "carol") == 1
    if logged_on_first:
        assert query_online(bystander, "bob") == 0


def test_protocol_violations(server, clients):
    # Before logon only Logon is accepted.
    early = clients(server.port)
    early.send(rc.HEARTBEAT, dest=rc.SERVER)
    expect_notice(early, NOT_LOGGED_ON)

    # Before logon a frame may not announce more than 64 KiB.
    large = clients(server.port)
    large.send_raw(rc.pack_header(rc.LOGON, 70_000, "alice", rc.SERVER, 1))
    expect_notice(large, MESSAGE_TOO_LARGE)

    # After logon every frame must carry the session's own UserID.
    bob = logged_on(clients, server.port, "bob", "pb")
    bob.user = "alice"
    bob.send(rc.PING, dest=rc.SERVER, msg_id=5)
    expect_notice(bob, WRONG_USER_ID)

    # An unknown request is answered with Error(UnknownMessageType); the
    # session stays up.
    carol = logged_on(clients, server.port, "carol", "pc")
    carol.send(199, dest=rc.SERVER, msg_id=6)
    header, body = carol.recv_until(rc.ERROR)
    assert header["message_id"] == 6
    error = rc.parse_error(body)
    assert (error["request_type"], error["code"]) == (199, UNKNOWN_MESSAGE_TYPE)
    assert query_online(carol, "carol") == 1


def test_logon_timeout(server, clients):
    client = clients(server.port)
    started = time.monotonic()
    expect_notice(client, LOGON_TIMED_OUT, timeout=LOGON_TIMEOUT + 3)
    assert LOGON_TIMEOUT - 0.2 <= time.monotonic() - started <= LOGON_TIMEOUT + 2


def test_heartbeat_timeout(server, clients):
    silent, started = logged_on_timed(clients, server.port, "alice", "pa")
    talker, _ = logged_on_timed(clients, server.port, "bob", "pb")

    # The talker heartbeats every interval and stays on; the silent one is
    # dropped between 1x and 1.5x the timeout (plus slack).
    limit = started + 1.5 * HEARTBEAT_TIMEOUT + 1.5
    notice = None
    while notice is None:
        assert time.monotonic() < limit, "the silent session was not dropped in time"
        talker.send(rc.HEARTBEAT, dest=rc.SERVER)
        header, body = talker.recv_until(
            rc.HEARTBEAT, timeout=2, skip=(rc.MY_DEVICE_ONLINE, rc.MY_DEVICE_OFFLINE)
        )
        assert (header["message_id"], body) == (0, b""), "the echo is empty, MessageID 0"
        try:
            header, body = silent.recv_until(rc.DISCONNECT, timeout=1.0)
        except TimeoutError:
            continue
        notice = rc.parse_disconnect_notice(body)
    elapsed = time.monotonic() - started
    assert notice["type"] == HEARTBEAT_TIMED_OUT
    assert HEARTBEAT_TIMEOUT - 0.2 <= elapsed <= 1.5 * HEARTBEAT_TIMEOUT + 1.5
    assert silent.recv_frame(2) is None
    assert query_online(talker, "alice") == 0
    assert query_online(talker, "bob") == 1


def logged_on_timed(connect, port, user, password):
    # Device kind 5 keeps these sessions clear of the other tests' (kind 0).
    client = connect(port)
    reply = client.logon(user, password, client_type=5)
    assert reply["result"] == 0, reply
    assert (reply["heartbeat_interval"], reply["heartbeat_timeout"]) == (1, HEARTBEAT_TIMEOUT)
    return client, time.monotonic()


def test_peer_close_is_not_aborted(server, clients):
    # A connection the peer closed has nothing left to abort: no "aborting"
    # line once the close timeout (5 s) has passed.
    client = logged_on(clients, server.port, "carol", "pc", client_type=8)
    address = f"127.0.0.1:{client.sock.getsockname()[1]}"
    client.close()
    server.wait_for_log(re.escape(address) + r".*NETWORK_INTERRUPTED")
    time.sleep(5.5)
    assert not re.search(r"abort\w* " + re.escape(address), server.log())


# -- servers of their own --------------------------------------------------------------


def test_graceful_shutdown(fresh_server, clients):
    server = fresh_server(*AUTH)
    alice = logged_on(clients, server.port, "alice", "pa")
    bob = logged_on(clients, server.port, "bob", "pb", client_type=5)
    server.process.send_signal(signal.SIGTERM)
    for client in (alice, bob):
        expect_notice(client, SERVER_SHUTDOWN)
    # twistd ends a clean shutdown by re-raising the signal that asked for
    # it, so a supervisor sees "terminated by SIGTERM"; anything else is a
    # failure.
    assert server.process.wait(5) in (0, -signal.SIGTERM)
    log = server.log()
    assert "Server Shut Down." in log and "Traceback" not in log, log
    assert len(re.findall(r"SERVER_SHUTDOWN", log)) >= 2


def test_port_in_use(tmp_path):
    # A port that cannot be bound ends the process instead of leaving it deaf.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
        server = ServerProcess(tmp_path / "busy.log", AUTH, port=port)
        try:
            returncode = server.process.wait(15)
        finally:
            server.stop()
    assert returncode != 0
    assert "Address already in use" in server.log() or "listen" in server.log()


def test_accept_all_warning(fresh_server, clients):
    server = fresh_server()
    assert re.search(r"(?i)every logon is accepted", server.log())
    anyone = logged_on(clients, server.port, "zed", "any password")
    assert query_online(anyone, "zed") == 1


def test_example_application_under_twistd(fresh_server, clients):
    server = fresh_server("--handler", "server_app:handler", extra_path=[EXAMPLES])
    assert not re.search(r"(?i)every logon is accepted", server.log())
    alice = logged_on(clients, server.port, "alice", "pa")
    server.wait_for_log(r"alice is online")
    refused = clients(server.port)
    reply = refused.logon("mallory", "x")
    assert reply["result"] == 1 and "mallory" in reply["cause"]
    expect_notice(refused, LOGON_FAILED)
    alice.send(rc.LOGOFF, dest=rc.SERVER)
    assert alice.recv_frame(5) is None  # no notice after Logoff
    server.wait_for_log(r"alice is offline: LOGGED_OFF")


def test_session_ended_events(fresh_server, clients):
    # One structured session_ended event per session, through the example
    # JSON observer of docs/examples/jsonlog.py.
    server = fresh_server(*AUTH, extra_path=[EXAMPLES], twistd_args=["--logger=jsonlog.observer"])
    alice = logged_on(clients, server.port, "alice", "pa", client_type=5)
    alice_address = f"127.0.0.1:{alice.sock.getsockname()[1]}"
    alice.send(rc.LOGOFF, dest=rc.SERVER)
    assert alice.recv_frame(5) is None
    refused = clients(server.port)
    refused_address = f"127.0.0.1:{refused.sock.getsockname()[1]}"
    assert refused.logon("bob", "wrong")["result"] == 1
    expect_notice(refused, LOGON_FAILED)
    server.wait_for_log(r'"esf_event": "session_ended"', count=2)

    events = [json.loads(record) for record in server.log().split("\x1e") if record.strip()]
    ended = {e["address"]: e for e in events if e.get("esf_event") == "session_ended"}
    assert len(ended) == len([e for e in events if e.get("esf_event") == "session_ended"])
    fields = {"user_id", "client_type", "address", "reason", "text", "duration"}
    assert fields <= set(ended[alice_address]) and fields <= set(ended[refused_address])
    assert (ended[alice_address]["user_id"], ended[alice_address]["client_type"]) == ("alice", 5)
    assert ended[alice_address]["reason"] == "LOGGED_OFF"
    assert ended[refused_address]["reason"] == "LOGON_FAILED"
    assert 0 <= ended[alice_address]["duration"] < 10


def test_a_receiver_reset_mid_write_ends_alone(fresh_server, clients):
    """
    bob reads nothing while alice sends him 60 KB Sends, so that the server
    holds output for him, and then his connection is reset (RST) while it
    does: his session alone ends, once, as NETWORK_INTERRUPTED, with no
    traceback; alice is read and relayed as before, and bob is offline.
    """
    import threading

    server = fresh_server(*AUTH, extra_path=[EXAMPLES], twistd_args=["--logger=jsonlog.observer"])
    alice = logged_on(clients, server.port, "alice", "pa")
    carol = logged_on(clients, server.port, "carol", "pc")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", server.port))
    bob = rc.Client(sock)
    assert bob.logon("bob", "pb")["result"] == 0
    bob_address = f"127.0.0.1:{sock.getsockname()[1]}"
    body = struct.pack("<i", 1) + bytes(60_000)
    frame = rc.pack_header(202, len(body), "alice", "bob") + body  # Send
    # Whole frames, blocking while the server holds alice back: 6 MB, past
    # what the sockets between them hold (4 MB here) and past bob's output
    # bound (2 MiB), so that the server holds all it may for him.
    flood = threading.Thread(target=lambda: [alice.send_raw(frame) for _ in range(100)])
    flood.start()
    flood.join(30)
    assert not flood.is_alive()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # reset, with what the server still has for him unread
    server.wait_for_log(r'"esf_event": "session_ended"')
    alice.send(202, struct.pack("<i", 1) + b"still here", dest="carol")
    header, payload = carol.recv_until(202)
    assert (header["user_id"], payload) == ("alice", struct.pack("<i", 1) + b"still here")
    assert query_online(alice, "bob") == 0
    events = [json.loads(record) for record in server.log().split("\x1e") if record.strip()]
    ended = [e for e in events if e.get("esf_event") == "session_ended"]
    assert [(e["address"], e["user_id"], e["reason"]) for e in ended] == [
        (bob_address, "bob", "NETWORK_INTERRUPTED")
    ]
    assert "Traceback" not in server.log()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--relogon-mode", "bogus"], "--relogon-mode"),
        (["--heartbeat-interval", "5", "--heartbeat-timeout", "3"], "--heartbeat-timeout"),
        (["--handler", "no_such_module:handler"], "--handler"),
        (["--port", "tcp:nope"], "--port"),
    ],
    ids=["relogon-mode", "heartbeat", "handler", "port"],
)
def test_bad_options(args, message):
    result = subprocess.run(
        twistd_command() + ["-n", "--pidfile=", "--logfile=-", "esf", *args],
        cwd=REPO,
        env=server_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=30,
    )
    output = result.stdout.decode(errors="replace")
    assert result.returncode != 0
    assert "Traceback" not in output, output
    errors = [
        line
        for line in output.splitlines()
        if message in line and ":" in line and not line.startswith(" ")
    ]
    assert len(errors) == 1, output
