"""
What an application's own tests need from esf, in memory and against a
real C{twistd esf}: an offline store that the engine opens itself, the
engine's clock, the pytest fixtures that pass them, a client whose
C{logoff()} fires once the server has the Logoff, and L{esf.testing}'s
real-process helper with C{--port-file}.
"""

from __future__ import annotations

import re
import signal
import textwrap
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from zope.interface import implementer

from esf import (
    ClientEngine,
    DisconnectedType,
    ServerEngine,
    ServerService,
    engine_for,
)
from esf.interfaces import ICustomizeHandler
from esf.offline import MemoryOfflineStore, SQLiteOfflineStore
from esf.testing import LogCapture, MemoryServer, TwistdFailed, TwistdServer, record_events

pytest_plugins = ["pytester"]


# -- the offline store: the engine opens and closes it -------------------------------------------


def test_the_first_connection_opens_the_store_and_stop_closes_it():
    store = MemoryOfflineStore()
    server = MemoryServer(offline_store=store)
    assert not store.started
    alice = server.logged_on("alice")
    assert store.started
    server.result(alice.send_certainly("bob", 1, b"kept"))
    assert server.result(store.counts("bob"))[0] == 1
    server.close()
    assert not store.started


def test_an_engine_built_by_hand_opens_its_store_as_it_starts():
    store = MemoryOfflineStore()
    engine = ServerEngine(clock=task.Clock(), offline_store=store)
    engine.start()
    assert store.started
    engine.start()  # once
    d = engine.stop()
    assert d.called and not store.started


def test_a_store_that_cannot_be_opened_stops_the_start(tmp_path):
    (tmp_path / "bad.db").write_bytes(b"not a database at all" * 100)
    engine = engine_for(
        clock=task.Clock(), offline_store=SQLiteOfflineStore(str(tmp_path / "bad.db"))
    )
    from esf.offline import OfflineStoreError

    with pytest.raises(OfflineStoreError, match=r"bad\.db"):
        engine.start()


@pytest_twisted.ensureDeferred
async def test_engine_for_with_a_sqlite_store_keeps_messages_as_embedded(tmp_path):
    """
    docs/server.md's embedding, with an offline store: nothing but
    C{engine_for(..., offline_store=store)} and a L{ServerService}; a
    message to an offline user is stored, and the store is closed when the
    service stops.
    """
    from twisted.internet import reactor

    store = SQLiteOfflineStore(str(tmp_path / "offline.db"))
    engine = engine_for(clock=reactor, offline_store=store)
    service = ServerService(engine, TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
    service.startService()
    try:
        port = service.port.getHost().port
        alice = ClientEngine(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port), "alice", clock=reactor
        )
        await alice.logon()
        await alice.send_certainly("bob", 1, b"while you were out")  # Ack: stored
        assert await store.counts("bob") == (1, len(b"while you were out") + 36 + 4)
        await alice.close()
    finally:
        await service.stopService()
    assert store.pool is None


# -- the engine's clock -----------------------------------------------------------------------------


@implementer(ICustomizeHandler)
class SlowAnswers:
    """
    Answers each query a second later, on the engine's clock (set by
    L{IEngineAware.initialize}).
    """

    def __init__(self):
        self.engine = None

    def handle_information(self, user_id, client_type, information_type, payload):
        pass

    def handle_query(self, user_id, client_type, information_type, payload):
        return task.deferLater(self.engine.clock, 1.0, payload.upper)


def test_engine_clock_is_the_memory_servers_clock():
    handler = SlowAnswers()
    server = MemoryServer(handler)
    handler.engine = server.engine
    assert server.engine.clock is server.clock
    alice = server.logged_on("alice")
    d = alice.query("_0", 1, b"later")
    server.pump()
    assert not d.called
    server.advance(1)
    assert server.result(d) == b"LATER"
    server.close()


# -- logoff fires once the server has the Logoff -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_logoff_fires_once_the_server_has_ended_the_session():
    """
    Over TCP, with the server reading nothing for a while: C{logoff()}
    fires only once the server has read the Logoff and ended the session
    C{LOGGED_OFF}, so that a server stopped right after sees no session
    left to end with C{SERVER_SHUTDOWN}.
    """
    from twisted.internet import reactor

    engine = ServerEngine(clock=reactor)
    ended = record_events(engine.user_manager, "device_disconnected")
    service = ServerService(engine, TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
    service.startService()
    resume = None
    try:
        port = service.port.getHost().port
        alice = ClientEngine(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port), "alice", clock=reactor
        )
        await alice.logon()
        [session] = engine.sessions
        session.channel.pause_reading()
        resume = reactor.callLater(0.3, session.channel.resume_reading)
        when_fired = []
        d = alice.logoff()
        d.addCallback(
            lambda _: when_fired.append([why for _, why in ended.of("device_disconnected")])
        )
        await d
        assert when_fired == [[DisconnectedType.LOGGED_OFF]]
    finally:
        if resume is not None and resume.active():
            resume.cancel()
            session.channel.resume_reading()
        await service.stopService()


def test_logoff_to_a_server_that_never_reads_it_gives_up_after_the_request_timeout():
    server = MemoryServer()
    alice = server.logged_on("alice", request_timeout=20)
    events = record_events(alice, "session_ended", "connection_interrupted")
    server.connection(alice).freeze()
    d = alice.logoff()
    server.advance(19)
    assert not d.called
    server.advance(2)
    assert server.result(d) is None
    assert [e.reason for (e,) in events.of("session_ended")] == [DisconnectedType.LOGGED_OFF]
    assert events.of("connection_interrupted") == []
    server.advance(120)
    assert server.attempts == 1  # no reconnect
    server.close()


def test_logoff_in_memory_ends_the_session_logged_off_and_does_not_reconnect():
    server = MemoryServer()
    alice = server.logged_on("alice")
    with LogCapture() as logs:
        server.result(alice.logoff())
    [ended] = logs.esf_events("session_ended")
    assert ended["reason"] == "LOGGED_OFF"
    server.advance(120)
    assert server.attempts == 1
    server.close()


# -- a real twistd esf: TwistdServer and --port-file ---------------------------------------------

pytestmark_e2e = pytest.mark.e2e

HANG = """
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from zope.interface import implementer
from esf.interfaces import IEngineAware


@implementer(IEngineAware)
class Hang:
    def initialize(self, engine):
        reactor.addSystemEventTrigger("before", "shutdown", Deferred)


hang = Hang()
"""


def _connects(port):
    import socket

    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    return True


@pytestmark_e2e
def test_port_file_names_every_listener_and_stop_is_clean(tmp_path):
    server = TwistdServer(
        [
            "--websocket", "tcp:0:interface=127.0.0.1",
            "--websocket", "tcp:0:interface=127.0.0.1",
            "--metrics", "tcp:0:interface=127.0.0.1",
            "--admin-api", "tcp:0:interface=127.0.0.1",
        ],
        directory=tmp_path,
    )  # fmt: skip
    server.start()
    try:
        ports = server.ports
        assert ports["pid"] == server.process.pid
        assert set(ports) == {"pid", "esf", "websocket", "metrics", "admin-api"}
        assert [len(ports[k]) for k in ("esf", "websocket", "metrics", "admin-api")] == [
            1,
            2,
            1,
            1,
        ]
        assert server.port == ports["esf"][0]["port"] > 0
        numbers = [
            a["port"] for k in ("esf", "websocket", "metrics", "admin-api") for a in ports[k]
        ]
        assert len(set(numbers)) == 5
        for address in (a for k in ("esf", "websocket", "metrics", "admin-api") for a in ports[k]):
            assert address["host"] == "127.0.0.1" and _connects(address["port"])
    finally:
        code = server.stop()
    assert code == -signal.SIGTERM  # twistd re-raises it: clean
    assert not (tmp_path / "ports.json").exists()
    assert "session" not in server.log() or "Traceback" not in server.log()


@pytestmark_e2e
def test_a_server_that_cannot_start_fails_with_its_log():
    server = TwistdServer(["--relogon-mode", "bogus"])
    with pytest.raises(TwistdFailed, match=r"(?s)exited with 1 as it started.*relogon-mode"):
        server.start()
    assert server.stop() == 1  # already over: nothing more to say
    assert not server.directory.exists()  # its own temporary directory is removed


@pytestmark_e2e
def test_a_server_that_does_not_stop_is_killed_and_reported(tmp_path):
    (tmp_path / "hang.py").write_text(HANG)
    server = TwistdServer(["--handler", "hang:hang"], python_path=[tmp_path], stop_timeout=1)
    server.start()
    with pytest.raises(TwistdFailed, match="did not stop within 1 s of SIGTERM"):
        server.stop()
    assert server.returncode == -signal.SIGKILL


@pytestmark_e2e
def test_the_web_demo_logs_its_address(tmp_path):
    server = TwistdServer(["--websocket", "tcp:0:interface=127.0.0.1", "--web-demo"])
    with server:
        url = f"http://127.0.0.1:{server.ports['websocket'][0]['port']}/"
        _wait_for(lambda: f"the web demo is at {url}" in server.log(), server)


def _wait_for(condition, server, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)


@pytestmark_e2e
@pytest_twisted.ensureDeferred
async def test_start_and_stop_on_the_reactor_with_a_client_that_logs_off(tmp_path):
    """
    The Deferred API, with a client on the same reactor: after
    C{await logoff()} and a stop, the server has logged the session
    C{LOGGED_OFF}, and a relative C{--offline} file is made in the
    server's directory, not in the checkout.
    """
    from twisted.internet import reactor

    server = TwistdServer(["--offline", "sqlite:offline.db"], directory=tmp_path)
    await server.start_deferred()
    try:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
        alice = ClientEngine(endpoint, "alice", clock=reactor)
        await alice.logon()
        await alice.send_certainly("bob", 1, b"kept")
        await alice.logoff()
    finally:
        assert await server.stop_deferred() == -signal.SIGTERM
    log = server.log()
    assert re.search(r"session ended: alice/\d+ from .*: LOGGED_OFF", log), log
    assert "SERVER_SHUTDOWN" not in log, log
    assert (tmp_path / "offline.db").exists()


def test_port_file_must_be_in_a_directory(tmp_path):
    from twisted.python import usage

    from esf.tap import Options

    with pytest.raises(usage.UsageError, match=r"--port-file: .*missing is not a directory"):
        Options().parseOptions(["--port-file", str(tmp_path / "missing" / "ports.json")])


# -- the pytest plugin: the offline store and twistd fixtures --------------------------------------


@pytest.mark.e2e
def test_plugin_offline_store_and_twistd_fixtures(pytester, monkeypatch):
    # The esf under test, not an installed one.
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    pytester.makepyfile(
        textwrap.dedent(
            """
            import socket

            import pytest

            from esf.offline import MemoryOfflineStore

            pytest_plugins = ["esf.pytest_plugin"]


            @pytest.fixture
            def esf_offline_store():
                return MemoryOfflineStore()


            def test_store(esf_server, esf_offline_store):
                alice = esf_server.logged_on("alice")
                esf_server.result(alice.send_certainly("bob", 1, b"kept"))
                bob = esf_server.client("bob")
                got = []
                bob.information_received.subscribe(lambda *a: got.append(a[-1]))
                esf_server.result(bob.logon())
                esf_server.pump()
                assert got == [b"kept"]


            def test_twistd(esf_twistd, tmp_path):
                server = esf_twistd("--offline", "sqlite:offline.db")
                socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
                assert server.directory.parent == tmp_path
                assert (server.directory / "offline.db").exists()
            """
        )
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


# -- the README's check that the server answers ---------------------------------------------------


@pytestmark_e2e
def test_readme_ping_checks_the_quick_start_server():
    import subprocess
    import sys

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    [line] = [line for line in readme.splitlines() if "esf-client" in line and "ping" in line]
    command = line.split("&& ", 1)[1].split()
    assert command[0] == "esf-client" and command[-1] == "ping"
    with TwistdServer(["--port", "tcp:0:interface=127.0.0.1"], port=None) as server:
        run = subprocess.run(
            [sys.executable, "-m", "esf.client.cli", "--port", str(server.port), *command[1:]],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert run.returncode == 0, run.stderr
    assert re.fullmatch(r"_0: [\d.]+ ms\n", run.stdout), run.stdout


# -- smaller things ---------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def test_sqlite_files_are_ignored_by_git():
    import shutil
    import subprocess

    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for name in ("offline.db", "offline.db-wal", "offline.db-shm", "data/offline.db"):
        check = subprocess.run(["git", "check-ignore", "-q", name], cwd=REPO)
        assert check.returncode == 0, f"{name} is not ignored"


def test_client_md_says_ending_is_exported():
    import esf

    text = (REPO / "docs" / "client.md").read_text()
    assert "`from esf import Ending, EndingKind`" in text
    assert "until they are exported" not in text
    assert {"Ending", "EndingKind"} <= set(esf.__all__)


# -- docs/server.md's examples ------------------------------------------------------------------


def _server_md_blocks():
    import re as _re

    return _re.findall(r"```(\w+)\n(.*?)```", (REPO / "docs" / "server.md").read_text(), _re.S)


def test_server_md_embedding_with_an_offline_store_runs(tmp_path):
    """
    The embedding example with an offline store runs as printed, in a
    directory of its own, and prints what the page shows.
    """
    import os
    import subprocess
    import sys

    blocks = _server_md_blocks()
    [n] = [
        i for i, (lang, code) in enumerate(blocks) if 'SQLiteOfflineStore("offline.db")' in code
    ]
    code, (language, expected) = blocks[n][1], blocks[n + 1]
    assert language == "text"
    script = tmp_path / "embed.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected
    assert (tmp_path / "offline.db").exists()


@pytest.mark.e2e
def test_server_md_port_file_is_what_the_server_writes(tmp_path):
    import json

    [shown] = [json.loads(code) for lang, code in _server_md_blocks() if lang == "json"]
    with TwistdServer(["--websocket", "tcp:0:interface=127.0.0.1"], directory=tmp_path):
        written = json.loads((tmp_path / "ports.json").read_text())
    assert set(written) == set(shown)
    for kind in ("esf", "websocket"):
        assert [set(a) for a in written[kind]] == [set(a) for a in shown[kind]]


@pytestmark_e2e
def test_a_killed_server_keeps_what_it_acknowledged(tmp_path):
    """
    C{kill()} is a crash, which C{stop()} does not report; a server started
    again on the same directory delivers what the first acknowledged.
    """
    import struct

    import rawclient as rc

    send_certainly, ack = 205, 206
    first = TwistdServer(["--offline", "sqlite:offline.db"], directory=tmp_path)
    first.start()
    alice = rc.connect(first.port)
    try:
        assert alice.logon("alice", "x", 0)["result"] == 0
        alice.send(send_certainly, struct.pack("<i", 1) + b"kept", dest="bob", msg_id=7)
        header, _ = alice.recv_until(ack)
        assert header["message_id"] == 7
    finally:
        alice.close()
    assert first.kill() == -signal.SIGKILL
    assert first.stop() == -signal.SIGKILL  # no failure: the test killed it
    with TwistdServer(["--offline", "sqlite:offline.db"], directory=tmp_path) as second:
        bob = rc.connect(second.port)
        try:
            assert bob.logon("bob", "x", 0)["result"] == 0
            header, body = bob.recv_until(send_certainly)
            assert header["user_id"] == "alice" and body.endswith(b"kept")
        finally:
            bob.close()
