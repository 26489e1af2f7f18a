"""
The support desk (support_desk.py) tested with pytest and pytest-twisted:

    PYTHONPATH=docs/examples python -m pytest -p no:cacheprovider docs/examples/test_support_desk_pytest.py

A project puts the C{pytest_plugins} line and the fixtures that override
C{esf_applications} and C{esf_config} in its C{conftest.py}; they are here
to keep the example in one file.
"""

import pytest
import pytest_twisted
from support_desk import AGENTS, ASK, CHAT, NEW_TICKET, SupportDesk

from esf import DisconnectedType, ErrorCode, LogonFailed, RequestError, ServerConfig
from esf.testing import record_events

pytest_plugins = ["esf.pytest_plugin"]


@pytest.fixture
def desk():
    return SupportDesk(
        {"alice": "pa", "bob": "pb", "ann": "agent-a", "art": "agent-b"},
        agents={"ann", "art"},
        banned={"mallory"},
    )


@pytest.fixture
def esf_applications(desk):
    return [desk]


@pytest.fixture
def esf_config():
    return ServerConfig(heartbeat_interval=10, heartbeat_timeout=30)


@pytest.fixture(autouse=True)
def no_logged_errors(esf_logged_errors):
    """
    Every test fails if an error was logged, as under trial.
    """
    return esf_logged_errors


def test_banned_user_is_refused_with_a_cause(esf_server):
    mallory = esf_server.client("mallory", "anything")
    error = esf_server.failure(mallory.logon(), LogonFailed)
    assert error.cause == "mallory is banned"


def test_wrong_password(esf_server):
    error = esf_server.failure(esf_server.client("alice", "nope").logon(), LogonFailed)
    assert error.cause == "invalid user ID or password"


def test_a_question_opens_a_ticket_and_tells_the_agents(esf_server, desk):
    ann = esf_server.logged_on("ann", "agent-a")
    told = record_events(ann, "information_received")
    alice = esf_server.logged_on("alice", "pa")
    assert esf_server.result(alice.query("_0", ASK, b"my printer is on fire")) == b"ticket 1"
    assert desk.tickets == [("alice", "my printer is on fire")]
    [(sender, _, kind, payload)] = told.of("information_received")
    assert (sender, kind, payload) == ("_0", NEW_TICKET, b"1: alice: my printer is on fire")


def test_an_empty_question_is_a_bad_request(esf_server):
    alice = esf_server.logged_on("alice", "pa")
    error = esf_server.failure(alice.query("_0", ASK, b"  "), RequestError)
    assert (error.code, error.text) == (ErrorCode.BAD_REQUEST, "ask a question")


def test_chat(esf_server):
    alice = esf_server.logged_on("alice", "pa")
    ann = esf_server.logged_on("ann", "agent-a")
    heard = record_events(ann, "information_received")
    alice.send("ann", CHAT, b"hello")
    esf_server.pump()
    assert [args[2:] for args in heard.of("information_received")] == [(CHAT, b"hello")]


def test_agents_broadcast_to_each_other_and_customers_may_not(esf_server):
    ann = esf_server.logged_on("ann", "agent-a")
    art = esf_server.logged_on("art", "agent-b")
    alice = esf_server.logged_on("alice", "pa")
    heard = record_events(art, "broadcast_received")
    esf_server.result(ann.broadcast(AGENTS, CHAT, b"I take ticket 1"))
    assert heard.of("broadcast_received") == [("ann", AGENTS, CHAT, b"I take ticket 1")]
    error = esf_server.failure(alice.broadcast(AGENTS, CHAT, b"hi all"), RequestError)
    assert error.code == ErrorCode.NOT_AUTHORIZED


def test_event_log_of_connects_push_outs_and_kicks(esf_server, desk):
    ann = esf_server.logged_on("ann", "agent-a")
    alice = esf_server.logged_on("alice", "pa")
    pushed = record_events(alice, "being_pushed_out")
    alice_again = esf_server.logged_on("alice", "pa", host="192.0.2.7")
    new_address = esf_server.connection(alice_again).address
    assert len(pushed.of("being_pushed_out")) == 1
    kicked = record_events(alice_again, "being_kicked_out")
    esf_server.result(ann.kick_out("alice", "rude"))
    assert kicked.of("being_kicked_out") == [("ann", "rude")]
    assert desk.events == [
        ("connect", "ann"),
        ("connect", "alice"),
        ("push_out", "alice", new_address),
        ("disconnect", "alice", "BEING_PUSHED_OUT"),
        ("connect", "alice"),
        ("kick", "alice", "ann", "rude"),
        ("disconnect", "alice", "BEING_KICKED_OUT"),
    ]


def test_a_vanished_customer_is_dropped_after_the_heartbeat_timeout(esf_server, esf_logs, desk):
    alice = esf_server.logged_on("alice", "pa")
    users = record_events(esf_server.engine.user_manager, "device_disconnected")
    esf_server.connection(alice).freeze()  # nothing moves, nobody is told
    alice.close()
    esf_server.advance(29)
    assert users.events == []
    esf_server.advance(20)
    [(user, why)] = users.of("device_disconnected")
    assert (user.user_id, why) == ("alice", DisconnectedType.HEARTBEAT_TIMEOUT)
    [ended] = esf_logs.esf_events("session_ended")
    assert ended["reason"] == "HEARTBEAT_TIMEOUT"
    assert ("disconnect", "alice", "HEARTBEAT_TIMEOUT") in desk.events


@pytest_twisted.ensureDeferred
async def test_as_a_coroutine(esf_server):
    """
    Under pytest-twisted a test may be a coroutine: pump, then await what
    the pump made fire.
    """
    alice = esf_server.client("alice", "pa")
    logon = alice.logon()
    esf_server.pump()
    response = await logon
    assert response.succeeded
    asked = alice.query("_0", ASK, b"where is my parcel?")
    esf_server.pump()
    assert await asked == b"ticket 1"
