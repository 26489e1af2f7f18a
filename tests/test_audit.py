"""
Tests of the audit log (esf._audit): records made from an engine driven in
memory, written as JSON lines and read back with eventsFromJSONLogFile.
"""

from __future__ import annotations

import os

import pytest
from twisted.logger import eventsFromJSONLogFile, formatEvent, globalLogPublisher

from _helpers import Client, connect, make_engine
from esf import MessageType
from esf import _audit
from esf._audit import AuditLog, check_audit_path, open_audit_file
from esf.wire import KickOut
from test_metrics import Passwords


@pytest.fixture
def engine():
    return make_engine(handler=Passwords(), admins={"carol"})


@pytest.fixture
def records(engine):
    written: list[dict] = []
    audit = AuditLog(engine=engine, publisher=globalLogPublisher, write=written.append)
    audit.start()
    yield written
    audit.stop()


def kinds(records):
    return [r["audit"] for r in records]


def test_logons_accepted_and_refused(engine, records):
    alice = connect(engine, "alice", 5)
    refused = Client(engine, "10.0.0.7")
    refused.logon("mallory", 0, password="nope")
    assert kinds(records) == ["logon", "logon_refused"]
    logon, refusal = records
    assert (logon["user_id"], logon["client_type"], logon["address"]) == (
        "alice",
        5,
        alice.address,
    )
    assert refusal["user_id"] == "mallory"
    assert refusal["address"] == refused.address
    assert refusal["result"] == "FAILED"
    assert refusal["cause"] == "invalid user ID or password"
    assert formatEvent(refusal) == (
        f"logon refused: mallory/0 from {refused.address}: FAILED: invalid user ID or password"
    )


def test_push_out(engine, records):
    old = connect(engine, "alice", 5)
    new = connect(engine, "alice", 5, host="10.0.0.2")
    (push,) = [r for r in records if r["audit"] == "push_out"]
    assert push["user_id"] == "alice" and push["client_type"] == 5
    assert push["address"] == old.address
    assert push["new_address"] == new.address


def test_kicks_say_where_they_come_from(engine, records):
    connect(engine, "bob")
    connect(engine, "dave")
    carol = connect(engine, "carol")
    mallory = connect(engine, "mallory")
    engine.kick_out("bob", "server says")
    carol.send(MessageType.KICK_OUT, KickOut("rude"), dest="dave", message_id=3)
    mallory.send(MessageType.KICK_OUT, KickOut("mine"), dest="carol", message_id=4)
    connect(engine, "erin", 4)
    engine.kick_out("erin", "admin says", 4, operator="admin", origin="admin_api")
    kicks = [r for r in records if r["audit"] in ("kick", "kick_refused")]
    assert [(k["audit"], k["origin"], k["operator"], k["user_id"], k["reason"]) for k in kicks] == [
        ("kick", "server_api", "_0", "bob", "server says"),
        ("kick", "client", "carol", "dave", "rude"),
        ("kick_refused", "client", "mallory", "carol", "mine"),
        ("kick", "admin_api", "admin", "erin", "admin says"),
    ]
    assert kicks[0]["count"] == 1 and kicks[0]["client_type"] is None
    assert kicks[3]["client_type"] == 4


def test_admin_records_hex_encode_bytes(records):
    from twisted.logger import Logger

    Logger(namespace="esf.admin").info(
        "admin {action}",
        esf_event="admin_action",
        action="notice",
        peer="127.0.0.1:1",
        status=200,
        user_id="alice",
        payload=b"\x00\xffhi",
    )
    (record,) = records
    assert record["audit"] == "admin"
    assert record["payload"] == "00ff6869"
    assert record["status"] == 200 and record["user_id"] == "alice"


def test_other_events_are_not_audited(engine, records):
    from twisted.logger import Logger

    Logger(namespace="somebody.else").info("x", esf_event="kick_out", operator="x")
    Logger(namespace="esf.server").info("y")
    alice = connect(engine, "alice")
    alice.lose()  # a session end that is not a refusal
    assert kinds(records) == ["logon"]


def test_written_and_read_back(engine, tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(open_audit_file(str(path)), engine=engine)
    audit.start()
    try:
        connect(engine, "alice", 5)
        engine.kick_out("alice", "bye")
    finally:
        audit.stop()
    assert os.stat(path).st_mode & 0o777 == 0o600
    lines = path.read_text("utf-8").splitlines()
    assert len(lines) == 2 and all(line.startswith("{") for line in lines)  # JSON lines
    with open(path) as f:
        events = list(eventsFromJSONLogFile(f))
    assert [e["audit"] for e in events] == ["logon", "kick"]
    assert events[1]["reason"] == "bye" and events[1]["origin"] == "server_api"
    assert events[1]["log_namespace"] == "esf.audit"
    assert formatEvent(events[1]) == "kick: _0 (server_api) kicked alice/None (1 devices): bye"


def test_logons_logged_together_are_audited_one_by_one(engine, records):
    """
    A burst of logons makes one log event for the first and one for the
    rest (L{esf._logon.LogonRecord}); the audit log still has one record per
    logon, each with the time of its logon.
    """
    for i in range(3):
        connect(engine, f"u{i}")
        engine.clock.advance(0.25)
    assert kinds(records) == ["logon"]
    engine.clock.advance(0.25)
    assert [(r["user_id"], r["log_time"]) for r in records] == [
        ("u0", 0.0),
        ("u1", 0.25),
        ("u2", 0.5),
    ]


def test_rotation(engine, tmp_path, monkeypatch):
    monkeypatch.setattr(_audit, "ROTATE_LENGTH", 2000)
    monkeypatch.setattr(_audit, "MAX_ROTATED_FILES", 2)
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(open_audit_file(str(path)), engine=engine)
    audit.start()
    try:
        for i in range(40):
            connect(engine, f"u{i}")
        engine.clock.advance(1)  # logons that come in a burst are logged together
    finally:
        audit.stop()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    newest = []
    for name in ("audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"):
        with open(tmp_path / name) as f:
            newest += [e["user_id"] for e in eventsFromJSONLogFile(f)]
    assert newest[-1] == "u39"
    assert newest == [f"u{i}" for i in range(40 - len(newest), 40)]  # in order, the oldest gone


def test_stop_stops(engine, records):
    written: list[dict] = []
    audit = AuditLog(engine=engine, write=written.append)
    audit.start()
    audit.stop()
    connect(engine, "alice")
    connect(engine, "alice")  # a push-out
    assert written == []


def test_watched_events_are_the_engines():
    """
    The event names the audit log reads are the ones the engine logs: a
    rename in the engine must show up here.
    """
    import esf

    from pathlib import Path

    root = Path(esf.__file__).parent
    source = "".join(p.read_text("utf-8") for p in root.glob("*.py"))
    for names in _audit.WATCHED.values():
        for name in names:
            assert f'esf_event="{name}"' in source, name


@pytest.mark.parametrize("make_bad", ["missing_dir", "is_dir"])
def test_check_audit_path(tmp_path, make_bad):
    path = tmp_path / "nope" / "audit.jsonl" if make_bad == "missing_dir" else tmp_path
    with pytest.raises(ValueError):
        check_audit_path(str(path))
    check_audit_path(str(tmp_path / "audit.jsonl"))
