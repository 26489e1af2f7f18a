"""
The example programs in docs/examples still work with the current API.
"""

import ast
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
from esf.testing import MemoryServer
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
    # The esf under test (the checkout), not an installed one.
    env["PYTHONPATH"] = os.pathsep.join(
        [str(EXAMPLES), str(EXAMPLES.parent.parent)]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
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


@pytest.mark.e2e
def test_support_desk_against_twistd_under_pytest(tmp_path):
    """
    The end-to-end pytest example of docs/testing.md: a real twistd esf
    per test, from the esf_twistd fixture.
    """
    result = _run_example(
        [
            "-m", "pytest", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t"),
            str(EXAMPLES / "test_support_desk_twistd.py"),
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b4 passed\b", result.stdout), result.stdout


@pytest.mark.e2e
def test_support_desk_against_twistd_under_trial(tmp_path):
    result = _run_example(["-m", "twisted.trial", "test_support_desk_twistd_trial"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASSED (successes=1)" in result.stdout, result.stdout


# -- every Python block of docs/testing.md is run ---------------------------------------------

#: The example files the tests above run.
RUN_EXAMPLES = [
    "test_support_desk_trial.py",
    "test_support_desk_pytest.py",
    "test_support_desk_twistd.py",
    "test_support_desk_twistd_trial.py",
]


def _imports(text):
    """
    The C{(module, name)} pairs a file imports with C{from ... import}.
    """
    return {
        (node.module, alias.name)
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }


def _is_excerpt(block, text):
    """
    Whether every line of C{block} is a line of C{text}, in the same order,
    or a C{from ... import} of names C{text} imports from that module.
    """
    lines = [line.rstrip() for line in text.splitlines()]
    imports = _imports(text)
    at = 0
    for line in (line.rstrip() for line in block.splitlines()):
        if not line:
            continue
        imported = re.fullmatch(r"from (\S+) import (.+)", line)
        if imported and all(
            (imported[1], name.strip()) in imports for name in imported[2].split(",")
        ):
            continue
        try:
            at = lines.index(line, at) + 1
        except ValueError:
            return False
    return True


def test_every_python_block_of_testing_md_runs(monkeypatch):
    """
    Each Python block of docs/testing.md is either an excerpt of an example
    file run above, or runs here as it is written, on its own, with the
    support desk as C{desk}, an in-memory server of it as C{server}, and
    the desk's information types.
    """
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(EXAMPLES), os.environ.get("PYTHONPATH")]))
    )
    import support_desk

    files = {name: (EXAMPLES / name).read_text() for name in RUN_EXAMPLES}
    text = (EXAMPLES.parent / "testing.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    excerpts, ran = [], []
    for n, block in enumerate(blocks):
        if any(_is_excerpt(block, f) for f in files.values()):
            excerpts.append(n)
            continue
        desk = support_desk.SupportDesk(
            {"alice": "pa", "bob": "pb", "ann": "agent-a", "art": "agent-b"},
            agents={"ann", "art"},
            banned={"mallory"},
        )
        server = MemoryServer(desk)
        namespace = {
            "desk": desk,
            "server": server,
            **{k: getattr(support_desk, k) for k in ("ASK", "NEW_TICKET", "CHAT", "AGENTS")},
        }
        try:
            exec(compile(block, f"docs/testing.md, block {n}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"block {n} of docs/testing.md failed:\n{block}") from e
        finally:
            server.close()
        ran.append(n)
    assert len(excerpts) >= 5 and len(ran) >= 5, (excerpts, ran)
