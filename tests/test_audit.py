"""
Tests of the audit log (esf.operations._audit): records made from an engine driven in
memory, written as JSON lines and read back with eventsFromJSONLogFile.
"""

from __future__ import annotations

import os

import pytest
from _helpers import Client, LogCapture, connect, make_engine
from test_metrics import Passwords
from twisted.logger import eventsFromJSONLogFile, formatEvent, globalLogPublisher

from esf import MessageType
from esf.operations import _audit
from esf.operations._audit import AuditLog, check_audit_path, open_audit_file
from esf.wire import KickOut


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
    assert [
        (k["audit"], k["origin"], k["operator"], k["user_id"], k["reason"]) for k in kicks
    ] == [
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


def test_logons_are_audited_at_once_while_the_log_gathers_them(engine, records):
    """
    A burst of logons makes one log event for the first and one for the
    rest (L{esf.server._logon.LogonRecord}); the audit log has one record per
    logon, written as the logon is made, each with the time of its logon.
    """
    with LogCapture() as logs:
        for i in range(3):
            connect(engine, f"u{i}")
            assert [r["user_id"] for r in records] == [f"u{j}" for j in range(i + 1)]
            engine.clock.advance(0.25)
        assert [e["count"] for e in logs.esf("logged_on")] == [1]  # u1, u2 wait
        engine.clock.advance(0.25)
        assert [e["count"] for e in logs.esf("logged_on")] == [1, 2]
    assert [(r["user_id"], r["log_time"]) for r in records] == [
        ("u0", 0.0),
        ("u1", 0.25),
        ("u2", 0.5),
    ]


def test_a_logon_is_on_disk_before_its_reply_goes_out(engine, tmp_path):
    """
    Even a logon whose log line waits for others (the second of a burst):
    its record is in the file when the reply is written, and nothing is
    kept back in a buffer.
    """
    path = tmp_path / "audit.jsonl"
    seen_at_reply = []
    audit = AuditLog(open_audit_file(str(path)), engine=engine)
    audit.start()
    try:
        connect(engine, "alice")
        bob = Client(engine)
        write = bob.transport.write

        def written(data):
            seen_at_reply.append(path.read_text("utf-8"))
            write(data)

        bob.transport.write = written
        bob.logon("bob")
    finally:
        audit.stop()
    assert seen_at_reply and '"user_id": "bob"' in seen_at_reply[0]


@pytest.mark.parametrize("how", ["kick", "push_out"])
def test_a_kick_or_push_out_is_on_disk_before_its_notice_goes_out(engine, tmp_path, how):
    """
    The kicked or pushed-out device's notice is written after the audit
    record that tells of it is in the file.
    """
    path = tmp_path / "audit.jsonl"
    seen_at_notice = []
    audit = AuditLog(open_audit_file(str(path)), engine=engine)
    audit.start()
    try:
        victim = connect(engine, "alice", 5)
        transport = victim.transport
        write, write_sequence = transport.write, transport.writeSequence

        def written(data):
            seen_at_notice.append(path.read_text("utf-8"))
            write(data)

        def written_sequence(data):
            seen_at_notice.append(path.read_text("utf-8"))
            write_sequence(data)

        transport.write, transport.writeSequence = written, written_sequence
        if how == "kick":
            engine.kick_out("alice", "enough", 5, operator="admin", origin="admin_api")
        else:
            connect(engine, "alice", 5, host="10.0.0.2")
    finally:
        audit.stop()
    assert seen_at_notice, "no notice was written"
    assert f'"audit": "{how}"' in seen_at_notice[0], seen_at_notice[0]


def test_the_log_keeps_causal_order(engine):
    """
    A logon that waits to be logged with others is logged before anything
    that follows from it: its session's end, its push-out, a kick by or of
    its user.
    """

    def order(logs):
        lines = []
        for e in logs.events:
            name = e.get("esf_event")
            if name == "logged_on":
                lines += [("logged_on", u) for u, *_ in e["logons"]]
            elif name == "session_ended":
                lines.append(("session_ended", e["user_id"]))
            elif name in ("kick_out", "kick_refused"):
                lines.append((name, e["operator"]))
        return lines

    with LogCapture() as logs:
        connect(engine, "x")  # logged at once; the next ones wait
        connect(engine, "alice").lose()
        connect(engine, "bob", 5)
        connect(engine, "bob", 5, host="10.0.0.2")  # pushes the first out
        mallory = connect(engine, "mallory")
        mallory.send(MessageType.KICK_OUT, KickOut("no"), dest="carol", message_id=3)
        connect(engine, "erin")
        engine.kick_out("erin", "bye")
    got = order(logs)
    for user in ("alice", "bob", "mallory", "erin"):
        first = got.index(("logged_on", user))
        later = [i for i, (name, u) in enumerate(got) if u == user and name != "logged_on"]
        assert later and first < min(later), (user, got)


def test_the_logon_batch_survives_in_a_storm(engine):
    """
    Logons of users nothing else is logged about are still gathered: the
    causal flush costs a storm nothing.
    """
    with LogCapture() as logs:
        for i in range(50):
            connect(engine, f"u{i}")
        connect(engine, "zed").lose()  # flushes: zed waits among them
        for i in range(50, 100):
            connect(engine, f"u{i}")
        engine.clock.advance(1)
    assert [e["count"] for e in logs.esf("logged_on")] == [1, 50, 50]


def test_client_text_is_capped(engine, records):
    mallory = connect(engine, "mallory")
    connect(engine, "dave")
    mallory.send(MessageType.KICK_OUT, KickOut("x" * 65535), dest="dave", message_id=3)
    (refused,) = [r for r in records if r["audit"] == "kick_refused"]
    assert refused["reason"] == "x" * _audit.TEXT_LIMIT
    assert refused["truncated"] == ["reason"]
    engine.kick_out("dave", "short")
    (kick,) = [r for r in records if r["audit"] == "kick"]
    assert "truncated" not in kick


def flood(engine, user, rounds, kicks=10):
    """
    What an account without the right to kick can do: log on, ask for
    C{kicks} kicks with 64 KiB reasons, log off; C{rounds} times.
    """
    for _ in range(rounds):
        c = connect(engine, user)
        for i in range(kicks):
            c.send(MessageType.KICK_OUT, KickOut("r" * 65535), dest="carol", message_id=i + 2)
        c.lose()


def test_what_one_user_makes_the_audit_write_is_bounded(tmp_path):
    """
    The bound is per user, over all its sessions; past it the records are
    counted and summarised in one record when the window ends.  An
    administrator's kick made before the flood is still there after it, in
    the one file, and a record of the user's after the window is written.
    """
    engine = make_engine(handler=Passwords(), admins={"carol"}, logon_rate_limit=10_000)
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(open_audit_file(str(path)), engine=engine)
    audit.start()
    try:
        connect(engine, "dave")
        engine.kick_out("dave", "spam", operator="admin", origin="admin_api")
        flood(engine, "mallory", rounds=200)
        lines = path.read_bytes().splitlines()
        assert len(lines) == _audit.PER_USER + 2  # dave's logon, the kick
        assert max(len(line) for line in lines) < 4096  # text, twice flattened
        engine.clock.advance(60)
        flood(engine, "mallory", rounds=1, kicks=0)
    finally:
        audit.stop()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.jsonl"]
    with open(path) as f:
        events = list(eventsFromJSONLogFile(f))
    mine = [e for e in events if e.get("user_id") == "mallory" or e.get("operator") == "mallory"]
    assert len(mine) == _audit.PER_USER + 1  # the last logon is in the next window
    assert mine[-1]["audit"] == "logon" and mine[-1]["log_time"] == 60
    (summary,) = [e for e in events if e["audit"] == "suppressed"]
    assert summary["actor"] == "user:mallory"
    assert summary["count"] == 200 * 11 - _audit.PER_USER
    assert summary["kinds"] == {"logon": 200 - 6, "kick_refused": 2000 - 54}
    assert (summary["since"], summary["until"]) == (0, 60)
    assert formatEvent(summary) == (
        f"audit: {summary['count']} more records of user:mallory suppressed between 0.0 and 60.0"
    )
    assert [e["audit"] for e in events][:2] == ["logon", "kick"]


def test_refused_logons_count_against_their_host(engine, records):
    """
    A client that has not logged on may claim any user ID: its refusals
    are counted against its host.
    """
    for i in range(_audit.PER_USER + 5):
        Client(engine, "10.0.0.9").logon(f"user{i}", password="nope")
    Client(engine, "10.0.0.8").logon("alice", password="nope")
    refused = [r for r in records if r["audit"] == "logon_refused"]
    assert len(refused) == _audit.PER_USER + 1
    assert refused[-1]["address"].startswith("10.0.0.8:")
    engine.clock.advance(60)
    (summary,) = [r for r in records if r["audit"] == "suppressed"]
    assert (summary["actor"], summary["count"]) == ("host:10.0.0.9", 5)


def test_the_budget_is_an_option(engine, tmp_path):
    written: list[dict] = []
    audit = AuditLog(engine=engine, write=written.append, budget=_audit.AuditBudget(3))
    audit.start()
    try:
        flood(engine, "mallory", rounds=2, kicks=1)
    finally:
        audit.stop()  # what the window suppressed so far is summarised
    assert kinds(written) == ["logon", "kick_refused", "logon", "suppressed"]
    assert written[-1]["count"] == 1
    with pytest.raises(ValueError):
        _audit.AuditBudget(0)


def write_records(engine, audit, count):
    for i in range(count):
        engine.kick_out(f"u{i}", "x" * 100)


def read_all(directory, name="audit.jsonl"):
    files = sorted(
        (p for p in directory.iterdir() if p.name.startswith(name)),
        key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0,
    )
    events = []
    for p in files:
        with open(p) as f:
            events += list(eventsFromJSONLogFile(f))
    return events


def test_rotation_keeps_every_record_by_default(engine, tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(open_audit_file(str(path), rotateLength=2000), engine=engine)
    audit.start()
    try:
        write_records(engine, audit, 200)
    finally:
        audit.stop()
    assert len(list(tmp_path.iterdir())) > 11  # more than twistd's LogFile would keep
    events = read_all(tmp_path)
    assert [e["user_id"] for e in events] == [f"u{i}" for i in range(200)]
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_retention_by_count_records_each_removal(engine, tmp_path):
    from esf.operations._audit import Retention

    path = tmp_path / "audit.jsonl"
    out = open_audit_file(str(path), Retention(keep_files=2), rotateLength=2000)
    audit = AuditLog(out, engine=engine)
    out.removed = audit.file_removed
    audit.start()
    try:
        write_records(engine, audit, 200)
    finally:
        audit.stop()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "audit.jsonl",
        "audit.jsonl.1",
        "audit.jsonl.2",
    ]
    events = read_all(tmp_path)
    kept = [e["user_id"] for e in events if e["audit"] == "kick"]
    assert kept[-1] == "u199" and kept == [f"u{i}" for i in range(200 - len(kept), 200)]
    removed = [e for e in events if e["audit"] == "retention_removed"]
    assert removed and all(e["path"] == f"{path}.3" and e["size"] > 0 for e in removed)


def test_retention_by_age(engine, tmp_path):
    from esf.operations._audit import Retention

    path = tmp_path / "audit.jsonl"
    for n, age_days in ((1, 1), (2, 10), (3, 40)):
        rotated = tmp_path / f"audit.jsonl.{n}"
        rotated.write_text("{}\n")
        when = 1_000_000_000 - age_days * 86400
        os.utime(rotated, (when, when))
    out = open_audit_file(str(path), Retention(keep_days=30), now=lambda: 1_000_000_000.0)
    audit = AuditLog(out, engine=engine)
    out.removed = audit.file_removed
    audit.start()
    out.apply_retention()
    audit.stop()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "audit.jsonl",
        "audit.jsonl.1",
        "audit.jsonl.2",
    ]
    (removed,) = read_all(tmp_path)[-1:]
    assert removed["audit"] == "retention_removed" and removed["path"] == f"{path}.3"
    with pytest.raises(ValueError):
        Retention(keep_files=-1)


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
    from pathlib import Path

    import esf

    root = Path(esf.__file__).parent
    source = "".join(p.read_text("utf-8") for p in root.rglob("*.py"))
    for names in _audit.WATCHED.values():
        for name in names:
            assert f'esf_event="{name}"' in source, name


@pytest.mark.parametrize("make_bad", ["missing_dir", "is_dir"])
def test_check_audit_path(tmp_path, make_bad):
    path = tmp_path / "nope" / "audit.jsonl" if make_bad == "missing_dir" else tmp_path
    with pytest.raises(ValueError):
        check_audit_path(str(path))
    check_audit_path(str(tmp_path / "audit.jsonl"))
