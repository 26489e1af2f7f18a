"""
End-to-end tests of application messages: a real C{twistd -n esf} process
running the chat example, driven by the raw-socket client in L{rawclient}
(which shares no code with the server).  Every wait is bounded.
"""

import re
import socket
import struct
from pathlib import Path

import pytest
import rawclient as rc
from test_e2e import start_server

pytestmark = pytest.mark.e2e

# Message types and error codes of the contract, as a client writes them.
SEND, REQUEST, RESPONSE, SEND_CERTAINLY, ACK, BROADCAST = 202, 203, 204, 205, 206, 601
USER_OFFLINE, NOT_AUTHORIZED, HANDLER_ERROR = 2, 3, 5
BEING_KICKED_OUT = 9

# The chat example's information types (esf.examples.chat).
JOIN, LEAVE, SAY, ECHO, COMMAND = 1, 2, 3, 4, 5


def information(information_type, payload=b""):
    return struct.pack("<i", information_type) + payload


def parse_information(body):
    (information_type,) = struct.unpack_from("<i", body)
    return information_type, body[4:]


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("e2e-messages") / "server.log"
    server = start_server(path, ["--handler", "esf.examples.chat:handler"])
    yield server
    server.stop()


@pytest.fixture
def logon(chat_server):
    """C{logon(user, client_type=0)}: a logged-on client, closed after the test."""
    made = []

    def logon(user, client_type=0):
        client = rc.connect(chat_server.port)
        made.append(client)
        reply = client.logon(user, "any password", client_type)
        assert reply["result"] == 0, reply
        return client

    yield logon
    for client in made:
        client.close()


def send_certainly(client, information_type, text, msg_id):
    """Send to the server and wait for its Ack (or return the Error)."""
    client.send(SEND_CERTAINLY, information(information_type, text.encode()), "_0", msg_id)
    header, body = client.recv_frame()
    assert header["message_id"] == msg_id, (header, body)
    return header, body


def test_room_broadcast_and_kick(logon):
    """
    Two users join a room; one says something there and the other hears
    it; a user outside the room may not; the administrator kicks one.
    """
    alice, bob, carol, admin = (logon(u) for u in ("e2m-alice", "e2m-bob", "e2m-carol", "admin"))
    for n, client in enumerate((alice, bob), 1):
        header, body = send_certainly(client, JOIN, "e2m-room", n)
        assert header["message_type"] == ACK
        assert (header["user_id"], header["dest_user_id"]) == ("_0", client.user)
        assert body == struct.pack("<i", JOIN)

    alice.send(BROADCAST, information(SAY, b"hello room"), "e2m-room", 7)
    header, body = bob.recv_until(BROADCAST)
    assert (header["user_id"], header["dest_user_id"]) == ("e2m-alice", "e2m-room")
    assert parse_information(body) == (SAY, b"hello room")
    header, body = alice.recv_until(ACK)
    assert header["message_id"] == 7 and body == struct.pack("<i", SAY)

    carol.send(BROADCAST, information(SAY, b"let me in"), "e2m-room", 8)
    header, body = carol.recv_until(rc.ERROR)
    assert header["message_id"] == 8
    assert rc.parse_error(body)["code"] == NOT_AUTHORIZED

    header, body = send_certainly(bob, COMMAND, "/kick e2m-alice", 9)
    assert header["message_type"] == rc.ERROR
    error = rc.parse_error(body)
    assert error["code"] == HANDLER_ERROR and "Traceback" not in error["text"]

    header, body = send_certainly(admin, COMMAND, "/kick e2m-bob enough", 10)
    assert header["message_type"] == ACK
    header, body = bob.recv_until(rc.KICKED_OUT)
    assert rc.parse_kicked_out(body) == {"operator": "admin", "reason": "enough"}
    header, body = bob.recv_until(rc.DISCONNECT)
    assert rc.parse_disconnect_notice(body)["type"] == BEING_KICKED_OUT
    assert bob.recv_frame() is None

    # bob left the room with his session: alice's next line reaches nobody.
    alice.send(BROADCAST, information(SAY, b"gone?"), "e2m-room", 11)
    header, _ = alice.recv_until(ACK)
    assert header["message_id"] == 11


def test_echo_query(logon):
    alice = logon("e2m-echo")
    payload = bytes(range(256)) * 100
    alice.send(REQUEST, information(ECHO, payload), "_0", 21)
    header, body = alice.recv_until(RESPONSE)
    assert header["message_id"] == 21
    assert (header["user_id"], header["dest_user_id"]) == ("_0", "e2m-echo")
    assert parse_information(body) == (ECHO, payload)

    alice.send(REQUEST, information(99, b""), "_0", 22)
    header, body = alice.recv_until(rc.ERROR)
    error = rc.parse_error(body)
    assert header["message_id"] == 22
    assert (error["request_type"], error["code"]) == (REQUEST, HANDLER_ERROR)
    assert "99" in error["text"] and "Traceback" not in error["text"]


def test_relay_between_users(logon):
    """
    A Send to a user arrives byte for byte; C{user#5} reaches only that
    device; a Request to an offline user is answered UserOffline.
    """
    alice = logon("e2m-sender")
    bob_pc, bob_phone = logon("e2m-rcpt", 0), logon("e2m-rcpt", 5)
    bob_pc.recv_until(117)  # MyDeviceOnline: the phone came online

    body = information(42, "héllo".encode())
    frame = rc.pack_header(SEND, len(body), "e2m-sender", "e2m-rcpt#5", 0, 0) + body
    alice.send_raw(frame)
    header, received = bob_phone.recv_until(SEND)
    assert (
        rc.pack_header(
            SEND,
            len(received),
            header["user_id"],
            header["dest_user_id"],
            header["message_id"],
            header["client_type"],
        )
        + received
        == frame
    )

    alice.send(SEND, information(43, b"both"), "e2m-rcpt")
    for bob in (bob_pc, bob_phone):
        # bob_pc's first relayed frame is this one: the phone-only one never reached it.
        header, received = bob.recv_until(SEND)
        assert header["user_id"] == "e2m-sender"
        assert parse_information(received) == (43, b"both")

    for n in range(50):
        alice.send(SEND, information(n), "e2m-rcpt#0")
    assert [parse_information(bob_pc.recv_until(SEND)[1])[0] for _ in range(50)] == list(range(50))

    alice.send(REQUEST, information(1), "e2m-nobody", 31)
    header, body = alice.recv_until(rc.ERROR)
    assert header["message_id"] == 31
    assert rc.parse_error(body)["code"] == USER_OFFLINE


def test_docs_walkthrough(chat_server, capsys):
    """
    The client session in docs/messages.md runs as printed against the
    chat example.
    """
    text = (Path(__file__).resolve().parent.parent / "docs" / "messages.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    (code,) = [block for block in blocks if "PORT = " in block]
    code = code.replace("PORT = 4530", f"PORT = {chat_server.port}")
    namespace = {}
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)  # the snippet's sockets: no wait without end
    try:
        exec(compile(code, "docs/messages.md", "exec"), namespace)
    finally:
        socket.setdefaulttimeout(previous)
        for name in ("alice", "bob"):
            if name in namespace:
                namespace[name].close()
    assert capsys.readouterr().out == "ok\n"
