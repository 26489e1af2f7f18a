"""
Tests for the server engine and its protocol: logon, relogon, devices,
heartbeats, framework messages, flow control and shutdown.

Everything runs on a L{task.Clock} and in-memory transports (see
L{_helpers}); nothing listens on a socket and nothing sleeps.
"""

from __future__ import annotations

from unittest.mock import ANY

import pytest
from _helpers import (
    Client,
    PendingHandler,
    Received,
    advance_to,
    connect,
    logon_reply,
    make_engine,
    record_events,
    timers,
)
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock, RaisingMemoryReactor, StringTransport
from zope.interface.verify import verifyObject

from esf import (
    AcceptAll,
    ClientType,
    DisconnectedType,
    ErrorCode,
    LogonRefused,
    LogonResult,
    MessageType,
    RelogonMode,
    ServerFactory,
    ServerProtocol,
    ServerService,
)
from esf import wire as w
from esf.interfaces import IBasicHandler, IChannel, IEvent, IPresence, IUserManager
from esf.server._engine import Event, LocalPresence, call
from esf.server._presence import Claim

# Every test here runs with the compiled loops and with the pure-Python code
# alone (compiled_loops, tests/conftest.py).
pytestmark = pytest.mark.usefixtures("compiled_loops")

T = MessageType
D = DisconnectedType
HEADER = w.WireConfig().header_length


# -- expected frames ------------------------------------------------------------


def notice(reason: DisconnectedType, dest: str = "", text=ANY) -> Received:
    """
    The DisconnectNotice the server sends before closing.
    """
    return Received(T.DISCONNECT_NOTICE, w.DisconnectNotice(reason, text), 0, "_0", dest)


def answer(request_type: int, body, message_id: int, dest: str) -> Received:
    """
    A reply from the server: the request's type and MessageID, UserID C{_0}.
    """
    return Received(request_type, body, message_id, "_0", dest)


def error(request_type: int, code: ErrorCode, message_id: int, dest: str, text=ANY) -> Received:
    return Received(T.ERROR, w.Error(request_type, code, text), message_id, "_0", dest)


def logon_answer(engine, dest, result=LogonResult.SUCCEED, cause=ANY, message_id=1) -> Received:
    body = logon_reply(engine, result, cause if result is not LogonResult.SUCCEED else "")
    return answer(T.LOGON, body, message_id, dest)


def refused(engine, dest, result, reason, cause=ANY) -> list[Received]:
    """
    What a refused logon receives: the Logon reply, then the notice.
    """
    return [logon_answer(engine, dest, result, cause), notice(reason, dest)]


class Handler(AcceptAll):
    """
    A handler whose verify_user returns or raises C{outcome}, recording calls.
    """

    def __init__(self, outcome=True, kick=False):
        self.outcome = outcome
        self.kick = kick
        self.calls = []
        self.kick_calls = []

    def verify_user(self, *args):
        self.calls.append(args)
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def can_kick_out(self, *args):
        self.kick_calls.append(args)
        if isinstance(self.kick, BaseException):
            raise self.kick
        return self.kick


# -- logon ------------------------------------------------------------------------


def test_logon_succeeds_with_the_servers_settings():
    engine = make_engine(heartbeat_interval=7, heartbeat_timeout=21, max_message_size=200_000)
    events = record_events(engine.user_manager)
    client = Client(engine)
    client.logon("alice", ClientType.ANDROID, message_id=42)
    assert client.take() == [
        answer(T.LOGON, w.LogonReply(LogonResult.SUCCEED, "", 7, 21, 200_000), 42, "alice")
    ]
    assert not client.closing
    assert engine.user_manager.is_user_online("alice")
    data = engine.user_manager.get_user_data("alice")
    assert (data.user_id, data.client_type, data.address, data.logon_time) == (
        "alice",
        ClientType.ANDROID,
        client.address,
        0,
    )
    assert events == [
        ("device_connected", client.ident),
        ("user_connected", client.ident),
        ("user_count_changed", 1),
    ]


def test_default_logon_reply_announces_10_30_and_1_mib():
    engine = make_engine()
    client = Client(engine)
    client.logon("alice")
    assert [r.body for r in client.take()] == [
        w.LogonReply(LogonResult.SUCCEED, "", 10, 30, 1024 * 1024)
    ]


def test_verify_user_gets_token_user_password_device_and_address():
    handler = Handler(True)
    engine = make_engine(handler=handler)
    client = Client(engine, "10.1.2.3", 4567)
    client.logon("alice", ClientType.IOS, password="secret", system_token="tok")
    assert handler.calls == [("tok", "alice", "secret", ClientType.IOS, "10.1.2.3:4567")]
    assert type(handler.calls[0][3]) is ClientType


@pytest.mark.parametrize(
    "message_type", [T.HEARTBEAT, T.GET_MY_IPE, T.PING_BY_SERVER, T.LOGOFF, T.SEND, 199]
)
def test_anything_but_logon_first_is_not_logged_on(message_type):
    engine = make_engine()
    client = Client(engine)
    client.send(message_type, message_id=3, user_id="alice")
    assert client.take() == [notice(D.NOT_LOGGED_ON)]
    assert client.closing
    assert engine.sessions == set()


def test_logon_timeout_at_exactly_the_timeout():
    engine = make_engine()
    client = Client(engine)
    engine.clock.advance(9.9)
    assert client.take() == []
    assert not client.closing
    engine.clock.advance(0.1)
    assert client.take() == [notice(D.LOGON_TIMEOUT)]
    assert client.closing


def test_logon_timeout_is_configurable_and_cancelled_by_logon():
    engine = make_engine(logon_timeout=3)
    slow = Client(engine)
    quick = connect(engine, "alice")
    engine.clock.advance(2.99)
    assert slow.take() == []
    engine.clock.advance(0.01)
    assert slow.take() == [notice(D.LOGON_TIMEOUT)]
    engine.clock.advance(10)
    assert quick.take() == []
    assert not quick.closing


def test_logon_timeout_covers_a_verification_that_never_ends():
    handler = PendingHandler()
    engine = make_engine(handler=handler)
    events = record_events(engine.user_manager)
    client = Client(engine)
    client.logon("alice")
    engine.clock.advance(10)
    assert client.take() == [notice(D.LOGON_TIMEOUT, "alice")]
    handler.pending(client.address).callback(True)
    assert client.take() == []
    assert events == []
    assert not engine.user_manager.is_user_online("alice")


@pytest.mark.parametrize("max_userid_length", [5, 8, 12, 20, 30])
@pytest.mark.parametrize("user_id, dest", [("a", ""), ("alice", "_0")])
def test_a_client_with_another_header_length_is_told_the_expected_one(
    max_userid_length, user_id, dest, logs
):
    engine = make_engine()
    client = Client(engine)
    client.send_raw(
        w.encode_frame(
            w.WireConfig(max_userid_length),
            T.LOGON,
            w.Logon(1, "", "pw").encode(),
            message_id=1,
            user_id=user_id,
            dest_user_id=dest,
        )
    )
    engine.clock.advance(10)
    (received,) = client.take()
    assert received.body.reason in (D.INVALID_MESSAGE, D.LOGON_TIMEOUT)
    assert "36-byte headers, max UserID length 11" in received.body.text
    assert client.closing
    (ended,) = logs.esf("session_ended")
    assert "36-byte headers, max UserID length 11" in ended["text"]


def test_a_silent_connection_times_out_without_a_header_hint():
    engine = make_engine()
    client = Client(engine)
    engine.clock.advance(10)
    (received,) = client.take()
    assert received.body.text == "no logon within 10 s"


def test_protocol_version_mismatch():
    engine = make_engine()
    client = Client(engine)
    client.logon("alice", protocol_version=2)
    assert client.take() == refused(
        engine, "alice", LogonResult.VERSION_MISMATCHED, D.LOGON_FAILED
    )
    assert client.closing
    assert not engine.user_manager.is_user_online("alice")


def test_wrong_system_token():
    handler = Handler(True)
    engine = make_engine(system_token="s3cret", handler=handler)
    client = Client(engine)
    client.logon("alice", system_token="guess")
    assert client.take() == refused(
        engine, "alice", LogonResult.VERSION_MISMATCHED, D.LOGON_FAILED, "wrong system token"
    )
    assert client.closing
    assert handler.calls == []
    connect(engine, "alice", system_token="s3cret")


def test_any_system_token_when_none_is_configured():
    engine = make_engine()
    connect(engine, "alice", system_token="whatever")


@pytest.mark.parametrize("user_id", ["_0", "*", ""])
def test_reserved_user_ids_are_refused(user_id):
    handler = Handler(True)
    engine = make_engine(handler=handler)
    events = record_events(engine.user_manager)
    client = Client(engine)
    client.logon(user_id)
    assert client.take() == refused(engine, user_id, LogonResult.FAILED, D.LOGON_FAILED)
    assert client.closing
    assert handler.calls == []
    assert events == []
    assert engine.user_manager.get_online_user_list() == []


def test_client_type_not_allowed():
    engine = make_engine(client_types={ClientType.DOTNET, ClientType.ANDROID})
    client = Client(engine)
    client.logon("alice", ClientType.IOS)
    assert client.take() == refused(
        engine, "alice", LogonResult.CLIENT_TYPE_REJECTED, D.UNAUTHORIZED_CLIENT_TYPE
    )
    assert client.closing
    connect(engine, "alice", ClientType.ANDROID)


def test_client_types_above_8_are_rejected_by_default():
    engine = make_engine()
    client = Client(engine)
    client.logon("alice", 9)
    assert [r.body.result for r in client.take()[:1]] == [LogonResult.CLIENT_TYPE_REJECTED]
    assert client.closing


def test_client_types_above_8_when_allowed():
    engine = make_engine(client_types={0, 200})
    client = connect(engine, "alice", 200)
    assert engine.user_manager.get_all_login_devices("alice") == [200]
    assert not client.closing


@pytest.mark.parametrize(
    "body", [b"\x01", b"", w.Logon(1, "", "pw").encode() + b"extra", b"\x01\x00\x09\x00ab"]
)
def test_malformed_logon_body_is_taken_for_a_header_length_mismatch(body, logs):
    """
    Before logon an unreadable Logon body most likely means the peer uses
    another header length: the connection ends with InvalidMessage, and the
    notice and the log say which header the server expects.
    """
    handler = Handler(True)
    engine = make_engine(handler=handler)
    client = Client(engine)
    client.user_id = "alice"
    client.send(T.LOGON, body, message_id=9)
    (received,) = client.take()
    assert received == notice(D.INVALID_MESSAGE)
    assert "36-byte headers" in received.body.text
    assert "max UserID length 11" in received.body.text
    assert client.closing
    assert handler.calls == []
    (ended,) = logs.esf("session_ended")
    assert ended["reason"] == "INVALID_MESSAGE"
    assert "36-byte headers" in ended["text"]


def test_verify_user_false():
    engine = make_engine(handler=Handler(False))
    events = record_events(engine.user_manager)
    client = Client(engine)
    client.logon("alice")
    assert client.take() == refused(
        engine, "alice", LogonResult.FAILED, D.LOGON_FAILED, "invalid user ID or password"
    )
    assert client.closing
    assert events == []


def test_verify_user_logon_refused_cause_reaches_the_client(logs):
    engine = make_engine(handler=Handler(LogonRefused("account locked")))
    client = Client(engine)
    client.logon("alice")
    assert client.take() == refused(
        engine, "alice", LogonResult.FAILED, D.LOGON_FAILED, "account locked"
    )
    assert logs.failures() == []


def test_verify_user_other_exception_is_logged_with_a_generic_cause(logs):
    engine = make_engine(handler=Handler(RuntimeError("db password is hunter2")))
    client = Client(engine)
    client.logon("alice")
    replies = client.take()
    assert replies == refused(engine, "alice", LogonResult.FAILED, D.LOGON_FAILED)
    cause = replies[0].body.failure_cause
    assert cause == "logon verification failed"
    assert b"hunter2" not in client.transport.value()
    (failure,) = logs.failures()
    assert failure["log_failure"].check(RuntimeError)
    assert client.closing


def test_verify_user_deferred():
    handler = PendingHandler()
    engine = make_engine(handler=handler)
    client = Client(engine)
    client.logon("alice")
    assert client.take() == []
    assert not engine.user_manager.is_user_online("alice")
    handler.pending(client.address).callback(True)
    assert client.take() == [logon_answer(engine, "alice")]
    assert engine.user_manager.is_user_online("alice")


def test_verify_user_deferred_failure_with_logon_refused():
    handler = PendingHandler()
    engine = make_engine(handler=handler)
    client = Client(engine)
    client.logon("alice")
    handler.pending(client.address).errback(LogonRefused("try tomorrow"))
    assert client.take() == refused(
        engine, "alice", LogonResult.FAILED, D.LOGON_FAILED, "try tomorrow"
    )


def test_verify_user_coroutine():
    gate = Deferred()

    class Async(AcceptAll):
        async def verify_user(self, system_token, user_id, password, client_type, address):
            ok = await gate
            if password != "right":
                raise LogonRefused(f"wrong password for {user_id}")
            return ok

    engine = make_engine(handler=Async())
    good = Client(engine)
    good.logon("alice", password="right")
    bad = Client(engine)
    bad.logon("bob", password="wrong")
    assert good.take() == [] and bad.take() == []
    gate.callback(True)
    assert good.take() == [logon_answer(engine, "alice")]
    assert bad.take() == refused(
        engine, "bob", LogonResult.FAILED, D.LOGON_FAILED, "wrong password for bob"
    )


def test_second_logon_while_verifying_is_invalid():
    handler = PendingHandler()
    engine = make_engine(handler=handler)
    client = Client(engine)
    client.logon("alice")
    client.logon("alice", message_id=2)
    assert client.take() == [notice(D.INVALID_MESSAGE, "alice")]
    handler.pending(client.address).callback(True)
    assert client.take() == []
    assert not engine.user_manager.is_user_online("alice")


def test_second_logon_after_logon_is_a_bad_request():
    engine = make_engine()
    client = connect(engine, "alice")
    client.logon("alice", message_id=5)
    assert client.take() == [error(T.LOGON, ErrorCode.BAD_REQUEST, 5, "alice")]
    assert not client.closing


# -- logon races ------------------------------------------------------------------


def race(mode: RelogonMode):
    handler = PendingHandler()
    engine = make_engine(handler=handler, relogon_mode=mode)
    events = record_events(engine.user_manager)
    a = Client(engine, "10.0.0.1")
    a.logon("alice")
    b = Client(engine, "10.0.0.2")
    b.logon("alice")
    return engine, events, a, b, handler.pending(a.address), handler.pending(b.address)


def bound(engine, client) -> bool:
    handle = engine.presence.get(client.user_id, client.client_type)
    return handle is not None and handle.address == client.address


def test_race_replace_old_newer_logon_verified_first_stands():
    engine, events, a, b, verify_a, verify_b = race(RelogonMode.REPLACE_OLD)
    verify_b.callback(True)
    assert b.take() == [logon_answer(engine, "alice")]
    verify_a.callback(True)
    assert a.take() == refused(engine, "alice", LogonResult.FAILED, D.LOGON_FAILED)
    assert a.closing
    assert b.take() == [] and not b.closing
    assert bound(engine, b)
    assert engine.user_manager.get_all_login_devices("alice") == [0]
    assert events == [
        ("device_connected", b.ident),
        ("user_connected", b.ident),
        ("user_count_changed", 1),
    ]


def test_race_replace_old_older_logon_verified_first_is_pushed_out():
    engine, events, a, b, verify_a, verify_b = race(RelogonMode.REPLACE_OLD)
    verify_a.callback(True)
    assert a.take() == [logon_answer(engine, "alice")]
    verify_b.callback(True)
    assert [r.message_type for r in a.take()] == [T.BEING_PUSHED_OUT_NOTIFY, T.DISCONNECT_NOTICE]
    assert b.take() == [logon_answer(engine, "alice")]
    assert bound(engine, b)
    assert events == [
        ("device_connected", a.ident),
        ("user_connected", a.ident),
        ("user_count_changed", 1),
        ("device_being_pushed_out", a.ident, b.address),
        ("device_disconnected", a.ident, D.BEING_PUSHED_OUT),
        ("device_connected", b.ident),
    ]


def test_race_ignore_new_first_verified_stands():
    engine, events, a, b, verify_a, verify_b = race(RelogonMode.IGNORE_NEW)
    verify_b.callback(True)
    assert b.take() == [logon_answer(engine, "alice")]
    verify_a.callback(True)
    assert a.take() == refused(
        engine, "alice", LogonResult.HAD_LOGGED_ON, D.NEW_CONNECTION_IGNORED
    )
    assert a.closing and not b.closing
    assert bound(engine, b)
    assert events == [
        ("device_connected", b.ident),
        ("user_connected", b.ident),
        ("user_count_changed", 1),
        ("new_connection_ignored", "alice", ClientType.DOTNET, a.address),
    ]


def test_race_ignore_new_in_arrival_order():
    engine, events, a, b, verify_a, verify_b = race(RelogonMode.IGNORE_NEW)
    verify_a.callback(True)
    verify_b.callback(True)
    assert a.take() == [logon_answer(engine, "alice")]
    assert b.take() == refused(
        engine, "alice", LogonResult.HAD_LOGGED_ON, D.NEW_CONNECTION_IGNORED
    )
    assert bound(engine, a)
    assert events == [
        ("device_connected", a.ident),
        ("user_connected", a.ident),
        ("user_count_changed", 1),
        ("new_connection_ignored", "alice", ClientType.DOTNET, b.address),
    ]


@pytest.mark.parametrize("outcome", [True, False, LogonRefused("no")])
def test_connection_lost_while_verifying_binds_nothing(outcome, logs):
    handler = PendingHandler()
    engine = make_engine(handler=handler)
    events = record_events(engine.user_manager)
    a = Client(engine)
    a.logon("alice")
    a.lose()
    verify = handler.pending(a.address)
    if isinstance(outcome, Exception):
        verify.errback(outcome)
    else:
        verify.callback(outcome)
    assert a.take() == []
    assert events == []
    assert engine.sessions == set()
    assert not engine.user_manager.is_user_online("alice")
    assert logs.failures() == []
    (ended,) = logs.esf("session_ended")
    assert ended["reason"] == "NETWORK_INTERRUPTED"
    # The user can still log on afterwards.
    b = Client(engine)
    b.logon("alice")
    handler.pending(b.address).callback(True)
    assert b.take() == [logon_answer(engine, "alice")]


def test_two_devices_logging_on_concurrently_both_bind():
    handler = PendingHandler()
    engine = make_engine(handler=handler)
    events = record_events(engine.user_manager)
    pc = Client(engine)
    pc.logon("alice", ClientType.DOTNET)
    phone = Client(engine)
    phone.logon("alice", ClientType.ANDROID)
    handler.pending(phone.address).callback(True)
    handler.pending(pc.address).callback(True)
    assert phone.take() == [
        logon_answer(engine, "alice"),
        Received(T.MY_DEVICE_ONLINE, w.EMPTY, 0, "_0", "alice", ClientType.DOTNET),
    ]
    assert pc.take() == [logon_answer(engine, "alice")]
    assert engine.user_manager.get_all_login_devices("alice") == [
        ClientType.ANDROID,
        ClientType.DOTNET,
    ]
    assert events == [
        ("device_connected", phone.ident),
        ("user_connected", phone.ident),
        ("user_count_changed", 1),
        ("device_connected", pc.ident),
    ]


# -- relogon ------------------------------------------------------------------------


def test_replace_old_pushes_the_old_session_out(logs):
    engine = make_engine()
    events = record_events(engine.user_manager)
    old = connect(engine, "alice", ClientType.ANDROID, "10.0.0.1")
    pc = connect(engine, "alice", ClientType.DOTNET, "10.0.0.9")
    assert old.take() == [device_note(T.MY_DEVICE_ONLINE, ClientType.DOTNET)]
    events.clear()
    new = Client(engine, "10.0.0.2", 5002)
    new.logon("alice", ClientType.ANDROID)
    assert new.take() == [logon_answer(engine, "alice")]
    pushed = old.take()
    assert [r.message_type for r in pushed] == [T.BEING_PUSHED_OUT_NOTIFY, T.DISCONNECT_NOTICE]
    assert pushed[0] == Received(
        T.BEING_PUSHED_OUT_NOTIFY, w.BeingPushedOutNotify(ANY), 0, "_0", "alice"
    )
    cause = pushed[0].body.cause
    assert "10.0.0.2:5002" in cause
    assert "ANDROID" in cause
    assert pushed[1] == notice(D.BEING_PUSHED_OUT, "alice")
    assert old.closing
    assert not new.closing
    assert bound(engine, new)
    # The user never went offline: no user events, nothing for the other device.
    assert events == [
        ("device_being_pushed_out", old.ident, "10.0.0.2:5002"),
        ("device_disconnected", old.ident, D.BEING_PUSHED_OUT),
        ("device_connected", new.ident),
    ]
    assert pc.take() == []
    assert engine.user_manager.user_count == 1
    (ended,) = logs.esf("session_ended")
    assert ended["reason"] == "BEING_PUSHED_OUT"
    assert ended["address"] == old.address
    # The old connection then goes away: nothing more happens.
    old.lose()
    assert events[3:] == []
    assert bound(engine, new)


def test_replace_old_pushing_out_the_only_device_keeps_the_user_online():
    engine = make_engine()
    old = connect(engine, "alice")
    events = record_events(engine.user_manager)
    new = connect(engine, "alice")
    assert events == [
        ("device_being_pushed_out", old.ident, new.address),
        ("device_disconnected", old.ident, D.BEING_PUSHED_OUT),
        ("device_connected", new.ident),
    ]
    assert old.closing and not new.closing
    assert engine.user_manager.user_count == 1
    assert engine.user_manager.get_user_data("alice").address == new.address


def test_ignore_new_refuses_the_new_connection(logs):
    engine = make_engine(relogon_mode=RelogonMode.IGNORE_NEW)
    old = connect(engine, "alice")
    events = record_events(engine.user_manager)
    new = Client(engine, "10.0.0.2")
    new.logon("alice")
    replies = new.take()
    assert replies == refused(engine, "alice", LogonResult.HAD_LOGGED_ON, D.NEW_CONNECTION_IGNORED)
    assert old.address in replies[0].body.failure_cause
    assert new.closing
    assert old.take() == [] and not old.closing
    assert bound(engine, old)
    assert events == [("new_connection_ignored", "alice", ClientType.DOTNET, new.address)]
    (ended,) = logs.esf("session_ended")
    assert ended["reason"] == "NEW_CONNECTION_IGNORED"


def test_ignore_new_allows_another_device():
    engine = make_engine(relogon_mode=RelogonMode.IGNORE_NEW)
    connect(engine, "alice", ClientType.DOTNET)
    connect(engine, "alice", ClientType.IOS)
    devices = engine.user_manager.get_all_login_devices("alice")
    assert devices == [ClientType.DOTNET, ClientType.IOS]


def test_relogon_mode_is_on_the_user_manager():
    assert make_engine().user_manager.relogon_mode is RelogonMode.REPLACE_OLD
    engine = make_engine(relogon_mode=RelogonMode.IGNORE_NEW)
    assert engine.user_manager.relogon_mode is RelogonMode.IGNORE_NEW


# -- devices ----------------------------------------------------------------------------


def device_note(message_type, client_type, dest="alice") -> Received:
    return Received(message_type, w.EMPTY, 0, "_0", dest, client_type)


def test_two_devices_online_and_offline():
    engine = make_engine()
    events = record_events(engine.user_manager)
    pc = connect(engine, "alice", ClientType.DOTNET)
    phone = connect(engine, "alice", ClientType.ANDROID)
    assert pc.take() == [device_note(T.MY_DEVICE_ONLINE, ClientType.ANDROID)]
    assert phone.take() == []
    pc.send(T.GET_MY_DEVICES, message_id=4)
    assert pc.take() == [answer(T.GET_MY_DEVICES, w.GetMyDevicesReply((0, 5)), 4, "alice")]
    phone.send(T.GET_MY_DEVICES, message_id=5)
    assert phone.take() == [answer(T.GET_MY_DEVICES, w.GetMyDevicesReply((0, 5)), 5, "alice")]
    um = engine.user_manager
    assert um.user_count == 1
    assert um.get_online_user_list() == ["alice"]
    assert um.get_all_login_devices("alice") == [ClientType.DOTNET, ClientType.ANDROID]
    assert um.get_user_data("alice").client_type == ClientType.DOTNET
    assert um.get_user_data("alice", ClientType.ANDROID).address == phone.address
    assert um.get_user_data("alice", ClientType.IOS) is None
    assert [d.client_type for d in um.get_all_user_data()] == [0, 5]

    phone.send(T.LOGOFF)
    assert pc.take() == [device_note(T.MY_DEVICE_OFFLINE, ClientType.ANDROID)]
    assert um.is_user_online("alice")
    pc.send(T.GET_MY_DEVICES, message_id=6)
    assert pc.take() == [answer(T.GET_MY_DEVICES, w.GetMyDevicesReply((0,)), 6, "alice")]
    pc.lose()
    assert not um.is_user_online("alice")
    assert um.get_user_data("alice") is None
    assert um.get_all_login_devices("alice") == []
    assert events == [
        ("device_connected", pc.ident),
        ("user_connected", pc.ident),
        ("user_count_changed", 1),
        ("device_connected", phone.ident),
        ("device_disconnected", phone.ident, D.LOGGED_OFF),
        ("device_disconnected", pc.ident, D.NETWORK_INTERRUPTED),
        ("user_disconnected", pc.ident, D.NETWORK_INTERRUPTED),
        ("user_count_changed", 0),
    ]


def test_device_notes_only_go_to_the_same_user():
    engine = make_engine()
    bob = connect(engine, "bob")
    connect(engine, "alice", ClientType.DOTNET)
    phone = connect(engine, "alice", ClientType.ANDROID)
    phone.lose()
    assert bob.take() == []


@pytest.mark.parametrize("hook", ["device_connected", "user_connected"])
def test_a_subscriber_that_kicks_on_logon(hook):
    """
    An application that kicks a user from a logon event: the client gets
    its Logon reply, then the kick; the user ends offline, and no event
    reports it online after its end was reported.
    """
    engine = make_engine()
    events = record_events(engine.user_manager)
    getattr(engine.user_manager, hook).subscribe(
        lambda data: engine.kick_out(data.user_id, "banned")
    )
    client = Client(engine)
    client.logon("mallory")
    assert client.take() == [logon_answer(engine, "mallory"), *kicked("_0", "banned", "mallory")]
    assert not engine.user_manager.is_user_online("mallory")
    assert engine.user_manager.user_count == 0
    names = [e[0] for e in events]
    assert names.count("device_disconnected") == 1
    assert names.count("user_disconnected") == 1
    assert events[-3:] == [
        ("device_disconnected", client.ident, D.BEING_KICKED_OUT),
        ("user_disconnected", client.ident, D.BEING_KICKED_OUT),
        ("user_count_changed", 0),
    ]


def test_a_device_kicked_on_logon_is_seen_online_then_offline_by_the_others():
    engine = make_engine()
    phone = connect(engine, "alice", ClientType.ANDROID)
    events = record_events(engine.user_manager)
    engine.user_manager.device_connected.subscribe(
        lambda data: (
            data.client_type == ClientType.DOTNET
            and engine.kick_out(data.user_id, "no desktops", data.client_type)
        )
    )
    pc = Client(engine)
    pc.logon("alice", ClientType.DOTNET)
    assert phone.take() == [
        device_note(T.MY_DEVICE_ONLINE, ClientType.DOTNET),
        device_note(T.MY_DEVICE_OFFLINE, ClientType.DOTNET),
    ]
    assert events == [
        ("device_connected", pc.ident),
        ("device_disconnected", pc.ident, D.BEING_KICKED_OUT),
    ]
    assert engine.user_manager.get_all_login_devices("alice") == [ClientType.ANDROID]


def test_user_count_changes_per_user_not_per_device():
    engine = make_engine()
    counts = []
    engine.user_manager.user_count_changed.subscribe(counts.append)
    a1 = connect(engine, "alice", 0)
    connect(engine, "alice", 5)
    b = connect(engine, "bob", 0)
    a1.lose()
    b.lose()
    assert counts == [1, 2, 1]
    assert engine.user_manager.user_count == 1


# -- every session ends once, with one log event -------------------------------------


def end_by_logoff(engine, client):
    client.send(T.LOGOFF)


def end_by_loss(engine, client):
    client.lose()


def end_by_kick(engine, client):
    engine.kick_out("alice", "bye")


def end_by_invalid_frame(engine, client):
    client.send_raw(b"\x00" * HEADER)


def end_by_wrong_user_id(engine, client):
    client.send(T.HEARTBEAT, user_id="mallory")


def end_by_heartbeat_timeout(engine, client):
    engine.clock.advance(45)


def end_by_push_out(engine, client):
    connect(engine, "alice", ClientType.IOS, host="10.9.9.9")


def end_by_stop(engine, client):
    engine.stop()


ENDINGS = [
    (end_by_logoff, D.LOGGED_OFF),
    (end_by_loss, D.NETWORK_INTERRUPTED),
    (end_by_kick, D.BEING_KICKED_OUT),
    (end_by_invalid_frame, D.INVALID_MESSAGE),
    (end_by_wrong_user_id, D.MESSAGE_WITH_WRONG_USER_ID),
    (end_by_heartbeat_timeout, D.HEARTBEAT_TIMEOUT),
    (end_by_push_out, D.BEING_PUSHED_OUT),
    (end_by_stop, D.SERVER_SHUTDOWN),
]


@pytest.mark.parametrize("end, reason", ENDINGS, ids=[r.name for _, r in ENDINGS])
def test_every_session_end_fires_events_and_logs_exactly_once(end, reason, logs):
    engine = make_engine()
    engine.clock.advance(2)
    client = connect(engine, "alice", ClientType.IOS)
    disconnected = []
    engine.user_manager.device_disconnected.subscribe(
        lambda data, why: disconnected.append((data.address, why))
    )
    engine.clock.advance(1.5)
    end(engine, client)
    # Whatever else happens to it afterwards changes nothing.
    if reason is not D.BEING_PUSHED_OUT:
        assert engine.kick_out("alice", "again", ClientType.IOS) == 0
    client.send(T.LOGOFF)
    client.lose()
    client.lose()
    assert disconnected.count((client.address, reason)) == 1
    assert [a for a, _ in disconnected].count(client.address) == 1
    ended = [e for e in logs.esf("session_ended") if e["address"] == client.address]
    assert len(ended) == 1
    (event,) = ended
    assert event["user_id"] == "alice"
    assert event["client_type"] == ClientType.IOS
    assert event["reason"] == reason.name
    assert event["duration"] == pytest.approx(engine.clock.seconds() - 2)
    assert event["log_namespace"] == "esf.server"
    assert client not in engine.sessions


@pytest.mark.parametrize(
    "reason, cause",
    [
        (D.LOGON_TIMEOUT, lambda engine, client: engine.clock.advance(10)),
        (D.NOT_LOGGED_ON, lambda engine, client: client.send(T.HEARTBEAT)),
        (D.NETWORK_INTERRUPTED, lambda engine, client: client.lose()),
    ],
)
def test_a_session_that_never_logged_on_logs_its_end_once(reason, cause, logs):
    engine = make_engine()
    events = record_events(engine.user_manager)
    client = Client(engine)
    cause(engine, client)
    client.lose()
    (event,) = logs.esf("session_ended")
    assert (event["user_id"], event["client_type"], event["address"], event["reason"]) == (
        None,
        None,
        client.address,
        reason.name,
    )
    assert event["duration"] == pytest.approx(engine.clock.seconds())
    assert events == []


# -- closing ------------------------------------------------------------------------------


def test_server_initiated_close_then_abort_after_close_timeout():
    engine = make_engine(close_timeout=2, start=False)
    client = Client(engine)
    assert client.transport.producer is client.protocol
    assert client.transport.streaming
    client.send(T.HEARTBEAT)
    assert client.take() == [notice(D.NOT_LOGGED_ON)]
    assert client.closing
    assert client.transport.producer is None
    assert not client.aborted
    engine.clock.advance(1.99)
    assert not client.aborted
    engine.clock.advance(0.01)
    assert client.aborted
    client.lose()
    assert timers(engine) == []


def test_no_abort_when_the_peer_drains_in_time():
    engine = make_engine(close_timeout=2, start=False)
    client = connect(engine, "alice")
    engine.kick_out("alice")
    assert client.closing
    engine.clock.advance(1)
    client.lose()
    assert timers(engine) == []
    engine.clock.advance(5)
    assert not client.aborted


def test_close_is_idempotent():
    engine = make_engine(close_timeout=2, start=False)
    client = Client(engine)
    client.protocol.close()
    client.protocol.close()
    assert len(timers(engine)) == 2  # logon timer, one abort


def test_tcp_options_are_set_when_the_transport_has_them():
    calls = []

    class TCPTransport(StringTransport):
        def setTcpNoDelay(self, on):
            calls.append(("nodelay", on))

        def setTcpKeepAlive(self, on):
            calls.append(("keepalive", on))

    connect(make_engine(), "alice")  # a transport without them is fine too
    Client(make_engine(), transport=TCPTransport())
    assert calls == [("nodelay", True), ("keepalive", True)]


# -- heartbeat --------------------------------------------------------------------------


def test_heartbeat_is_echoed():
    engine = make_engine()
    client = connect(engine, "alice", ClientType.IOS)
    client.send(T.HEARTBEAT)
    client.send(T.HEARTBEAT, message_id=77)
    echo = Received(T.HEARTBEAT, w.EMPTY, 0, "_0", "alice", 0)
    replies = client.take()
    assert replies == [echo, echo]
    assert replies[0].raw == w.encode_frame(
        engine.config.wire, T.HEARTBEAT, user_id="_0", dest_user_id="alice"
    )


def online(engine, client) -> bool:
    return bound(engine, client) and not client.closing


@pytest.mark.parametrize("logon_at", [0, 3.3])
@pytest.mark.parametrize("last", [None, 0, 1, 7.4, 7.5, 7.6, 14.99, 15, 22.6, 29.9])
@pytest.mark.parametrize("kind", [T.HEARTBEAT, T.GET_MY_IPE, 199])
def test_heartbeat_timeout_window(logon_at, last, kind):
    """
    A silent session ends no earlier than the timeout after its last frame,
    and no later than 1.5 times the timeout; any frame counts.
    """
    engine = make_engine()
    events = record_events(engine.user_manager)
    clock = engine.clock
    advance_to(clock, logon_at)
    client = connect(engine, "alice")
    if last is None:
        last = logon_at
    else:
        last = logon_at + last
        advance_to(clock, last)
        assert online(engine, client)
        client.send(kind, message_id=0)
    advance_to(clock, last + 30 - 0.001)
    assert online(engine, client), clock.seconds()
    advance_to(clock, last + 45)
    assert not online(engine, client)
    assert client.take()[-1] == notice(D.HEARTBEAT_TIMEOUT, "alice")
    assert events[-4:] == [
        ("heartbeat_timed_out", client.ident),
        ("device_disconnected", client.ident, D.HEARTBEAT_TIMEOUT),
        ("user_disconnected", client.ident, D.HEARTBEAT_TIMEOUT),
        ("user_count_changed", 0),
    ]


def test_a_frame_after_the_timeout_comes_too_late():
    engine = make_engine()
    client = connect(engine, "alice")
    advance_to(engine.clock, 30)
    assert client.take() == [notice(D.HEARTBEAT_TIMEOUT, "alice")]
    client.send(T.HEARTBEAT)
    assert client.take() == []


def test_heartbeat_timeout_with_other_settings():
    engine = make_engine(heartbeat_interval=1, heartbeat_timeout=4)
    client = connect(engine, "alice")
    advance_to(engine.clock, 2.3)
    client.send(T.HEARTBEAT)
    advance_to(engine.clock, 6.29)
    assert online(engine, client)
    advance_to(engine.clock, 8.3)
    assert not online(engine, client)


def test_steady_traffic_keeps_a_session_on():
    engine = make_engine()
    client = connect(engine, "alice")
    for second in range(1, 300):
        advance_to(engine.clock, second)
        if second % 29 == 0:
            client.send(T.GET_MY_IPE, message_id=second)
    assert online(engine, client)


def test_heartbeat_reaper_starts_with_the_first_connection():
    # An engine built by hand and never started still ends silent sessions.
    engine = make_engine(start=False)
    assert not engine.reaper.running
    client = connect(engine, "alice")
    assert engine.reaper.running
    engine.start()  # idempotent
    engine.clock.advance(37.5)
    assert not online(engine, client)


def test_a_timeout_subscriber_that_ends_other_sessions():
    """
    Two devices time out in the same scan and a subscriber kicks the whole
    user on the first: the second's session has ended, so no timeout is
    reported for it after its end.
    """
    engine = make_engine()
    pc = connect(engine, "alice", ClientType.DOTNET)
    phone = connect(engine, "alice", ClientType.ANDROID)
    events = record_events(engine.user_manager)
    engine.user_manager.heartbeat_timed_out.subscribe(
        lambda data: engine.kick_out(data.user_id, "timed out")
    )
    advance_to(engine.clock, 30)
    timed_out = [e for e in events if e[0] == "heartbeat_timed_out"]
    assert len(timed_out) == 1
    first = timed_out[0][1]
    assert events[0] == ("heartbeat_timed_out", first)
    assert [e for e in events if e[0] == "device_disconnected"] == [
        ("device_disconnected", pc.ident, D.BEING_KICKED_OUT),
        ("device_disconnected", phone.ident, D.BEING_KICKED_OUT),
    ]
    assert not engine.user_manager.is_user_online("alice")


def test_heartbeat_timeout_spares_other_sessions():
    engine = make_engine()
    quiet = connect(engine, "quiet")
    chatty = connect(engine, "chatty")
    for t in (10, 20, 30, 40):
        advance_to(engine.clock, t)
        chatty.send(T.HEARTBEAT)
    assert not online(engine, quiet)
    assert online(engine, chatty)


# -- after logon: bad frames ----------------------------------------------------------


def test_wrong_user_id_after_logon():
    engine = make_engine()
    events = record_events(engine.user_manager)
    client = connect(engine, "alice")
    client.send(T.GET_MY_IPE, message_id=2, user_id="bob")
    assert client.take() == [notice(D.MESSAGE_WITH_WRONG_USER_ID, "alice")]
    assert client.closing
    assert events[-3:] == [
        ("device_disconnected", client.ident, D.MESSAGE_WITH_WRONG_USER_ID),
        ("user_disconnected", client.ident, D.MESSAGE_WITH_WRONG_USER_ID),
        ("user_count_changed", 0),
    ]


def test_unknown_message_type_with_message_id_is_an_error():
    engine = make_engine()
    client = connect(engine, "alice")
    client.send(150, b"abc", message_id=8)
    assert client.take() == [error(150, ErrorCode.UNKNOWN_MESSAGE_TYPE, 8, "alice")]
    assert online(engine, client)


def test_unknown_message_type_without_message_id_is_dropped():
    engine = make_engine()
    client = connect(engine, "alice")
    client.send(150, b"abc")
    assert client.take() == []
    assert online(engine, client)


@pytest.mark.parametrize(
    "message_type, body",
    [
        (T.QUERY_ONLINES, b"\x05\x00\x00\x00"),  # five IDs announced, none there
        (T.QUERY_ONLINES, b"\x01\x00\x00\x00\x09\x00ab"),  # str runs past the end
        (T.QUERY_ONLINES, b"\x00\x00\x00\x00\x00"),  # a byte too many
        (T.GET_MY_IPE, b"x"),
        (T.GET_ALL_ONLINE_USERS, b"\x00\x00"),
        (T.KICK_OUT, b"\x05\x00ab"),
        (T.GET_MY_DEVICES, b"?"),
        (T.QUERY_ONLINE, b"?"),
        (T.PING_BY_SERVER, b"?"),
    ],
)
def test_malformed_body_is_a_bad_request(message_type, body):
    engine = make_engine()
    client = connect(engine, "alice")
    client.send(message_type, body, message_id=12, dest="alice")
    assert client.take() == [error(message_type, ErrorCode.BAD_REQUEST, 12, "alice")]
    assert online(engine, client)


def test_invalid_frame_closes_only_that_session(logs):
    engine = make_engine()
    bob = connect(engine, "bob")
    alice = connect(engine, "alice")
    events = record_events(engine.user_manager)
    bad = bytearray(alice.frame(T.HEARTBEAT))
    bad[0] = 0xFE
    alice.send_raw(bytes(bad))
    (received,) = alice.take()
    assert received == notice(D.INVALID_MESSAGE, "alice")
    assert "36-byte headers" in received.body.text
    assert alice.closing
    assert bob.take() == [] and online(engine, bob)
    bob.send(T.HEARTBEAT)
    assert len(bob.take()) == 1
    assert events == [
        ("device_disconnected", alice.ident, D.INVALID_MESSAGE),
        ("user_disconnected", alice.ident, D.INVALID_MESSAGE),
        ("user_count_changed", 1),
    ]


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda frame: frame[:12] + b"\x0c" + frame[13:],  # UserID longer than its slot
        lambda frame: frame[:8] + b"\xff\xff\xff\xff" + frame[12:],  # negative length
        lambda frame: frame[:20] + b"\x01" + frame[21:],  # padding not zero
    ],
)
def test_other_invalid_headers(corrupt):
    engine = make_engine()
    client = connect(engine, "alice")
    client.send_raw(corrupt(client.frame(T.HEARTBEAT)))
    assert client.take() == [notice(D.INVALID_MESSAGE, "alice")]


def test_frames_before_an_invalid_one_in_the_same_chunk_are_processed():
    engine = make_engine()
    client = connect(engine, "alice")
    chunk = (
        client.frame(T.GET_MY_IPE, message_id=5)
        + client.frame(T.HEARTBEAT)
        + b"\x00" * HEADER
        + client.frame(T.GET_MY_IPE, message_id=6)
    )
    client.send_raw(chunk)
    assert client.take() == [
        answer(T.GET_MY_IPE, w.GetMyIPEReply(client.address), 5, "alice"),
        Received(T.HEARTBEAT, w.EMPTY, 0, "_0", "alice"),
        notice(D.INVALID_MESSAGE, "alice"),
    ]


def test_a_logon_then_an_invalid_frame_in_one_chunk():
    engine = make_engine()
    events = record_events(engine.user_manager)
    client = Client(engine)
    client.user_id = "alice"
    chunk = client.frame(T.LOGON, w.Logon(), message_id=1, user_id="alice") + b"\x01" * HEADER
    client.send_raw(chunk)
    assert client.take() == [logon_answer(engine, "alice"), notice(D.INVALID_MESSAGE, "alice")]
    assert [e[0] for e in events] == [
        "device_connected",
        "user_connected",
        "user_count_changed",
        "device_disconnected",
        "user_disconnected",
        "user_count_changed",
    ]


def header_with_length(client, body_length: int, message_type=T.SEND) -> bytes:
    wire = client.wire
    uid = client.user_id.encode()
    return wire.header_struct.pack(0xFF, 0, message_type, 0, body_length, len(uid), uid, 2, b"_0")


def test_pre_logon_size_limit_is_64_kib():
    engine = make_engine()
    client = Client(engine)
    client.user_id = "alice"
    client.send_raw(header_with_length(client, 64 * 1024 - HEADER, T.LOGON))
    assert client.take() == [] and not client.closing
    other = Client(engine)
    other.user_id = "alice"
    other.send_raw(header_with_length(other, 64 * 1024 - HEADER + 1, T.LOGON))
    assert other.take() == [notice(D.MESSAGE_TOO_LARGE)]
    assert other.closing
    assert client.take() == [] and not client.closing


def test_pre_logon_limit_is_the_configured_maximum_when_smaller():
    engine = make_engine(max_message_size=1000)
    client = Client(engine)
    client.user_id = "alice"
    client.send_raw(header_with_length(client, 1000 - HEADER + 1, T.LOGON))
    assert client.take() == [notice(D.MESSAGE_TOO_LARGE)]


def test_after_logon_the_configured_maximum_applies():
    engine = make_engine(max_message_size=100_000)
    client = connect(engine, "alice")
    body = b"\x00" * (100_000 - HEADER)
    client.send_raw(header_with_length(client, len(body), 150) + body)
    assert client.take() == []
    assert online(engine, client)
    client.send_raw(header_with_length(client, 100_000 - HEADER + 1))
    assert client.take() == [notice(D.MESSAGE_TOO_LARGE, "alice")]
    assert client.closing


def test_after_logon_default_maximum_is_1_mib():
    engine = make_engine()
    client = connect(engine, "alice")
    client.send_raw(header_with_length(client, 1024 * 1024 - HEADER))
    assert client.take() == [] and online(engine, client)
    other = connect(engine, "bob")
    other.send_raw(header_with_length(other, 1024 * 1024 - HEADER + 1))
    assert other.take() == [notice(D.MESSAGE_TOO_LARGE, "bob")]


def test_frames_split_at_every_byte():
    engine = make_engine()
    client = Client(engine)
    client.user_id = "alice"
    data = client.frame(T.LOGON, w.Logon(), message_id=1) + client.frame(
        T.GET_MY_IPE, message_id=2
    )
    for i in range(len(data)):
        client.send_raw(data[i : i + 1])
    assert client.take() == [
        logon_answer(engine, "alice"),
        answer(T.GET_MY_IPE, w.GetMyIPEReply(client.address), 2, "alice"),
    ]


def test_non_default_user_id_length():
    engine = make_engine(max_userid_length=20)
    client = connect(engine, "a-rather-long-name")
    client.send(T.GET_MY_IPE, message_id=3)
    (reply,) = client.take()
    assert reply.dest_user_id == "a-rather-long-name"
    assert len(reply.raw) == 56 + 2 + len(client.address)


# -- basic services ---------------------------------------------------------------------


@pytest.mark.parametrize("dest", ["_0", ""])
def test_ping_the_server(dest):
    engine = make_engine()
    client = connect(engine, "alice")
    client.send(T.PING_BY_SERVER, message_id=31, dest=dest)
    assert client.take() == [answer(T.PING_ACK, w.EMPTY, 31, "alice")]


def test_ping_a_user_is_relayed_both_ways_unchanged():
    engine = make_engine()
    alice = connect(engine, "alice")
    bob = connect(engine, "bob", ClientType.IOS)
    ping = alice.send(T.PING_BY_SERVER, message_id=32, dest="bob")
    assert alice.take() == []
    (received,) = bob.take()
    assert received.raw == ping
    ack = bob.send(T.PING_ACK, message_id=32, dest="alice")
    (back,) = alice.take()
    assert back.raw == ack
    assert (back.message_type, back.message_id, back.user_id, back.client_type) == (
        T.PING_ACK,
        32,
        "bob",
        ClientType.IOS,
    )


def test_ping_a_user_reaches_every_device():
    engine = make_engine()
    alice = connect(engine, "alice")
    pc = connect(engine, "bob", ClientType.DOTNET)
    phone = connect(engine, "bob", ClientType.ANDROID)
    pc.take()
    ping = alice.send(T.PING_BY_SERVER, message_id=33, dest="bob")
    assert [r.raw for r in pc.take()] == [ping]
    assert [r.raw for r in phone.take()] == [ping]


def test_ping_an_offline_user():
    engine = make_engine()
    alice = connect(engine, "alice")
    alice.send(T.PING_BY_SERVER, message_id=34, dest="nobody")
    assert alice.take() == [error(T.PING_BY_SERVER, ErrorCode.USER_OFFLINE, 34, "alice")]
    # A PingAck answers nothing nobody asked: dropped and counted, not
    # answered (the server relays answers only to the device that asked).
    alice.send(T.PING_ACK, message_id=35, dest="nobody")
    alice.send(T.PING_ACK, message_id=0, dest="nobody")
    assert alice.take() == []
    assert engine.counters["unsolicited_answers"] == 2
    assert online(engine, alice)


def test_ping_ack_to_everyone_is_a_bad_request():
    engine = make_engine()
    alice = connect(engine, "alice")
    alice.send(T.PING_ACK, message_id=36, dest="*")
    assert alice.take() == [error(T.PING_ACK, ErrorCode.BAD_REQUEST, 36, "alice")]


@pytest.mark.parametrize("host, expected", [("10.1.2.3", "10.1.2.3:4444"), ("::1", "[::1]:4444")])
def test_get_my_ipe(host, expected):
    engine = make_engine()
    client = Client(engine, host, 4444)
    client.logon("alice")
    client.take()
    client.send(T.GET_MY_IPE, message_id=40)
    assert client.take() == [answer(T.GET_MY_IPE, w.GetMyIPEReply(expected), 40, "alice")]


def test_get_all_online_users_pages():
    engine = make_engine()
    names = ["carol", "alice", "eve", "bob", "dave"]
    clients = {name: connect(engine, name) for name in names}
    connect(engine, "alice", ClientType.IOS)  # a second device is not a second user
    asker = clients["bob"]

    def page(offset, limit, message_id=50):
        request = w.GetAllOnlineUsers(offset, limit)
        asker.send(T.GET_ALL_ONLINE_USERS, request, message_id=message_id)
        (reply,) = asker.take()
        assert (reply.message_type, reply.message_id, reply.dest_user_id) == (
            T.GET_ALL_ONLINE_USERS,
            message_id,
            "bob",
        )
        return reply.body

    GetAll = w.GetAllOnlineUsersReply
    assert page(0, 2) == GetAll(5, ("alice", "bob"))
    assert page(2, 2) == GetAll(5, ("carol", "dave"))
    assert page(4, 2) == GetAll(5, ("eve",))
    assert page(5, 2) == GetAll(5, ())
    assert page(1000, 0) == GetAll(5, ())
    assert page(0, 0) == GetAll(5, ("alice", "bob", "carol", "dave", "eve"))
    assert page(3, 0) == GetAll(5, ("dave", "eve"))
    assert page(0, 100) == GetAll(5, ("alice", "bob", "carol", "dave", "eve"))


def test_get_all_online_users_limit_0_fills_one_frame():
    # Room for the header, total and count, and three 6-byte IDs (2 + 6 each).
    engine = make_engine(max_message_size=HEADER + 8 + 3 * 8 + 7)
    for n in range(10):
        connect(engine, f"user{n:02d}")
    asker = connect(engine, "user00", ClientType.IOS)
    asker.send(T.GET_ALL_ONLINE_USERS, w.GetAllOnlineUsers(0, 0), message_id=51)
    (reply,) = asker.take()
    assert reply.body == w.GetAllOnlineUsersReply(10, ("user00", "user01", "user02"))
    assert len(reply.raw) <= engine.config.wire.max_message_size
    asker.send(T.GET_ALL_ONLINE_USERS, w.GetAllOnlineUsers(3, 100), message_id=52)
    (reply,) = asker.take()
    assert reply.body == w.GetAllOnlineUsersReply(10, ("user03", "user04", "user05"))


def test_query_online():
    engine = make_engine()
    alice = connect(engine, "alice")
    connect(engine, "bob", ClientType.ANDROID)
    alice.send(T.QUERY_ONLINE, message_id=60, dest="bob")
    alice.send(T.QUERY_ONLINE, message_id=61, dest="nobody")
    alice.send(T.QUERY_ONLINE, message_id=62, dest="alice")
    assert alice.take() == [
        answer(T.QUERY_ONLINE, w.QueryOnlineReply(True), 60, "alice"),
        answer(T.QUERY_ONLINE, w.QueryOnlineReply(False), 61, "alice"),
        answer(T.QUERY_ONLINE, w.QueryOnlineReply(True), 62, "alice"),
    ]


def test_query_onlines():
    engine = make_engine()
    alice = connect(engine, "alice")
    connect(engine, "bob")
    alice.send(T.QUERY_ONLINES, w.QueryOnlines(("bob", "nobody", "alice", "")), message_id=63)
    alice.send(T.QUERY_ONLINES, w.QueryOnlines(()), message_id=64)
    assert alice.take() == [
        answer(T.QUERY_ONLINES, w.QueryOnlinesReply((True, False, True, False)), 63, "alice"),
        answer(T.QUERY_ONLINES, w.QueryOnlinesReply(()), 64, "alice"),
    ]


def kicked(operator: str, reason: str, dest: str) -> list[Received]:
    return [
        Received(
            T.BEING_KICKED_OUT_NOTIFY, w.BeingKickedOutNotify(operator, reason), 0, "_0", dest
        ),
        notice(D.BEING_KICKED_OUT, dest),
    ]


def test_kick_out_is_denied_by_default(logs):
    engine = make_engine()
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    alice.send(T.KICK_OUT, w.KickOut("go away"), message_id=70, dest="bob")
    assert alice.take() == [answer(T.KICK_OUT, w.KickOutReply(False, ANY), 70, "alice")]
    assert bob.take() == [] and online(engine, bob)
    (refusal,) = logs.esf("kick_refused")
    assert (refusal["operator"], refusal["target"], refusal["reason"]) == (
        "alice",
        "bob",
        "go away",
    )


def test_kick_out_by_an_admin():
    engine = make_engine(admins={"root"})
    events = record_events(engine.user_manager)
    root = connect(engine, "root")
    bob = connect(engine, "bob", ClientType.IOS)
    events.clear()
    root.send(T.KICK_OUT, w.KickOut("spam"), message_id=71, dest="bob")
    assert root.take() == [answer(T.KICK_OUT, w.KickOutReply(True, ""), 71, "root")]
    assert bob.take() == kicked("root", "spam", "bob")
    assert bob.closing
    assert not engine.user_manager.is_user_online("bob")
    assert events == [
        ("device_disconnected", bob.ident, D.BEING_KICKED_OUT),
        ("user_disconnected", bob.ident, D.BEING_KICKED_OUT),
        ("user_count_changed", 1),
    ]


def test_kick_out_allowed_by_the_handler():
    handler = Handler(kick=True)
    engine = make_engine(handler=handler)
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    alice.send(T.KICK_OUT, w.KickOut("mod"), message_id=72, dest="bob")
    assert handler.kick_calls == [("alice", "bob", None)]
    assert alice.take() == [answer(T.KICK_OUT, w.KickOutReply(True, ""), 72, "alice")]
    assert bob.take() == kicked("alice", "mod", "bob")


@pytest.mark.parametrize("allowed", [True, False])
def test_kick_out_authorised_later(allowed):
    handler = PendingHandler()
    engine = make_engine(handler=handler)
    for name in ("alice", "bob"):
        client = Client(engine)
        client.logon(name)
        handler.pending(client.address).callback(True)
        client.take()
        if name == "alice":
            alice = client
        else:
            bob = client
    alice.send(T.KICK_OUT, w.KickOut("later"), message_id=73, dest="bob")
    assert alice.take() == []
    ((args, d),) = handler.kicks
    assert args == ("alice", "bob", None)
    d.callback(allowed)
    assert alice.take() == [answer(T.KICK_OUT, w.KickOutReply(allowed, ANY), 73, "alice")]
    assert bob.take() == (kicked("alice", "later", "bob") if allowed else [])


def test_kick_out_when_the_operator_leaves_before_authorisation():
    handler = PendingHandler()
    engine = make_engine(handler=handler)
    handler_accepting = []
    for name in ("alice", "bob"):
        client = Client(engine)
        client.logon(name)
        handler.pending(client.address).callback(True)
        client.take()
        handler_accepting.append(client)
    alice, bob = handler_accepting
    alice.send(T.KICK_OUT, w.KickOut(), message_id=74, dest="bob")
    alice.lose()
    handler.kicks[0][1].callback(True)
    assert bob.take() == [] and online(engine, bob)


def test_kick_out_handler_raising_denies(logs):
    engine = make_engine(handler=Handler(kick=RuntimeError("boom")))
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    alice.send(T.KICK_OUT, w.KickOut(), message_id=75, dest="bob")
    assert alice.take() == [answer(T.KICK_OUT, w.KickOutReply(False, ANY), 75, "alice")]
    assert online(engine, bob)
    assert len(logs.failures()) == 1


def test_kick_out_an_offline_user():
    engine = make_engine(admins={"root"})
    root = connect(engine, "root")
    root.send(T.KICK_OUT, w.KickOut(), message_id=76, dest="nobody")
    (reply,) = root.take()
    assert reply == answer(T.KICK_OUT, w.KickOutReply(False, ANY), 76, "root")
    assert "nobody" in reply.body.cause


def test_kick_out_reaches_every_device_of_the_target():
    engine = make_engine(admins={"root"})
    events = record_events(engine.user_manager)
    root = connect(engine, "root")
    pc = connect(engine, "bob", ClientType.DOTNET)
    phone = connect(engine, "bob", ClientType.ANDROID)
    pc.take()
    events.clear()
    root.send(T.KICK_OUT, w.KickOut("all"), message_id=77, dest="bob")
    assert pc.take() == kicked("root", "all", "bob")
    assert phone.take()[-2:] == kicked("root", "all", "bob")
    assert events == [
        ("device_disconnected", pc.ident, D.BEING_KICKED_OUT),
        ("device_disconnected", phone.ident, D.BEING_KICKED_OUT),
        ("user_disconnected", phone.ident, D.BEING_KICKED_OUT),
        ("user_count_changed", 1),
    ]


def test_engine_kick_out_one_device(logs):
    engine = make_engine()
    pc = connect(engine, "bob", ClientType.DOTNET)
    phone = connect(engine, "bob", ClientType.ANDROID)
    pc.take()
    assert engine.kick_out("bob", "phone stolen", ClientType.ANDROID) == 1
    assert phone.take() == kicked("_0", "phone stolen", "bob")
    assert pc.take() == [device_note(T.MY_DEVICE_OFFLINE, ClientType.ANDROID, "bob")]
    assert online(engine, pc)
    assert engine.kick_out("bob", "again", ClientType.ANDROID) == 0
    (kick, _) = logs.esf("kick_out")
    assert (kick["operator"], kick["user_id"], kick["count"], kick["reason"]) == (
        "_0",
        "bob",
        1,
        "phone stolen",
    )


def test_engine_kick_out_every_device():
    engine = make_engine()
    pc = connect(engine, "bob", ClientType.DOTNET)
    phone = connect(engine, "bob", ClientType.ANDROID)
    pc.take()
    assert engine.kick_out("bob", "banned") == 2
    assert pc.take() == kicked("_0", "banned", "bob")
    assert phone.take()[-2:] == kicked("_0", "banned", "bob")
    assert not engine.user_manager.is_user_online("bob")
    assert engine.kick_out("bob") == 0
    assert engine.kick_out("nobody") == 0


def test_logoff():
    engine = make_engine()
    events = record_events(engine.user_manager)
    client = connect(engine, "alice")
    client.send(T.LOGOFF)
    assert client.take() == []
    assert client.closing
    assert not engine.user_manager.is_user_online("alice")
    assert events[3:] == [
        ("device_disconnected", client.ident, D.LOGGED_OFF),
        ("user_disconnected", client.ident, D.LOGGED_OFF),
        ("user_count_changed", 0),
    ]
    client.lose()
    assert len(events) == 6


def test_nothing_is_handled_after_a_session_ended():
    engine = make_engine()
    client = connect(engine, "alice")
    chunk = client.frame(T.LOGOFF) + client.frame(T.GET_MY_IPE, message_id=3)
    client.send_raw(chunk)
    client.send(T.GET_MY_IPE, message_id=4)
    assert client.take() == []


# -- slow readers ---------------------------------------------------------------------


def test_slow_reader_overflows():
    engine = make_engine(max_output_buffer=1000)
    events = record_events(engine.user_manager)
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    bob.protocol.pauseProducing()
    ping = alice.frame(T.PING_BY_SERVER, message_id=1, dest="bob")
    assert len(ping) == HEADER
    for _ in range(1000 // HEADER):  # 27 frames: 972 bytes wait
        alice.send_raw(ping)
    assert online(engine, bob)
    assert len(bob.take()) == 27
    alice.send_raw(ping)  # 1008 > 1000: still within the drain timeout
    assert len(bob.take()) == 1
    engine.clock.advance(engine.config.output_drain_timeout)
    assert bob.take() == [notice(D.CHANNEL_CACHE_OVERFLOW, "bob")]
    assert bob.closing
    assert ("device_disconnected", bob.ident, D.CHANNEL_CACHE_OVERFLOW) in events
    alice.send_raw(ping)
    assert alice.take() == [error(T.PING_BY_SERVER, ErrorCode.USER_OFFLINE, 1, "alice")]
    assert online(engine, alice)


def test_resume_producing_resets_the_count():
    engine = make_engine(max_output_buffer=1000)
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    ping = alice.frame(T.PING_BY_SERVER, message_id=1, dest="bob")
    bob.protocol.pauseProducing()
    for _ in range(27):
        alice.send_raw(ping)
    bob.protocol.resumeProducing()
    bob.protocol.pauseProducing()
    for _ in range(27):
        alice.send_raw(ping)
    assert online(engine, bob)
    assert len(bob.take()) == 54


def test_an_unpaused_reader_never_overflows():
    engine = make_engine(max_output_buffer=1000)
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    ping = alice.frame(T.PING_BY_SERVER, message_id=1, dest="bob")
    for _ in range(100):
        alice.send_raw(ping)
    assert online(engine, bob)


def test_own_replies_count_for_a_paused_reader():
    engine = make_engine(max_output_buffer=1000)
    alice = connect(engine, "alice")
    alice.protocol.pauseProducing()
    for _n in range(40):
        alice.send(T.HEARTBEAT)
    engine.clock.advance(engine.config.output_drain_timeout)
    assert alice.closing
    assert alice.take()[-1] == notice(D.CHANNEL_CACHE_OVERFLOW, "alice")


# -- stop and connection limits ------------------------------------------------------------


def test_stop_notifies_every_session_and_waits_for_the_connections(logs):
    engine = make_engine()
    events = record_events(engine.user_manager)
    alice = connect(engine, "alice")
    bob = connect(engine, "bob")
    waiting = Client(engine)
    events.clear()
    done = []
    engine.stop().addCallback(done.append)
    assert alice.take() == [notice(D.SERVER_SHUTDOWN, "alice")]
    assert bob.take() == [notice(D.SERVER_SHUTDOWN, "bob")]
    assert waiting.take() == [notice(D.SERVER_SHUTDOWN)]
    assert alice.closing and bob.closing and waiting.closing
    assert events == [
        ("device_disconnected", alice.ident, D.SERVER_SHUTDOWN),
        ("user_disconnected", alice.ident, D.SERVER_SHUTDOWN),
        ("user_count_changed", 1),
        ("device_disconnected", bob.ident, D.SERVER_SHUTDOWN),
        ("user_disconnected", bob.ident, D.SERVER_SHUTDOWN),
        ("user_count_changed", 0),
    ] or events == [
        ("device_disconnected", bob.ident, D.SERVER_SHUTDOWN),
        ("user_disconnected", bob.ident, D.SERVER_SHUTDOWN),
        ("user_count_changed", 1),
        ("device_disconnected", alice.ident, D.SERVER_SHUTDOWN),
        ("user_disconnected", alice.ident, D.SERVER_SHUTDOWN),
        ("user_count_changed", 0),
    ]
    alice.lose()
    bob.lose()
    assert done == []
    # A connection made while stopping is refused at once.
    late = Client(engine)
    assert late.take() == [notice(D.SERVER_SHUTDOWN)]
    assert late.closing
    waiting.lose()
    assert done == []
    late.lose()
    assert done == [None]
    assert timers(engine) == []
    assert len(logs.esf("session_ended")) == 4


def test_stop_while_a_logon_is_verified():
    handler = PendingHandler()
    engine = make_engine(handler=handler)
    events = record_events(engine.user_manager)
    client = Client(engine)
    client.logon("alice")
    done = []
    engine.stop().addCallback(done.append)
    assert client.take() == [notice(D.SERVER_SHUTDOWN, "alice")]
    handler.pending(client.address).callback(True)
    assert client.take() == []
    assert events == [] and not engine.user_manager.is_user_online("alice")
    client.lose()
    assert done == [None]


def test_stop_without_connections_fires_at_once():
    engine = make_engine()
    done = []
    engine.stop().addCallback(done.append)
    assert done == [None]
    assert timers(engine) == []


def test_stop_waits_for_connections_whose_sessions_already_ended():
    engine = make_engine()
    client = connect(engine, "alice")
    client.send(T.LOGOFF)
    done = []
    engine.stop().addCallback(done.append)
    assert client.take() == []
    assert done == []
    client.lose()
    assert done == [None]


def test_a_new_connection_after_stop_is_refused():
    engine = make_engine()
    engine.stop()
    client = Client(engine)
    assert client.take() == [notice(D.SERVER_SHUTDOWN)]
    assert client.closing
    client.logon("alice")
    assert client.take() == []
    assert not engine.user_manager.is_user_online("alice")


def test_max_connections():
    engine = make_engine(max_connections=2)
    first = Client(engine)
    second = connect(engine, "bob")
    third = Client(engine)
    assert third.take() == [notice(D.MAX_CONNECTION_COUNT_LIMITTED)]
    assert third.closing
    third.logon("carol")
    assert third.take() == []
    assert first.take() == [] and not first.closing
    assert online(engine, second)
    third.lose()
    first.lose()
    fourth = connect(engine, "dave")
    assert online(engine, fourth)


def test_server_service_listens_then_stops_gracefully():
    reactor = MemoryReactorClock()
    engine = make_engine(start=False)
    service = ServerService(engine, TCP4ServerEndpoint(reactor, 4530, interface="127.0.0.1"))
    service.startService()
    ((port, factory, _, interface),) = reactor.tcpServers
    assert (port, interface) == (4530, "127.0.0.1")
    assert isinstance(factory, ServerFactory) and factory.engine is engine
    assert len(engine.clock.getDelayedCalls()) == 1  # the heartbeat scan
    client = Client(engine, factory=factory)
    client.logon("alice")
    assert client.take() == [logon_answer(engine, "alice")]
    done = []
    service.stopService().addCallback(done.append)
    assert client.take() == [notice(D.SERVER_SHUTDOWN, "alice")]
    assert done == []
    client.lose()
    assert len(done) == 1
    assert timers(engine) == []


def test_server_service_raises_when_it_cannot_listen():
    reactor = RaisingMemoryReactor(listenException=CannotListenError("", 4530, "in use"))
    service = ServerService(make_engine(start=False), TCP4ServerEndpoint(reactor, 4530))
    with pytest.raises(CannotListenError):
        service.startService()


# -- logon limits --------------------------------------------------------------------------


def test_logon_rate_limit_per_host():
    engine = make_engine(logon_rate_limit=3, logon_rate_window=10)
    for n in range(3):
        connect(engine, f"user{n}", host="10.0.0.1")
    engine.clock.advance(9)
    busy = Client(engine, "10.0.0.1")
    busy.logon("user3")
    assert busy.take() == refused(engine, "user3", LogonResult.BUSY, D.LOGON_FAILED)
    assert not engine.user_manager.is_user_online("user3")
    connect(engine, "user4", host="10.0.0.2")  # another host is not limited
    engine.clock.advance(1)  # the first three leave the window
    connect(engine, "user5", host="10.0.0.1")


def test_takeover_flapping_is_refused_for_a_while(logs):
    engine = make_engine(takeover_limit=2, takeover_window=60, takeover_cooldown=30)
    current = connect(engine, "alice")
    for _ in range(2):
        current = connect(engine, "alice")
    flapper = Client(engine)
    flapper.logon("alice")
    assert flapper.take() == refused(engine, "alice", LogonResult.BUSY, D.LOGON_FAILED)
    assert online(engine, current)
    assert len(logs.esf("takeover_flapping")) == 1
    engine.clock.advance(29)
    again = Client(engine)
    again.logon("alice")
    assert again.take() == refused(engine, "alice", LogonResult.BUSY, D.LOGON_FAILED)
    assert online(engine, current)
    connect(engine, "alice", ClientType.IOS)  # another device of the user is not blocked
    engine.clock.advance(1)
    connect(engine, "alice")


def test_user_ids_with_the_device_mark_are_refused():
    engine = make_engine()
    client = Client(engine)
    client.logon("alice#5")
    assert client.take() == refused(engine, "alice#5", LogonResult.FAILED, D.LOGON_FAILED)


# -- interfaces and events ---------------------------------------------------------------


def test_interfaces():
    engine = make_engine()
    assert verifyObject(IUserManager, engine.user_manager)
    assert verifyObject(IPresence, LocalPresence())
    assert verifyObject(IBasicHandler, AcceptAll())
    client = Client(engine)
    assert verifyObject(IChannel, client.protocol)
    assert isinstance(client.protocol, ServerProtocol)
    assert client.protocol.address == client.address
    assert verifyObject(IEvent, Event("x"))
    for name in (
        "user_connected",
        "user_disconnected",
        "device_connected",
        "device_disconnected",
        "device_being_pushed_out",
        "new_connection_ignored",
        "user_count_changed",
        "heartbeat_timed_out",
    ):
        assert verifyObject(IEvent, getattr(engine.user_manager, name))


def test_accept_all():
    assert AcceptAll().verify_user("", "alice", "", 0, "h:1") is True
    assert AcceptAll().can_kick_out("alice", "bob", None) is False


def test_a_raising_subscriber_stops_nothing(logs):
    engine = make_engine()
    seen = []

    def bad(data):
        raise ValueError("subscriber bug")

    engine.user_manager.device_connected.subscribe(bad)
    engine.user_manager.device_connected.subscribe(lambda data: seen.append(data.user_id))
    engine.user_manager.user_connected.subscribe(bad)
    client = connect(engine, "alice")
    assert seen == ["alice"]
    assert online(engine, client)
    assert [f["log_failure"].check(ValueError) for f in logs.failures()] == [
        ValueError,
        ValueError,
    ]
    client.send(T.GET_MY_IPE, message_id=2)
    assert len(client.take()) == 1


def test_event_subscribe_and_unsubscribe():
    event = Event("thing")
    calls = []
    unsubscribe = event.subscribe(lambda *a: calls.append(("first", a)))
    event.subscribe(lambda *a: calls.append(("second", a)))
    event.fire(1, 2)
    unsubscribe()
    unsubscribe()
    event.unsubscribe(object())
    event.fire(3)
    assert calls == [("first", (1, 2)), ("second", (1, 2)), ("second", (3,))]
    assert "thing" in repr(event)


def _fired(d):
    results = []
    d.addBoth(results.append)
    (result,) = results  # LocalPresence answers at once
    return result


def test_local_presence_claims_and_releases():
    class Handle:
        def __init__(self, user_id, client_type, session_id):
            self.user_id = user_id
            self.client_type = client_type
            self.session_id = session_id

    presence = LocalPresence()
    a0, a5, b0 = Handle("a", 0, "s1"), Handle("a", 5, "s2"), Handle("b", 0, "s3")
    assert _fired(presence.claim(a0, replace=True)) == Claim(True, None)
    assert _fired(presence.claim(a5, replace=False)) == Claim(True, None)
    assert _fired(presence.claim(b0, replace=True)) == Claim(True, None)
    assert list(presence.devices("a")) == [a0, a5]
    assert presence.get("a", 5) is a5
    assert presence.get("a", 4) is None
    assert presence.get("z", 0) is None
    assert presence.user_ids() == ["a", "b"]
    assert presence.user_ids(1) == ["b"]
    assert presence.user_ids(0, 1) == ["a"]
    assert presence.user_count() == 2

    # IGNORE_NEW leaves the holder; REPLACE_OLD takes its place.
    newer = Handle("a", 0, "s4")
    assert _fired(presence.claim(newer, replace=False)) == Claim(False, a0)
    assert presence.get("a", 0) is a0
    assert _fired(presence.claim(newer, replace=True)) == Claim(True, a0)
    assert list(presence.devices("a")) == [a5, newer]

    # Release is fenced by session ID: the replaced holder's late release
    # removes nothing.
    assert _fired(presence.release(a0)) is False
    assert presence.get("a", 0) is newer
    assert _fired(presence.release(newer)) is False  # a5 remains
    assert _fired(presence.release(a5)) is True
    assert _fired(presence.release(a5)) is False
    assert list(presence.devices("a")) == []
    assert presence.user_ids() == ["b"]
    assert presence.user_count() == 1


def test_call_normalises_answers():
    results = []
    call(lambda: 1).addCallback(results.append)
    call(lambda: succeed(2)).addCallback(results.append)

    async def three():
        return 3

    call(three).addCallback(results.append)

    def boom():
        raise KeyError("x")

    call(boom).addErrback(lambda f: results.append(f.type))
    assert results == [1, 2, 3, KeyError]


# -- the write-behind of TCP connections ------------------------------------------


class _Socket:
    """A socket that takes C{room} bytes of each send (all when None), or raises."""

    def __init__(self, room=None, error=None):
        self.room, self.error, self.sent = room, error, []

    def send(self, data):
        if self.error is not None:
            raise self.error
        taken = bytes(data[: self.room] if self.room is not None else data)
        self.sent.append(taken)
        return len(taken)


class _Transport:
    """What the write-behind reads of Twisted's TCP transport."""

    connected, disconnecting = 1, False

    def __init__(self, buffered=b""):
        self._tempDataLen = len(buffered)
        self.dataBuffer = b""
        self.written = [buffered] if buffered else []
        self.lost = False

    def write(self, data):
        self.written.append(data)

    def unregisterProducer(self):
        pass

    def loseConnection(self):
        self.lost = True


def behind_protocol(socket_, transport):
    from twisted.internet.task import Clock

    from esf.server._protocol import ServerFactory, WriteBehind

    engine = make_engine()
    protocol = ServerFactory(engine).buildProtocol(None)
    protocol.transport, protocol._tcp, protocol._socket = transport, transport, socket_
    protocol._traffic = engine.traffic["tcp"]
    clock = Clock()
    protocol._behind = WriteBehind(clock)
    return protocol, clock


def test_what_a_turn_writes_goes_in_one_send_straight_to_the_socket():
    sock, transport = _Socket(), _Transport()
    protocol, clock = behind_protocol(sock, transport)
    protocol.write(b"one")
    protocol.write(b"two")
    assert sock.sent == [] and transport.written == []  # not before the turn ends
    clock.advance(0)
    assert sock.sent == [b"onetwo"] and transport.written == []


@pytest.mark.parametrize(
    "socket_args, through_transport",
    [
        ({"room": 2}, [b"etwo"]),  # what the socket does not take
        ({"error": BlockingIOError()}, [b"onetwo"]),  # a full socket: all of it
        ({"error": ConnectionResetError()}, [b"onetwo"]),  # the transport finds it
    ],
)
def test_what_the_socket_does_not_take_goes_through_the_transport(socket_args, through_transport):
    sock = _Socket(**socket_args)  # (a socket of each run's own: it records what it sent)
    transport = _Transport()
    protocol, clock = behind_protocol(sock, transport)
    protocol.write(b"one")
    protocol.write(b"two")
    clock.advance(0)
    assert transport.written == through_transport
    assert b"".join(sock.sent + transport.written) == b"onetwo"


def test_nothing_overtakes_what_the_transport_holds():
    sock, transport = _Socket(), _Transport(buffered=b"older")
    protocol, clock = behind_protocol(sock, transport)
    protocol.write(b"newer")
    clock.advance(0)
    assert sock.sent == [] and transport.written == [b"older", b"newer"]


def test_what_is_gathered_is_bounded_and_goes_before_a_close():
    from esf.server._protocol import WRITE_BEHIND_MAX

    sock, transport = _Socket(), _Transport()
    protocol, clock = behind_protocol(sock, transport)
    chunk = b"x" * (WRITE_BEHIND_MAX // 4)
    for _ in range(4):
        protocol.write(chunk)
    # Past the bound: sent at once, not held until the turn ends.
    assert sock.sent == [chunk * 4]
    protocol.write(b"last words")
    protocol.close()
    assert sock.sent[-1] == b"last words" and transport.lost
    clock.advance(0)  # (nothing more, nothing twice)
    assert len(sock.sent) == 2
