"""
C{twistd esf --websocket} as a process on 127.0.0.1, with a WebSocket client
written from RFC 6455 on a plain socket (L{wsclient.BlockingWS}): a logon,
the handshake timeout, and the shutdown notice on SIGTERM.  Every wait is
bounded by the wall clock.
"""

from __future__ import annotations

import re
import signal
import socket
import time

import pytest
from test_e2e import ServerProcess
from wsclient import BlockingWS, client_frame

from esf.wire import (
    REPLY_BODIES,
    DisconnectedType,
    FrameDecoder,
    Logon,
    LogonResult,
    MessageType,
    WireConfig,
    encode_frame,
)

pytestmark = pytest.mark.e2e

LOGON_TIMEOUT = 2


@pytest.fixture
def server(tmp_path):
    server = ServerProcess(
        tmp_path / "server.log",
        ["--websocket", "tcp:0:interface=127.0.0.1", "--logon-timeout", str(LOGON_TIMEOUT)],
    )
    try:
        server.wait_listening()
        server.wait_for_log(r"WebSocketFactory starting on \d+")
        server.ws_port = int(
            re.search(r"WebSocketFactory starting on (\d+)", server.log()).group(1)
        )
        yield server
    finally:
        server.stop()


def esf_message(payload):
    [frame] = FrameDecoder(WireConfig()).feed(payload)
    return frame, REPLY_BODIES[frame.message_type].decode(frame.body)


def logon(ws, user_id):
    ws.send(
        encode_frame(
            WireConfig(), MessageType.LOGON, Logon(1, "", "pw").encode(),
            client_type=3, message_id=1, user_id=user_id, dest_user_id="_0",
        )
    )  # fmt: skip
    opcode, payload = ws.recv()
    assert opcode == 2
    frame, reply = esf_message(payload)
    assert (frame.message_type, frame.message_id, reply.result) == (112, 1, LogonResult.SUCCEED)


def test_logon_and_shutdown_notice(server):
    ws = BlockingWS(server.ws_port)
    try:
        assert ws.response.startswith(b"HTTP/1.1 101")
        logon(ws, "alice")
        server.process.send_signal(signal.SIGTERM)
        opcode, payload = ws.recv()
        frame, notice = esf_message(payload)
        assert (frame.message_type, notice.reason) == (
            MessageType.DISCONNECT_NOTICE,
            DisconnectedType.SERVER_SHUTDOWN,
        )
        opcode, payload = ws.recv()
        assert (opcode, int.from_bytes(payload[:2], "big")) == (8, 1001)
        ws.send((1001).to_bytes(2, "big"), opcode=8)  # the close handshake's answer
    finally:
        ws.close()
    # twistd re-raises SIGTERM once it has stopped cleanly.
    assert server.process.wait(10) in (0, -signal.SIGTERM)
    assert "Traceback" not in server.log()
    assert re.search(r"session ended: alice/3 .*SERVER_SHUTDOWN", server.log())


def test_a_silent_connection_is_closed_after_the_logon_timeout(server):
    """
    A connection that never finishes its WebSocket handshake is closed
    after the logon timeout.
    """
    sock = socket.create_connection(("127.0.0.1", server.ws_port), timeout=LOGON_TIMEOUT + 5)
    try:
        start = time.monotonic()
        sock.sendall(b"GET /esf HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and no more
        try:
            data = sock.recv(4096)
        except ConnectionResetError:  # the server aborts the connection
            data = b""
        waited = time.monotonic() - start
    finally:
        sock.close()
    assert data == b""
    # autobahn's timers fall on whole seconds of the clock: up to 1 s early.
    assert LOGON_TIMEOUT - 1.2 <= waited <= LOGON_TIMEOUT + 3, waited


# -- floods: what one socket's frames cost the others --------------------------------


def _ping_times(ws, count):
    """
    Ping the server C{count} times over C{ws} (an ESF ping, 102, answered
    103); the round trips, sorted.
    """
    times = []
    for n in range(count):
        started = time.monotonic()
        ws.send(encode_frame(WireConfig(), MessageType.PING_BY_SERVER, message_id=n + 10,
                             user_id="alice", dest_user_id="_0"))  # fmt: skip
        while True:
            opcode, payload = ws.recv()
            if opcode == 2 and esf_message(payload)[0].message_type == MessageType.PING_ACK:
                break
        times.append(time.monotonic() - started)
        time.sleep(0.005)
    return sorted(times)


@pytest.mark.parametrize("logged_on", [False, True], ids=["before-logon", "logged-on"])
def test_others_ping_while_one_socket_floods_fragments_then_pings(server, logged_on):
    """
    One socket floods empty continuation fragments, then empty pings (as
    the flood that once took a core: about 320,000 and 220,000 frames a
    second), without reading, and reconnects whenever it is cut off; before
    logon, or logged on.  Meanwhile alice pings the server 300 times over
    WebSocket.  Each of the flooder's frames costs its budget, so alice's
    p99 stays under 50 ms.  The flood is bounded: at most 4 s and 400 MB.
    """
    import threading

    fragments = client_frame(0, b"", fin=False) * (65536 // 6)
    pings = client_frame(9, b"") * (65536 // 6)
    alice = BlockingWS(server.ws_port)
    logon(alice, "alice")
    stop = time.monotonic() + 4.0
    sent = {"frames": 0, "bytes": 0, "connections": 0, "cut_off": 0}

    def flood():
        while time.monotonic() < stop and sent["bytes"] < 400_000_000:
            try:
                ws = BlockingWS(server.ws_port, timeout=5.0)
            except (OSError, EOFError):
                sent["cut_off"] += 1
                continue
            try:
                if logged_on:
                    logon(ws, "mallory")
            except (OSError, EOFError, AssertionError):
                sent["cut_off"] += 1
                ws.close()
                continue
            sent["connections"] += 1
            try:
                ws.sock.sendall(client_frame(2, b"", fin=False))
                for chunk in (fragments, pings):
                    for _ in range(200):
                        if time.monotonic() >= stop:
                            break
                        ws.sock.sendall(chunk)
                        sent["frames"] += len(chunk) // 6
                        sent["bytes"] += len(chunk)
            except OSError:  # cut off, or the server reads no further
                sent["cut_off"] += 1
            finally:
                ws.close()

    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        time.sleep(0.2)
        times = _ping_times(alice, 300)
    finally:
        flooder.join(15)
        alice.close()
    p99 = times[int(len(times) * 0.99) - 1]
    print({**sent, "ping_p50_ms": times[150] * 1e3, "ping_p99_ms": p99 * 1e3})
    assert sent["frames"] > 0  # the flood ran
    assert p99 < 0.050
    log = server.log()
    assert "Traceback" not in log
    if not logged_on:
        # Cut off at once each time, and refused at connect after the third:
        # one log event per flooding connection, and one for the refusal.
        assert (
            log.count("NOT_LOGGED_ON (more than 16 WebSocket frames") == sent["connections"] == 3
        )
        assert log.count("refusing WebSocket connections from 127.0.0.1") == 1
