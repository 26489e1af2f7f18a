"""
Tests of the relogon mode per user and device kind: an application that
provides L{IRelogonPolicy} decides what a second logon of a device does,
the server's C{relogon_mode} deciding for everyone else.  The same across
two nodes is in test_cluster_engine.py and test_cluster.py.
"""

from __future__ import annotations

import pytest
from _helpers import Client, connect, logon_reply, record_events
from twisted.internet import task
from twisted.internet.defer import Deferred, fail
from twisted.logger import globalLogPublisher
from zope.interface import implementer
from zope.interface.verify import verifyObject

from esf import (
    AcceptAll,
    ClientType,
    LogonFailed,
    LogonResult,
    RelogonMode,
    ServerConfig,
    engine_for,
)
from esf import (
    DisconnectedType as D,
)
from esf import (
    MessageType as T,
)
from esf.interfaces import IRelogonPolicy
from esf.operations._metrics import ServerMetrics, make_registry
from esf.server._application import Applications
from esf.server._policy import PresenceUnavailable
from esf.server._presence import Claim, LocalPresence
from esf.testing import MemoryServer


@implementer(IRelogonPolicy)
class Hub:
    """
    Devices (C{dev-...}) replace their old sessions, operators (C{op-...})
    keep theirs, except in a browser tab; records what it was asked.
    """

    def __init__(self):
        self.asked: list[tuple[str, int]] = []

    def relogon_mode(self, user_id, client_type):
        self.asked.append((user_id, client_type))
        if user_id.startswith("op-") and client_type != ClientType.WEBSOCKET:
            return RelogonMode.IGNORE_NEW
        return RelogonMode.REPLACE_OLD


@implementer(IRelogonPolicy)
class Answers:
    """
    A relogon policy that answers (or raises) C{answer}.
    """

    def __init__(self, answer):
        self.answer = answer

    def relogon_mode(self, user_id, client_type):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def hub_engine(*applications, **settings):
    engine = engine_for(*applications, config=ServerConfig(**settings), clock=task.Clock())
    engine.start()
    return engine


def test_hub_provides_the_interface():
    assert verifyObject(IRelogonPolicy, Hub())


@pytest.mark.parametrize("server_mode", [RelogonMode.REPLACE_OLD, RelogonMode.IGNORE_NEW])
def test_each_user_gets_the_mode_the_application_says(logs, server_mode):
    """
    Whatever the server's own mode, a device replaces its old session and
    an operator's second logon is refused with HadLoggedOn: the user
    manager's new_connection_ignored fires and the metrics count it.
    """
    hub = Hub()
    engine = hub_engine(hub, relogon_mode=server_mode)
    metrics = ServerMetrics(engine, publisher=globalLogPublisher)
    metrics.start()
    try:
        registry = make_registry(metrics, process=False)
        old_dev = connect(engine, "dev-7", ClientType.OTHERS)
        old_op = connect(engine, "op-ann", ClientType.DOTNET)
        events = record_events(engine.user_manager)

        new_dev = connect(engine, "dev-7", ClientType.OTHERS, host="10.0.0.2")
        assert [r.message_type for r in old_dev.take()] == [
            T.BEING_PUSHED_OUT_NOTIFY,
            T.DISCONNECT_NOTICE,
        ]
        assert old_dev.closing and not new_dev.closing

        new_op = Client(engine, "10.0.0.3")
        new_op.logon("op-ann", ClientType.DOTNET)
        replies = new_op.take()
        assert [r.message_type for r in replies] == [T.LOGON, T.DISCONNECT_NOTICE]
        assert replies[0].body.result == LogonResult.HAD_LOGGED_ON
        assert old_op.address in replies[0].body.failure_cause
        assert replies[1].body.reason == D.NEW_CONNECTION_IGNORED
        assert new_op.closing
        assert old_op.take() == [] and not old_op.closing

        assert ("new_connection_ignored", "op-ann", ClientType.DOTNET, new_op.address) in events
        assert [e[0] for e in events if e[0] == "device_being_pushed_out"] == [
            "device_being_pushed_out"
        ]
        assert engine.presence.get("op-ann", ClientType.DOTNET).address == old_op.address
        assert engine.presence.get("dev-7", ClientType.OTHERS).address == new_dev.address

        assert registry.get_sample_value("esf_push_outs_total") == 1
        assert registry.get_sample_value("esf_logons_total", {"result": "had_logged_on"}) == 1
        assert (
            registry.get_sample_value(
                "esf_disconnects_total", {"reason": "new_connection_ignored"}
            )
            == 1
        )
    finally:
        metrics.stop()
    # The server's own relogon_mode is unchanged: it is the default.
    assert engine.user_manager.relogon_mode is server_mode


def test_the_mode_is_per_device_kind_too():
    engine = hub_engine(Hub())
    old_tab = connect(engine, "op-ann", ClientType.WEBSOCKET)
    connect(engine, "op-ann", ClientType.WEBSOCKET, host="10.0.0.2")  # replaces the tab
    assert [r.message_type for r in old_tab.take()][-1] == T.DISCONNECT_NOTICE
    assert old_tab.closing


def test_asked_once_per_verified_logon_with_the_device_kind():
    """
    Asked for each logon the application accepted (after verify_user: an
    unauthenticated peer never reaches it), once, with the kind as a
    ClientType; not for a refused logon.
    """

    class Passwords(AcceptAll):
        def verify_user(self, system_token, user_id, password, client_type, address):
            return password == "pw"

    hub = Hub()
    engine = hub_engine(Passwords(), hub)
    connect(engine, "dev-7", 5, password="pw")
    Client(engine).logon("dev-8", 5, password="wrong")
    connect(engine, "op-ann", 0, password="pw")
    assert hub.asked == [("dev-7", ClientType.ANDROID), ("op-ann", ClientType.DOTNET)]
    assert all(type(kind) is ClientType for _, kind in hub.asked)


@pytest.mark.parametrize(
    "answer, logged",
    [
        (RuntimeError("the policy table is gone"), "the policy table is gone"),
        ("ignore-new", "not a RelogonMode"),
        (None, "not a RelogonMode"),
    ],
    ids=["raises", "a string", "None"],
)
def test_a_policy_that_fails_refuses_the_logon(logs, answer, logged):
    """
    An exception or an answer that is not a RelogonMode refuses the logon,
    as a verify_user that raises does: logged with its traceback, the
    client sees only a generic cause.  Nothing is claimed.
    """
    engine = hub_engine(Answers(answer))
    client = Client(engine)
    client.logon("dev-7")
    replies = client.take()
    assert [r.message_type for r in replies] == [T.LOGON, T.DISCONNECT_NOTICE]
    assert replies[0].body == logon_reply(engine, LogonResult.FAILED, "logon verification failed")
    assert replies[1].body.reason == D.LOGON_FAILED
    assert not engine.user_manager.is_user_online("dev-7")
    (failure,) = logs.esf("relogon_mode_failed")
    assert logged in str(failure["log_failure"].value)
    assert failure["user_id"] == "dev-7"


class LaggingPresence(LocalPresence):
    """
    A registry whose reads have not seen the holders yet (a cluster node's
    mirror behind Redis), recording every claim's C{replace}.
    """

    def __init__(self):
        super().__init__()
        self.claims: list[tuple[str, bool]] = []

    def get(self, user_id, client_type):
        return None

    def claim(self, handle, replace) -> Deferred[Claim]:
        self.claims.append((handle.user_id, replace))
        return super().claim(handle, replace)


def test_the_mode_travels_with_the_claim(logs):
    """
    When the registry's reads do not show the holder, the claim itself
    settles the logon by the user's mode: an operator's claim leaves the
    holder and is refused with HadLoggedOn (new_connection_ignored fires),
    a device's replaces it.
    """
    presence = LaggingPresence()
    engine = engine_for(Hub(), clock=task.Clock(), presence=presence)
    old_op = connect(engine, "op-ann")
    old_dev = connect(engine, "dev-7")
    events = record_events(engine.user_manager)
    new_op = Client(engine, "10.0.0.2")
    new_op.logon("op-ann")
    assert new_op.take()[0].body.result == LogonResult.HAD_LOGGED_ON
    assert not old_op.closing
    connect(engine, "dev-7", host="10.0.0.3")
    assert old_dev.closing
    assert presence.claims == [
        ("op-ann", False),
        ("dev-7", True),
        ("op-ann", False),
        ("dev-7", True),
    ]
    assert events[0] == ("new_connection_ignored", "op-ann", 0, new_op.address)


class UnreachablePresence(LocalPresence):
    """A shared registry that cannot be reached now (a cluster's Redis down)."""

    def claim(self, handle, replace) -> Deferred[Claim]:
        return fail(PresenceUnavailable("Redis at redis://10.0.0.9:6379/0: Lost connection"))


def test_a_registry_that_cannot_be_reached_refuses_logons_busy_without_a_traceback(logs):
    """
    A logon the shared registry cannot register now is refused C{Busy}
    (clients retry), saying why; an expected state, not a fault: no
    traceback is logged, only the session's end.
    """
    engine = engine_for(Hub(), clock=task.Clock(), presence=UnreachablePresence())
    client = Client(engine)
    client.logon("dev-7")
    reply = client.take()[0]
    assert reply.body.result == LogonResult.BUSY
    assert reply.body.failure_cause == (
        "the cluster cannot register logons now (its Redis did not answer); try later"
    )
    assert logs.failures() == []
    assert len(logs.esf("session_ended")) == 1


# -- how an application provides it ---------------------------------------------------------


def test_one_object_per_role():
    hub = Hub()
    assert Applications.sort([hub]).relogon_policy is hub
    with pytest.raises(ValueError, match="IRelogonPolicy is provided by both"):
        Applications.sort([hub, Hub()])
    with pytest.raises(ValueError, match="IRelogonPolicy"):
        Applications.sort([object()])  # the error names every role


def test_memory_server_takes_the_policy():
    """
    esf.testing's MemoryServer builds its engine with engine_for, so an
    application's tests see the mode it gives, through real clients.
    """
    server = MemoryServer(Hub())
    try:
        server.logged_on("op-ann", client_type=ClientType.DOTNET)
        second = server.client("op-ann", client_type=ClientType.DOTNET)
        error = server.failure(second.logon(), LogonFailed)
        assert error.result == LogonResult.HAD_LOGGED_ON
        first_dev = server.logged_on("dev-7")
        server.logged_on("dev-7")
        assert not first_dev.logged_on
    finally:
        server.close()
