"""
esf.testing itself: the in-memory server and its connections, the event
and log recorders, the pytest plugin, and esf.engine_for, which the
in-memory server builds its engine with.
"""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import pytest
import pytest_twisted
from _helpers import ACCEPT_ALL, ECHO, REFUSE_ALL, ROOMS, Echo, Rooms
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IConsumer, IPushProducer, IStreamClientEndpoint, ITransport
from twisted.logger import ILogObserver, Logger
from zope.interface import implementer
from zope.interface.verify import verifyObject

from esf import (
    ClientType,
    DisconnectedType,
    ErrorCode,
    LogonFailed,
    RequestError,
    ServerConfig,
    ServerEngine,
    ServerService,
    engine_for,
)
from esf.interfaces import IEngineAware
from esf.testing import (
    BUFFER_SIZE,
    LogCapture,
    LoggedErrors,
    MemoryServer,
    doubling_retry_policy,
    record_events,
)
from esf.testing._records import event_names

pytest_plugins = ["pytester"]

DOCS_EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


@pytest.fixture
def server():
    server = MemoryServer(config=ServerConfig(heartbeat_interval=10, heartbeat_timeout=30))
    yield server
    server.close()


# -- the parts provide what they claim ------------------------------------------------------


def test_parts_provide_their_interfaces(server):
    alice = server.logged_on("alice")
    connection = server.connection(alice)
    for transport in (connection.client, connection.server):
        assert verifyObject(ITransport, transport)
        assert verifyObject(IConsumer, transport)
        assert verifyObject(IPushProducer, transport)
    assert verifyObject(IStreamClientEndpoint, server.endpoint())
    assert verifyObject(ILogObserver, LogCapture())


# -- bytes and time -------------------------------------------------------------------------


def test_nothing_moves_until_pumped(server):
    alice = server.client("alice")
    d = alice.logon()
    assert not d.called
    assert server.engine.user_manager.get_online_user_list() == []
    assert server.result(d).succeeded
    assert server.engine.user_manager.get_online_user_list() == ["alice"]


def test_addresses_are_those_the_server_sees(server):
    alice = server.logged_on("alice", host="192.0.2.5")
    bob = server.logged_on("bob", host="2001:db8::1")
    assert server.result(alice.get_my_ipe()) == server.connection(alice).address
    assert server.connection(alice).address.startswith("192.0.2.5:")
    assert server.result(bob.get_my_ipe()).startswith("[2001:db8::1]:")
    data = server.engine.user_manager.get_user_data("alice")
    assert data.address == server.connection(alice).address


def test_advance_runs_each_timer_and_pumps_between(server):
    """
    Heartbeats go out every 10 s and are echoed: a minute of quiet keeps
    the session alive, and the server saw six heartbeats.
    """
    from esf.wire import MessageType

    alice = server.logged_on("alice")
    server.advance(60)
    assert alice.logged_on
    assert server.engine.user_manager.is_user_online("alice")
    beats = [
        f
        for f in server.connection(alice).frames(server.config.wire)
        if f.message_type == MessageType.HEARTBEAT
    ]
    assert len(beats) == 7  # at logon, then at 10, 20, ... 60 s
    assert server.clock.seconds() == 60


def test_result_and_failure_say_what_is_wrong(server):
    d: Deferred = Deferred()
    with pytest.raises(AssertionError, match="has not fired"):
        server.result(d)
    with pytest.raises(AssertionError, match="has not fired"):
        server.failure(d)
    d.callback(5)
    with pytest.raises(AssertionError, match="succeeded with 5"):
        server.failure(d)
    failed: Deferred = Deferred()
    failed.errback(KeyError("k"))
    with pytest.raises(AssertionError, match="not ValueError"):
        server.failure(failed, ValueError)
    raised: Deferred = Deferred()
    raised.errback(KeyError("k"))
    with pytest.raises(KeyError):
        server.result(raised)


# -- freezing and cutting ---------------------------------------------------------------------


def test_frozen_connection_moves_nothing_and_tells_nobody(server):
    alice = server.logged_on("alice")
    bob = server.logged_on("bob")
    heard = record_events(bob, "information_received")
    connection = server.connection(bob)
    connection.freeze()
    alice.send("bob", 1, b"one")
    server.advance(25)
    assert heard.events == []
    assert bob.logged_on and server.engine.user_manager.is_user_online("bob")
    assert connection.server.waiting > 0  # held at the server's end
    connection.thaw()
    server.pump()
    assert heard.of("information_received") == [("alice", ClientType.OTHERS, 1, b"one")]


def test_half_open_the_server_finds_out_by_heartbeat_timeout(server):
    """
    The client closes while the connection is frozen (its FIN is lost):
    the client knows at once, the server only after its heartbeat timeout.
    """
    alice = server.logged_on("alice")
    users = record_events(server.engine.user_manager, "device_disconnected")
    connection = server.connection(alice)
    connection.freeze()
    server.result(alice.close())
    assert connection.client.disconnected and not connection.server.disconnected
    server.advance(29)
    assert users.events == []
    server.advance(10)
    [(user, why)] = users.of("device_disconnected")
    assert (user.user_id, why) == ("alice", DisconnectedType.HEARTBEAT_TIMEOUT)
    # The server's DisconnectNotice cannot get through: its close timeout
    # aborts the connection.
    server.advance(server.config.close_timeout)
    assert connection.closed


def test_half_open_the_client_finds_out_and_reconnects(server):
    """
    A frozen connection seen from the client: the server goes silent, the
    client gives it up after the heartbeat timeout and logs on again over a
    new connection, which pushes the stale session out.
    """
    alice = server.logged_on("alice")
    events = record_events(alice)
    users = record_events(server.engine.user_manager, "device_being_pushed_out")
    first = server.connection(alice)
    first.freeze()
    server.advance(60)
    assert alice.logged_on
    assert server.connection(alice) is not first
    assert events.names()[:3] == [
        "connection_interrupted",
        "connection_rebuild_start",
        "relogon_completed",
    ]
    assert len(users.events) == 1


def test_cut_tells_both_ends(server):
    alice = server.logged_on("alice")
    events = record_events(alice)
    users = record_events(server.engine.user_manager, "device_disconnected")
    connection = server.connection(alice)
    connection.cut()
    assert connection.closed
    [(_user, why)] = users.of("device_disconnected")
    assert why == DisconnectedType.NETWORK_INTERRUPTED
    assert events.names() == ["connection_interrupted", "connection_rebuild_start"]
    assert not alice.logged_on
    server.advance(1)  # doubling_retry_policy(1) == 1 s
    assert alice.logged_on
    assert events.names()[-1] == "relogon_completed"
    assert len(server.connections) == 2


def test_a_reader_that_stops_fills_the_writers_buffer(server):
    """
    Flow control: a frozen reader's bytes pile up at the server's end, its
    producer is paused past 64 KiB; once past half the engine's bound the
    writer is read no further, and the reader's session ends with
    ChannelCacheOverflow when it has not drained within the drain timeout;
    its close cannot get through, so the close timeout aborts it.
    """
    config = ServerConfig(max_output_buffer=100_000)
    s = MemoryServer(config=config)
    alice = s.logged_on("alice")
    bob = s.logged_on("bob")
    users = record_events(s.engine.user_manager, "device_disconnected")
    connection = s.connection(bob)
    connection.freeze()
    for _ in range(20):
        alice.send("bob", 1, b"x" * 10_000)
        s.pump()
    assert connection.server.waiting > BUFFER_SIZE
    assert not users.events  # a burst does not end the reader
    s.advance(config.output_drain_timeout)
    [(user, why)] = users.of("device_disconnected")
    assert (user.user_id, why) == ("bob", DisconnectedType.CHANNEL_CACHE_OVERFLOW)
    s.advance(config.close_timeout)
    assert connection.server.disconnected
    s.close()


def test_refusing_and_restart(server):
    server.refusing = True
    alice = server.client("alice")
    server.failure(alice.logon(), ConnectionRefusedError)
    server.refusing = False
    bob = server.logged_on("bob")
    first_engine = server.engine
    events = record_events(bob)
    new_engine = server.restart()
    assert new_engine is server.engine and new_engine is not first_engine
    assert not bob.logged_on
    server.advance(1)
    assert bob.logged_on
    assert new_engine.user_manager.get_online_user_list() == ["bob"]
    assert "relogon_completed" in events.names()


def test_close_ends_everything(server):
    alice = server.logged_on("alice")
    server.connection(alice).freeze()
    server.logged_on("bob")
    server.close()
    assert server.open_connections() == []
    assert server.engine.sessions == set()
    assert not alice.logged_on


def test_memory_server_around_an_engine_built_by_hand():
    clock = task.Clock()
    engine = ServerEngine(ServerConfig(), clock=clock, handler=REFUSE_ALL)
    server = MemoryServer(engine=engine)
    assert server.clock is clock
    error = server.failure(server.client("alice").logon(), LogonFailed)
    assert "invalid user ID or password" in str(error)
    with pytest.raises(TypeError):
        MemoryServer(ECHO, engine=engine)
    with pytest.raises(TypeError):
        MemoryServer(engine=ServerEngine(ServerConfig(), clock=object()))


def test_doubling_retry_policy():
    assert [doubling_retry_policy(n) for n in (1, 2, 3, 6, 7, 50)] == [1, 2, 4, 30, 30, 30]


# -- events ---------------------------------------------------------------------------------


def test_user_manager_events_every_one(server):
    """
    Every event of the user manager is recorded, device_kicked_out
    included, in the order they fire.
    """
    users = record_events(server.engine.user_manager)
    names = set(event_names(server.engine.user_manager))
    assert {
        "user_connected",
        "user_disconnected",
        "device_connected",
        "device_disconnected",
        "device_being_pushed_out",
        "device_kicked_out",
        "new_connection_ignored",
        "user_count_changed",
        "heartbeat_timed_out",
    } <= names
    server.logged_on("alice")
    server.engine.kick_out("alice", "bye")
    server.pump()
    assert users.names() == [
        "device_connected",
        "user_connected",
        "user_count_changed",
        "device_kicked_out",
        "device_disconnected",
        "user_disconnected",
        "user_count_changed",
    ]
    [(user, operator, reason)] = users.of("device_kicked_out")
    assert (user.user_id, operator, reason) == ("alice", "_0", "bye")
    users.clear()
    users.stop()
    server.logged_on("bob")
    assert users.events == []


def test_recorder_converts_and_refuses_a_source_without_events(server):
    from esf.testing import EventRecorder

    users = EventRecorder(
        server.engine.user_manager, ["device_connected"], convert=lambda u: u.user_id
    )
    server.logged_on("alice")
    assert users.events == [("device_connected", "alice")]
    with pytest.raises(ValueError, match="has no events"):
        record_events(object())


# -- logs -------------------------------------------------------------------------------------


def test_log_capture_by_namespace(server):
    other = Logger(namespace="my_app")
    with LogCapture() as esf_only, LogCapture(namespace=None) as everything:
        alice = server.logged_on("alice")
        other.info("hello from the app")
        server.connection(alice).cut()
        server.pump()
    assert [e["esf_event"] for e in esf_only.esf_events("session_ended")] == ["session_ended"]
    assert all(e["log_namespace"].startswith("esf") for e in esf_only.events)
    assert "hello from the app" in everything.messages()
    assert "hello from the app" not in esf_only.messages()
    assert esf_only.errors() == []
    with LogCapture(namespace="my_app") as mine:
        other.error("broken")
    assert [e["log_format"] for e in mine.errors()] == ["broken"]


def test_logged_errors_flush_and_check(server):
    errors = LoggedErrors().start()
    try:
        log = Logger(namespace="my_app")
        try:
            1 / 0  # noqa: B018 -- the failure logged
        except ZeroDivisionError:
            log.failure("oops")
        log.error("bad {thing}", thing="news")
        assert len(errors.flush(ZeroDivisionError)) == 1
        with pytest.raises(AssertionError, match="bad news"):
            errors.check()
        assert len(errors.flush()) == 1
        errors.check()
    finally:
        errors.stop()


def test_a_handler_bug_is_logged_and_a_request_error_is_not():
    """
    What docs/testing.md promises about the server's handlers: a
    RequestError goes back to the sender unlogged, any other exception is
    logged as an error.
    """
    from esf.interfaces import ICustomizeHandler

    @implementer(ICustomizeHandler)
    class Handler:
        def handle_information(self, user_id, client_type, information_type, payload):
            pass

        def handle_query(self, user_id, client_type, information_type, payload):
            if payload == b"bad":
                raise RequestError(ErrorCode.BAD_REQUEST, "no")
            return 1 / 0

    server = MemoryServer(Handler())
    errors = LoggedErrors().start()
    try:
        alice = server.logged_on("alice")
        assert (
            server.failure(alice.query("_0", 1, b"bad"), RequestError).code
            == ErrorCode.BAD_REQUEST
        )
        errors.check()
        error = server.failure(alice.query("_0", 1, b"x"), RequestError)
        assert error.code == ErrorCode.HANDLER_ERROR
        assert len(errors.flush(ZeroDivisionError)) == 1
        errors.check()
    finally:
        errors.stop()
        server.close()


# -- engine_for ---------------------------------------------------------------------------------


def test_engine_for_uses_each_object_for_what_it_provides():
    echo, rooms = Echo(), Rooms()
    clock = task.Clock()
    engine = engine_for(REFUSE_ALL, echo, rooms, config=ServerConfig(), clock=clock)
    assert engine.handler is REFUSE_ALL
    assert engine.customize_handler is echo
    assert engine.group_manager is rooms
    assert echo.engines == [engine] and rooms.engines == [engine]
    assert engine.clock is clock


def test_engine_for_one_object_with_every_interface():
    spec = importlib.util.spec_from_file_location(
        "support_desk", DOCS_EXAMPLES / "support_desk.py"
    )
    support_desk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(support_desk)
    desk = support_desk.SupportDesk({}, agents=())
    engine = engine_for(desk, clock=task.Clock())
    assert engine.handler is desk and engine.customize_handler is desk
    assert engine.group_manager is desk and desk.engine is engine


@pytest.mark.parametrize(
    "apps, words",
    [
        (
            (REFUSE_ALL, ACCEPT_ALL),
            ["IBasicHandler is provided by both", "one object per interface"],
        ),
        ((ECHO, Echo()), ["ICustomizeHandler is provided by both"]),
        ((ROOMS, ROOMS), ["given twice"]),
        ((object(),), ["provides none of", "IBasicHandler", "IEngineAware"]),
    ],
)
def test_engine_for_refuses_with_one_line(apps, words):
    with pytest.raises(ValueError) as raised:
        engine_for(*apps, clock=task.Clock())
    message = str(raised.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_engine_for_initializes_every_engine_aware_object_in_order():
    order = []

    @implementer(IEngineAware)
    class Watcher:
        def __init__(self, name):
            self.name = name

        def initialize(self, engine):
            order.append((self.name, engine.sessions == set()))

    engine_for(Watcher("a"), Watcher("b"), clock=task.Clock())
    assert order == [("a", True), ("b", True)]


# -- ServerService.port --------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_server_service_says_which_port_it_listens_on():
    from twisted.internet import reactor

    engine = ServerEngine(ServerConfig(), clock=reactor)
    service = ServerService(engine, TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
    assert service.port is None
    service.startService()
    try:
        address = service.port.getHost()
        assert address.host == "127.0.0.1" and address.port > 0
    finally:
        yield service.stopService()
    assert service.port is None


# -- the pytest plugin ----------------------------------------------------------------------------


def test_pytest_plugin_fixtures(pytester):
    """
    The plugin's fixtures in a project of their own: the server gets the
    overridden applications and settings, logs are captured, and an error
    logged and not flushed fails the test that logged it.
    """
    pytester.makepyfile(
        textwrap.dedent(
            """
            import pytest
            from twisted.logger import Logger
            from zope.interface import implementer

            from esf import LogonFailed, ServerConfig
            from esf.interfaces import IBasicHandler
            from esf.testing import MemoryServer

            pytest_plugins = ["esf.pytest_plugin"]

            @implementer(IBasicHandler)
            class Nobody:
                def verify_user(self, system_token, user_id, password, client_type, address):
                    return False

                def can_kick_out(self, operator_id, target_id, client_type):
                    return False

            @pytest.fixture
            def esf_applications():
                return [Nobody()]

            @pytest.fixture
            def esf_config():
                return ServerConfig(heartbeat_interval=3, heartbeat_timeout=7)

            def test_server(esf_server, esf_logs, esf_logged_errors):
                assert isinstance(esf_server, MemoryServer)
                assert esf_server.config.heartbeat_timeout == 7
                esf_server.failure(esf_server.client("alice").logon(), LogonFailed)
                assert esf_logs.esf_events("session_ended")

            def test_flushed_error_passes(esf_logged_errors):
                Logger().error("expected")
                assert len(esf_logged_errors.flush()) == 1

            def test_unflushed_error_fails(esf_logged_errors):
                Logger().error("unexpected trouble")
            """
        )
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["*errors were logged*unexpected trouble*"])


# -- embedding without traps --------------------------------------------------------------------


def test_an_engine_built_by_hand_ends_silent_sessions():
    """
    Nobody calls engine.start(): the first connection starts the heartbeat
    reaper, so a session gone silent does not stay online.
    """
    clock = task.Clock()
    engine = ServerEngine(ServerConfig(heartbeat_interval=10, heartbeat_timeout=30), clock=clock)
    server = MemoryServer(engine=engine)
    alice = server.logged_on("alice")
    users = record_events(engine.user_manager, "device_disconnected")
    server.connection(alice).freeze()
    server.result(alice.close())
    server.advance(300)
    [(_user, why)] = users.of("device_disconnected")
    assert why == DisconnectedType.HEARTBEAT_TIMEOUT
    assert not engine.user_manager.is_user_online("alice")


@pytest.mark.parametrize("answer", ["raise", "deferred", "coroutine"])
def test_logon_refused_is_not_logged_as_an_error(answer):
    from twisted.internet.defer import fail

    from esf import LogonRefused
    from esf.interfaces import IBasicHandler

    @implementer(IBasicHandler)
    class Refuser:
        def verify_user(self, system_token, user_id, password, client_type, address):
            if answer == "raise":
                raise LogonRefused("banned")
            if answer == "deferred":
                return fail(LogonRefused("banned"))

            async def refuse():
                raise LogonRefused("banned")

            return refuse()

        def can_kick_out(self, operator_id, target_id, client_type):
            return False

    server = MemoryServer(Refuser())
    errors = LoggedErrors().start()
    try:
        error = server.failure(server.client("alice").logon(), LogonFailed)
        assert error.cause == "banned"
        errors.check()
    finally:
        errors.stop()
        server.close()
