"""
The example programs in docs/examples still work with the current API.
"""

import importlib.util
import os
import re
import subprocess
import sys
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


# -- docs/testing.md: the support desk's tests, under trial and under pytest ------------------

EXAMPLES = EXAMPLE.parent


def _run_example(command, cwd):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(EXAMPLES)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    return subprocess.run(
        [sys.executable, *command], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_support_desk_under_trial(tmp_path):
    """
    The trial example of docs/testing.md passes under trial (run from a
    scratch directory: trial leaves its _trial_temp there).
    """
    result = _run_example(["-m", "twisted.trial", "test_support_desk_trial"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASSED (successes=8)" in result.stdout, result.stdout


def test_support_desk_under_pytest_twisted():
    """
    The pytest example of docs/testing.md passes with the esf plugin and
    pytest-twisted.
    """
    result = _run_example(
        [
            "-m", "pytest", "-p", "no:cacheprovider",
            str(EXAMPLES / "test_support_desk_pytest.py"),
        ],
        EXAMPLES.parent.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b9 passed\b", result.stdout), result.stdout
    assert "warning" not in result.stdout.lower(), result.stdout
