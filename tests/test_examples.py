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
from esf.interfaces import IBasicHandler, IEngineAware
from esf.testing import MemoryServer

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
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            str(EXAMPLES / "test_support_desk_pytest.py"),
        ],
        EXAMPLES.parent.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b9 passed\b", result.stdout), result.stdout
    assert "warning" not in result.stdout.lower(), result.stdout


# -- docs/server.md: a relogon mode per user and device kind (iot_hub.py) ---------------------

SERVER_MD = EXAMPLES.parent / "server.md"


@pytest.fixture(scope="module")
def iot_hub():
    spec = importlib.util.spec_from_file_location("iot_hub", EXAMPLES / "iot_hub.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _excerpt_runs(heading):
    """
    The runs of lines of the first Python block under C{heading} in
    docs/server.md, between its "..." lines.
    """
    text = SERVER_MD.read_text()
    section = text[text.index(heading) :]
    excerpt = section[section.index("```python\n") + len("```python\n") : section.index("\n```\n")]
    return [run.strip("\n") for run in re.split(r"^\s*\.\.\.\n", excerpt, flags=re.M)]


def test_server_md_shows_iot_hub_as_it_is():
    """
    The excerpt of iot_hub.py in docs/server.md is the file's own code: each
    run of lines between the excerpt's "..." lines is in the file as it is.
    """
    runs = _excerpt_runs("### Per user and device kind: `IRelogonPolicy`")
    assert len(runs) == 3 and "def relogon_mode" in runs[-1]
    source = (EXAMPLES / "iot_hub.py").read_text()
    for run in runs:
        assert run in source, run


def test_iot_hub_gives_each_account_its_relogon_mode(iot_hub):
    """
    The example through real clients: an operator's second console is
    refused HadLoggedOn and logged, a device's second connection pushes the
    first out, an operator's browser tab replaces the older tab.
    """
    from esf import ClientType, LogonFailed, LogonResult
    from esf.interfaces import IRelogonPolicy
    from esf.testing import MemoryServer

    hub = iot_hub.handler
    for interface in (IBasicHandler, IRelogonPolicy, IEngineAware):
        assert verifyObject(interface, hub)
    server = MemoryServer(hub)
    try:
        server.logged_on("op-ann", "pa", ClientType.DOTNET)
        with capturedLogs() as events:
            second = server.client("op-ann", "pa", ClientType.DOTNET, host="10.0.0.2")
            error = server.failure(second.logon(), LogonFailed)
        assert error.result == LogonResult.HAD_LOGGED_ON
        warned = [e for e in events if e.get("log_namespace") == "iot_hub"]
        [line] = [e["log_format"].format(**e) for e in warned]
        assert line.startswith("op-ann is already logged on; refused a second logon from 10.0.0.2")

        first_tab = server.logged_on("op-ann", "pa", ClientType.WEBSOCKET)
        server.logged_on("op-ann", "pa", ClientType.WEBSOCKET)
        assert not first_tab.logged_on

        first_dev = server.logged_on("dev-7", "t7")
        server.logged_on("dev-7", "t7")
        assert not first_dev.logged_on

        error = server.failure(server.client("dev-8", "wrong").logon(), LogonFailed)
        assert error.result == LogonResult.FAILED
        assert server.engine.user_manager.get_all_login_devices("op-ann") == [
            ClientType.DOTNET,
            ClientType.WEBSOCKET,
        ]
    finally:
        server.close()


def test_iot_hub_loads_with_twistd_handler_option(monkeypatch):
    """
    `twistd esf --handler iot_hub:handler`, as docs/server.md runs it: the
    object is the engine's relogon policy (and its basic handler).
    """
    from esf.tap import Options, makeService

    monkeypatch.syspath_prepend(str(EXAMPLES))
    options = Options()
    options.parseOptions(["--port", "tcp:0:interface=127.0.0.1", "--handler", "iot_hub:handler"])
    engine = makeService(options).engine
    import iot_hub as loaded

    assert engine.relogon_policy is loaded.handler
    assert engine.handler is loaded.handler
    assert engine.relay_gate.policy is loaded.handler


def test_server_md_shows_the_relay_policy_as_it_is():
    """
    The relay policy's excerpt of iot_hub.py in docs/server.md is the
    file's own code.
    """
    runs = _excerpt_runs("## The relay policy: `IRelayPolicy`")
    assert len(runs) == 2 and "def may_relay" in runs[-1]
    source = (EXAMPLES / "iot_hub.py").read_text()
    for run in runs:
        assert run in source, run


def test_iot_hub_devices_talk_to_operators_only(iot_hub):
    """
    The example's relay policy through real clients: a device's request
    to another device fails with NotAuthorized and the hub's reason, its
    Send is dropped; to an operator, and from one, messages go.
    """
    from esf import ErrorCode, RequestError
    from esf.interfaces import IRelayPolicy

    hub = iot_hub.Hub()
    assert verifyObject(IRelayPolicy, hub)
    server = MemoryServer(hub)
    try:
        dev7 = server.logged_on("dev-7", "t7")
        dev8 = server.logged_on("dev-8", "t8")
        op = server.logged_on("op-ann", "pa")
        got = []
        for client in (dev8, op):
            client.information_received.subscribe(lambda *args, got=got: got.append(args[:3]))
        error = server.failure(dev7.send_certainly("dev-8", 1, b"hi"), RequestError)
        assert (error.code, error.text) == (
            ErrorCode.NOT_AUTHORIZED,
            "devices may talk to operators only",
        )
        dev7.send("dev-8", 2, b"psst")
        server.result(dev7.send_certainly("op-ann", 3, b"report"))
        server.result(op.send_certainly("dev-8", 4, b"reboot"))
        server.pump()
        assert [information_type for _, _, information_type in got] == [3, 4]
        assert server.engine.counters["relay_refused"] == 2
    finally:
        server.close()


@pytest.mark.e2e
def test_support_desk_against_twistd_under_pytest(tmp_path):
    """
    The end-to-end pytest example of docs/testing.md: a real twistd esf
    per test, from the esf_twistd fixture.
    """
    result = _run_example(
        [
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "--basetemp",
            str(tmp_path / "t"),
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
