"""
The example programs in docs/examples still work with the current API.
"""

import importlib.util
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from zope.interface.verify import verifyObject

from esf import DisconnectedType, LogonRefused, ServerService, UserData
from esf.interfaces import IBasicHandler, IEngineAware

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "server_app.py"


@pytest.fixture(scope="module")
def server_app():
    spec = importlib.util.spec_from_file_location("server_app", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_handler_provides_its_interfaces(server_app):
    assert verifyObject(IBasicHandler, server_app.handler)
    assert verifyObject(IEngineAware, server_app.handler)


def test_verify_user_and_can_kick_out(server_app):
    app = server_app.handler
    assert app.verify_user("", "alice", "pa", 0, "127.0.0.1:1") is True
    assert app.verify_user("", "alice", "wrong", 0, "127.0.0.1:1") is False
    with pytest.raises(LogonRefused) as refused:
        app.verify_user("", "mallory", "x", 0, "127.0.0.1:1")
    assert "mallory" in refused.value.cause
    assert app.can_kick_out("carol", "bob", None)
    assert not app.can_kick_out("bob", "alice", None)


def test_make_service_subscribes_to_events(server_app):
    reactor = MemoryReactorClock()
    service = server_app.make_service(reactor, "tcp:0:interface=127.0.0.1")
    assert isinstance(service, ServerService)
    users = service.engine.user_manager
    alice = UserData("alice", 0, "127.0.0.1:5", 0.0)
    with capturedLogs() as events:
        users.user_connected.fire(alice)
        users.user_disconnected.fire(alice, DisconnectedType.LOGGED_OFF)
    texts = [e["log_format"].format(**e) for e in events if e.get("log_namespace") == "server_app"]
    assert texts == [
        "alice is online (device 0, from 127.0.0.1:5)",
        "alice is offline: LOGGED_OFF",
    ]
