"""
End-to-end tests of the audit log and the log under a real C{twistd esf}:
what a SIGKILL leaves of the audit, and C{--log-level}.
"""

from __future__ import annotations

import re
import signal
import time

import pytest
import rawclient as rc
from test_e2e import AUTH, start_server
from twisted.logger import eventsFromJSONLogFile

pytestmark = pytest.mark.e2e

SEND = 202


def logged_on(port, user, password):
    client = rc.connect(port)
    reply = client.logon(user, password)
    assert reply["result"] == 0, reply
    return client


def test_logons_survive_a_sigkill(tmp_path):
    """
    Two logons in quick succession (the log gathers the second with what
    follows it), then SIGKILL 0.3 s later: the audit file has both.
    """
    audit = tmp_path / "audit.jsonl"
    server = start_server(tmp_path / "server.log", AUTH + ["--audit-log", str(audit)])
    clients = []
    try:
        clients.append(logged_on(server.port, "alice", "pa"))
        clients.append(logged_on(server.port, "bob", "pb"))
        time.sleep(0.3)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(10)
    finally:
        for client in clients:
            client.close()
        server.stop()
    with open(audit) as f:
        logons = [e["user_id"] for e in eventsFromJSONLogFile(f) if e["audit"] == "logon"]
    assert logons == ["alice", "bob"]


def flood_offline(server, count):
    """
    C{count} one-way Sends from alice to bob, who is offline; then a Ping
    answered shows the server has handled them all.
    """
    alice = logged_on(server.port, "alice", "pa")
    try:
        frame = rc.pack_header(SEND, 4, "alice", "bob", 0) + b"spam"
        alice.send_raw(frame * count)
        alice.send(rc.PING, dest=rc.SERVER, msg_id=9)
        alice.recv_until(rc.PING_ACK, timeout=30, skip=rc.UNSOLICITED + (rc.ERROR,))
    finally:
        alice.close()
    server.wait_for_log(r"session ended: alice")


def test_log_level_info_by_default(tmp_path):
    """
    Under plain C{twistd esf}, 2,000 Sends to an offline user write no
    debug line, and the log grows by a few lines.
    """
    server = start_server(tmp_path / "server.log", AUTH)
    try:
        before = len(server.log())
        flood_offline(server, 2000)
        log = server.log()
    finally:
        server.stop()
    assert "#debug" not in log
    assert len(log) - before < 2000, log[before:]


def test_log_level_debug_writes_them(tmp_path):
    """
    The same flood under C{--log-level debug}: one line per Send, what the
    default keeps out of the log.
    """
    server = start_server(tmp_path / "debug.log", AUTH + ["--log-level", "debug"])
    try:
        flood_offline(server, 2000)
        log = server.log()
    finally:
        server.stop()
    assert len(re.findall(r"#debug\] dropped", log)) == 2000
