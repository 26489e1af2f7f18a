"""
What applications ask of the engine and the client that the engine refactor
delivers: each test fails today and is marked so; the refactor flips them
(remove the mark once a test passes: strict marks fail on an unexpected
pass).

  - A client's handler that raises L{esf.RequestError} answers with that
    error as it is and logs nothing, as the server's handlers do.
  - A client that is pushed out or kicked fires C{connection_interrupted}
    (docs/client.md: "the connection dropped; a reconnect follows unless
    the session ended for good"), with the reason at hand.
"""

from __future__ import annotations

import pytest
from zope.interface import implementer

from esf import DisconnectedType, Ending, EndingKind, ErrorCode, RequestError
from esf.interfaces import ICustomizeHandler
from esf.testing import LoggedErrors, MemoryServer, record_events


@pytest.fixture
def server():
    server = MemoryServer()
    yield server
    server.close()


@pytest.fixture
def logged_errors():
    errors = LoggedErrors().start()
    try:
        yield errors
    finally:
        errors.stop()


@implementer(ICustomizeHandler)
class Refuses:
    def handle_information(self, user_id, client_type, information_type, payload):
        raise RequestError(ErrorCode.NOT_AUTHORIZED, "not from you")

    def handle_query(self, user_id, client_type, information_type, payload):
        raise RequestError(ErrorCode.BAD_REQUEST, "ask properly")


def test_client_handler_request_error_goes_back_as_it_is(server, logged_errors):
    server.logged_on("bob", handler=Refuses())
    alice = server.logged_on("alice")
    error = server.failure(alice.query("bob", 1, b"?"), RequestError)
    assert (error.code, error.text) == (ErrorCode.BAD_REQUEST, "ask properly")
    error = server.failure(alice.send_certainly("bob", 1, b"!"), RequestError)
    assert (error.code, error.text) == (ErrorCode.NOT_AUTHORIZED, "not from you")


def test_client_handler_request_error_is_not_logged_as_an_error(server, logged_errors):
    server.logged_on("bob", handler=Refuses())
    alice = server.logged_on("alice")
    server.failure(alice.query("bob", 1, b"?"), RequestError)
    server.failure(alice.send_certainly("bob", 1, b"!"), RequestError)
    logged_errors.check()


@pytest.mark.parametrize(
    "end, notice, reason, kind",
    [
        (
            lambda server: server.logged_on("alice", host="192.0.2.9"),
            "being_pushed_out",
            DisconnectedType.BEING_PUSHED_OUT,
            EndingKind.PUSHED_OUT,
        ),
        (
            lambda server: server.engine.kick_out("alice", "bye"),
            "being_kicked_out",
            DisconnectedType.BEING_KICKED_OUT,
            EndingKind.KICKED,
        ),
    ],
)
def test_pushed_out_or_kicked_ends_the_session_with_its_reason(server, end, notice, reason, kind):
    alice = server.logged_on("alice")
    events = record_events(alice)
    end(server)
    server.advance(60)
    names = events.names()
    assert names.count("session_ended") == 1
    assert names.index(notice) < names.index("session_ended")
    assert "connection_interrupted" not in names
    assert "connection_rebuild_start" not in names
    ((ending,),) = events.of("session_ended")
    assert isinstance(ending, Ending)
    assert (ending.kind, ending.reason) == (kind, reason)
    assert not alice.logged_on
