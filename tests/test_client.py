"""
The client engine, driven by a L{task.Clock} and connected in memory to a
real L{ServerEngine} on the same clock: no sockets, no real time.

L{Network} plays the wire.  Its endpoints hand each connection a pair of
in-memory transports; nothing moves until the test calls L{Network.flush},
which shuttles bytes both ways until both sides are quiet.  The network can
refuse connections (the server is down), drop every connection (the server
restarts), swap the engine behind it and mute a connection's server side (a
server that stops answering).
"""

from __future__ import annotations

import gc
import itertools
import random

import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport
from zope.interface import implementer

from esf import (
    ClientEngine,
    ClientType,
    DisconnectedType,
    ErrorCode,
    LogonFailed,
    LogonRefused,
    LogonResponse,
    LogonResult,
    MessageType,
    NotConnected,
    RelogonMode,
    RequestError,
    ServerConfig,
    ServerEngine,
    ServerFactory,
    WireConfig,
)
from esf.client._engine import ClientProtocol, Ending, EndingKind, SessionState
from esf.interfaces import IBasicHandler, ICustomizeHandler, IGroupManager
from esf.testing import EventRecorder, LoggedErrors
from esf.wire import FrameDecoder, encode_frame
from esf.wire import _messages as m

_ports = itertools.count(40001)


# -- the in-memory network ------------------------------------------------------


class Link:
    """
    One connection: a client protocol and a server protocol on two
    L{FakeTransport}s.
    """

    def __init__(self, client_protocol, server_protocol, client_address, server_address):
        self.client_protocol = client_protocol
        self.server_protocol = server_protocol
        self.client_io = FakeTransport(
            client_protocol, False, hostAddress=client_address, peerAddress=server_address
        )
        self.server_io = FakeTransport(
            server_protocol, True, hostAddress=server_address, peerAddress=client_address
        )
        #: Drop whatever the server writes (a server that stopped answering).
        self.mute_server = False
        #: Bytes the server wrote, per pump (for counting frames).
        self.server_wrote = bytearray()
        self.client_wrote = bytearray()
        self.closed = False

    def start(self) -> None:
        self.server_protocol.makeConnection(self.server_io)
        self.client_protocol.makeConnection(self.client_io)

    def pump(self) -> bool:
        """
        Move the bytes written so far, or report a close; whether anything
        happened.
        """
        if self.closed:
            return False
        from_server = self.server_io.getOutBuffer()
        from_client = self.client_io.getOutBuffer()
        if from_client:
            self.client_wrote += from_client
            self.server_io.bufferReceived(from_client)
        if from_server and not self.mute_server:
            self.server_wrote += from_server
            self.client_io.bufferReceived(from_server)
        if from_client or from_server:
            return True
        if self.server_io.disconnecting or self.client_io.disconnecting:
            self.drop()
            return True
        return False

    def drop(self, reason=None) -> None:
        """
        Both ends see the connection go.
        """
        if self.closed:
            return
        self.closed = True
        self.server_io.disconnected = self.client_io.disconnected = True
        self.server_io.disconnecting = self.client_io.disconnecting = True
        self.server_io.disconnectReason = self.client_io.disconnectReason = (
            reason or ConnectionLost()
        )
        self.server_io.reportDisconnect()
        self.client_io.reportDisconnect()

    def frames_to_server(self, wire: WireConfig) -> list:
        from esf.wire import FrameDecoder

        return FrameDecoder(wire).feed(bytes(self.client_wrote))


class Network:
    """
    A server engine reachable through L{endpoint}s.
    """

    def __init__(self, engine: ServerEngine):
        self.engine = engine
        self.clock = engine.clock
        self.up = True
        self.links: list[Link] = []
        self.attempts = 0

    def endpoint(self, host: str = "10.0.0.1") -> MemoryEndpoint:
        return MemoryEndpoint(self, host)

    def flush(self) -> None:
        """
        Pump every connection until nothing moves (running calls due now).
        """
        for _ in range(10_000):
            self.clock.advance(0)
            moved = False
            for link in list(self.links):
                if link.pump():
                    moved = True
            if not moved:
                return
        raise AssertionError("the network never went quiet")

    def advance(self, seconds: float, step: float = 0.5) -> None:
        """
        Let C{seconds} pass in steps, flushing after each.
        """
        self.flush()
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end:
            self.clock.advance(min(step, end - self.clock.seconds()))
            self.flush()

    def open_links(self) -> list[Link]:
        return [link for link in self.links if not link.closed]

    def drop_all(self) -> None:
        """
        Every connection goes at once, as when the server process dies.
        """
        for link in self.open_links():
            link.drop()
        self.flush()

    def restart(self, engine: ServerEngine | None = None) -> ServerEngine:
        """
        The server dies and comes back (a fresh engine by default): every
        connection drops; new connections reach the new engine.
        """
        self.drop_all()
        self.engine = engine or new_engine(self.clock, self.engine.config)
        return self.engine


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    def __init__(self, network: Network, host: str):
        self.network = network
        self.host = host
        self.attempts = 0

    def connect(self, factory):
        net = self.network
        net.attempts += 1
        self.attempts += 1
        if not net.up:
            # As from a reactor: the failure arrives later, from the loop.
            d = Deferred()
            net.clock.callLater(0, d.errback, ConnectionRefusedError("the server is down"))
            return d
        client_address = IPv4Address("TCP", self.host, next(_ports))
        server_address = IPv4Address("TCP", "10.9.9.9", 4530)
        client_protocol = factory.buildProtocol(server_address)
        server_protocol = ServerFactory(net.engine).buildProtocol(client_address)
        link = Link(client_protocol, server_protocol, client_address, server_address)
        net.links.append(link)
        link.start()
        return succeed(client_protocol)


# -- applications ------------------------------------------------------------------


@implementer(IBasicHandler)
class Passwords:
    """
    Users and passwords; kicks allowed to C{admins}.
    """

    def __init__(self, admins=("root",), **passwords):
        self.passwords = passwords
        self.admins = set(admins)

    def verify_user(self, system_token, user_id, password, client_type, address):
        if user_id not in self.passwords:
            return True
        if self.passwords[user_id] != password:
            raise LogonRefused("invalid user ID or password")
        return True

    def can_kick_out(self, operator_id, target_id, client_type):
        return operator_id in self.admins


@implementer(ICustomizeHandler)
class Recorder:
    """
    A customize handler that records what it gets and answers queries
    with C{answer(payload)}.
    """

    def __init__(self, answer=lambda payload: payload.upper()):
        self.information: list[tuple] = []
        self.queries: list[tuple] = []
        self.answer = answer

    def handle_information(self, user_id, client_type, information_type, payload):
        self.information.append((user_id, client_type, information_type, payload))

    def handle_query(self, user_id, client_type, information_type, payload):
        self.queries.append((user_id, client_type, information_type, payload))
        return self.answer(payload)


@implementer(IGroupManager)
class Groups:
    def __init__(self, **groups):
        self.groups = groups

    def get_members(self, group_id):
        return self.groups.get(group_id, [])

    def can_broadcast(self, user_id, group_id):
        return user_id in self.groups.get(group_id, []) or group_id == "*"


def new_engine(clock=None, config=None, **kwargs) -> ServerEngine:
    engine = ServerEngine(config or ServerConfig(), clock=clock or task.Clock(), **kwargs)
    engine.start()
    return engine


def fixed_policy(attempt: int) -> float:
    """
    A deterministic backoff: 1, 2, 4, 8 ... seconds.
    """
    return 1.0 * 2 ** (attempt - 1)


class Events(EventRecorder):
    """
    Every event of a client, recorded as C{(name, *args)} in C{all}.
    """

    NAMES = (
        "connection_interrupted",
        "connection_rebuild_start",
        "relogon_completed",
        "being_pushed_out",
        "being_kicked_out",
        "disconnected",
        "session_ended",
        "my_device_online",
        "my_device_offline",
        "broadcast_received",
        "information_received",
    )

    def __init__(self, client: ClientEngine):
        super().__init__(client, self.NAMES)
        self.all = self.events


def result(net: Network, d: Deferred):
    """
    Flush the network and return what C{d} fired with (raise if it failed
    or has not fired).
    """
    net.flush()
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def failure(net: Network, d: Deferred, *types) -> BaseException:
    """
    Flush the network and return the exception C{d} failed with.
    """
    net.flush()
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    assert isinstance(out[0], Failure), f"it succeeded with {out[0]!r}"
    if types:
        assert out[0].check(*types), out[0]
    return out[0].value


def pending(d: Deferred) -> bool:
    out = []
    d.addBoth(lambda r: out.append(r) or r)
    return not out


class Setup:
    """
    A network, its engine and a way to make clients.
    """

    def __init__(self, config: ServerConfig | None = None, **engine_kwargs):
        self.clock = task.Clock()
        self.config = config or ServerConfig(heartbeat_interval=10, heartbeat_timeout=30)
        self.engine = new_engine(self.clock, self.config, **engine_kwargs)
        self.net = Network(self.engine)

    def client(
        self, user_id, password="", client_type=ClientType.OTHERS, host="10.0.0.1", **kwargs
    ) -> ClientEngine:
        kwargs.setdefault("retry_policy", fixed_policy)
        kwargs.setdefault("wire", self.config.wire)
        return ClientEngine(
            self.net.endpoint(host), user_id, password, client_type, clock=self.clock, **kwargs
        )

    def logged_on(self, user_id, *args, **kwargs) -> ClientEngine:
        client = self.client(user_id, *args, **kwargs)
        response = result(self.net, client.logon())
        assert response.succeeded
        return client

    def session(self, user_id, client_type=ClientType.OTHERS):
        return self.engine.presence.get(user_id, client_type)


@pytest.fixture
def setup():
    return Setup()


@pytest.fixture(autouse=True)
def logged_errors():
    """
    The errors logged during a test (unhandled errors in Deferreds
    included); a test that expects some removes them, and any left fail it.
    """
    logged = LoggedErrors().start()
    try:
        yield logged.errors
        gc.collect()
    finally:
        logged.stop()
    assert [formatEvent(e) for e in logged.errors] == []


def expect_logged(errors: list[dict], text: str) -> None:
    """
    Remove the logged errors whose message holds C{text}; there must be
    some.
    """
    matching = [e for e in errors if text in formatEvent(e)]
    assert matching, [formatEvent(e) for e in errors]
    for e in matching:
        errors.remove(e)


def heartbeats(link: Link, wire=WireConfig()) -> list:
    return [f for f in link.frames_to_server(wire) if f.message_type == MessageType.HEARTBEAT]


# -- logon ---------------------------------------------------------------------------


def test_logon_response(setup):
    client = setup.client("alice")
    assert not client.logged_on
    response = result(setup.net, client.logon())
    assert response == LogonResponse(LogonResult.SUCCEED, "", 10, 30, 1024 * 1024)
    assert response.succeeded
    assert client.logged_on and client.logon_response == response
    session = setup.session("alice")
    assert session is not None and session.user_id == "alice"
    assert session.client_type == ClientType.OTHERS


def test_logon_sends_credentials_device_and_token():
    seen = []

    @implementer(IBasicHandler)
    class Spy:
        def verify_user(self, system_token, user_id, password, client_type, address):
            seen.append((system_token, user_id, password, client_type, address))
            return True

        def can_kick_out(self, *args):
            return False

    s = Setup(ServerConfig(system_token="tok"), handler=Spy())
    client = s.client("alice", "secret", ClientType.ANDROID, host="10.0.0.5", system_token="tok")
    result(s.net, client.logon())
    ((token, user, password, kind, address),) = seen
    assert (token, user, password, kind) == ("tok", "alice", "secret", ClientType.ANDROID)
    assert address.startswith("10.0.0.5:")


def test_logon_refused():
    s = Setup(handler=Passwords(alice="right"))
    client = s.client("alice", "wrong")
    events = Events(client)
    error = failure(s.net, client.logon(), LogonFailed)
    assert error.result == LogonResult.FAILED
    assert error.cause == "invalid user ID or password"
    assert error.response.result == LogonResult.FAILED
    assert str(error) == "FAILED: invalid user ID or password"
    assert not client.logged_on
    s.net.advance(600)
    assert s.net.attempts == 1
    assert events.all == []


@pytest.mark.parametrize(
    "config, kwargs, expected",
    [
        (
            ServerConfig(system_token="right"),
            {"system_token": "wrong"},
            LogonResult.VERSION_MISMATCHED,
        ),
        (ServerConfig(client_types={0, 1}), {}, LogonResult.CLIENT_TYPE_REJECTED),
    ],
)
def test_logon_refused_results(config, kwargs, expected):
    s = Setup(config)
    client = s.client("alice", **kwargs)
    error = failure(s.net, client.logon(), LogonFailed)
    assert error.result == expected
    s.net.advance(300)
    assert s.net.attempts == 1


def test_logon_had_logged_on_under_ignore_new():
    s = Setup(ServerConfig(relogon_mode=RelogonMode.IGNORE_NEW))
    first = s.logged_on("alice")
    second = s.client("alice")
    events = Events(second)
    error = failure(s.net, second.logon(), LogonFailed)
    assert error.result == LogonResult.HAD_LOGGED_ON
    assert "already logged on" in error.cause
    s.net.advance(300)
    assert second.endpoint.attempts == 1
    assert events.all == []
    assert first.logged_on


def test_logon_server_down():
    """
    The first connection fails: logon() fails with the connection error and
    nothing retries.
    """
    s = Setup()
    s.net.up = False
    client = s.client("alice")
    closed = []
    d = client.logon()
    # Whoever waits may close the client at once.
    d.addErrback(lambda f: client.close().addCallback(closed.append) and f)
    failure(s.net, d, ConnectionRefusedError)
    assert closed == [None]
    s.net.up = True
    s.net.advance(300)
    assert s.net.attempts == 1
    assert not client.logged_on


def mute_endpoint(client: ClientEngine, mute=lambda: True) -> None:
    """
    Make every connection of C{client} one whose server side is mute while
    C{mute()} is true when it connects.
    """
    endpoint = client.endpoint
    real_connect = endpoint.connect

    def connect(factory):
        d = real_connect(factory)
        if endpoint.network.links and mute():
            endpoint.network.links[-1].mute_server = True
        return d

    endpoint.connect = connect


def test_logon_unanswered_times_out():
    """
    A server that never answers the logon: it fails with TIMEOUT after the
    request timeout, and nothing retries.
    """
    s = Setup()
    client = s.client("alice", request_timeout=5)
    mute_endpoint(client)
    d = client.logon()
    s.net.advance(4.9, step=0.1)
    assert pending(d)
    s.net.advance(0.1)
    error = failure(s.net, d, RequestError)
    assert error.code == ErrorCode.TIMEOUT
    s.net.advance(100)
    assert s.net.attempts == 1
    assert s.net.open_links() == []


def test_logon_twice_is_an_error(setup):
    client = setup.logged_on("alice")
    with pytest.raises(RuntimeError):
        client.logon()


def test_calls_before_logon_fail_with_not_connected(setup):
    client = setup.client("alice")
    failure(setup.net, client.ping(), NotConnected)
    with pytest.raises(NotConnected):
        client.send("bob", 1, b"x")


def test_bad_user_id_is_refused_early(setup):
    with pytest.raises(ValueError):
        setup.client("a" * 12)


# -- heartbeats and dead-server detection -----------------------------------------------


def test_heartbeats(setup):
    """
    The first heartbeat goes right after the logon, then one every
    announced interval.
    """
    client = setup.logged_on("alice")
    (link,) = setup.net.links
    assert len(heartbeats(link)) == 1
    setup.net.advance(9.9, step=0.1)
    assert len(heartbeats(link)) == 1
    setup.net.advance(0.1)
    assert len(heartbeats(link)) == 2
    setup.net.advance(100)
    assert len(heartbeats(link)) == 12
    assert client.logged_on


def test_heartbeat_interval_comes_from_the_server():
    s = Setup(ServerConfig(heartbeat_interval=3, heartbeat_timeout=7))
    client = s.logged_on("alice")
    assert (client.logon_response.heartbeat_interval, client.logon_response.heartbeat_timeout) == (
        3,
        7,
    )
    s.net.advance(30)
    assert len(heartbeats(s.net.links[0])) == 11


def test_heartbeats_keep_the_session_alive(setup):
    client = setup.logged_on("alice")
    events = Events(client)
    setup.net.advance(3600, step=5)
    assert client.logged_on and events.all == []
    assert len(setup.net.open_links()) == 1


def test_dead_server(setup):
    """
    No frame at all from the server for the announced timeout: the client
    drops the connection, reconnects and logs on again.
    """
    client = setup.logged_on("alice")
    events = Events(client)
    (link,) = setup.net.links
    link.mute_server = True
    start = setup.clock.seconds()
    setup.net.advance(29.9, step=0.1)
    assert not link.closed
    setup.net.advance(10.1, step=0.1)
    assert link.closed
    dropped = setup.clock.seconds()
    assert 30 <= dropped - start <= 40
    assert events.names()[:2] == ["connection_interrupted", "connection_rebuild_start"]
    setup.net.advance(1)  # the first retry: fixed_policy(1) == 1 s
    assert len(setup.net.links) == 2
    assert events.names() == [
        "connection_interrupted",
        "connection_rebuild_start",
        "relogon_completed",
    ]
    assert events.of("relogon_completed")[0][0].succeeded
    assert client.logged_on


def test_any_frame_counts_as_life(setup):
    """
    Only silence is fatal: a server whose echoes are lost but which sends
    other frames is alive.
    """
    client = setup.logged_on("alice")
    bob = setup.logged_on("bob")
    (link, _) = setup.net.links

    real = link.pump

    def pump_without_echoes():
        # Drop the server's heartbeat echoes only.
        data = link.server_io.getOutBuffer()
        if data:
            from esf.wire import FrameDecoder

            keep = [
                f.raw for f in FrameDecoder().feed(data) if f.message_type != MessageType.HEARTBEAT
            ]
            link.server_io.stream = [b"".join(keep)] if keep else []
        return real()

    link.pump = pump_without_echoes
    for _ in range(20):
        bob.send("alice", 1, b"tick")
        setup.net.advance(5)
    assert client.logged_on
    assert not link.closed


# -- reconnect and re-logon ---------------------------------------------------------------


def test_reconnect_and_relogon(setup):
    client = setup.logged_on("alice")
    events = Events(client)
    setup.net.up = False
    setup.net.drop_all()
    assert events.names() == ["connection_interrupted", "connection_rebuild_start"]
    assert not client.logged_on
    failure(setup.net, client.ping(), NotConnected)
    # Backoff: retries at +1, +2 (3), +4 (7), +8 (15) seconds.
    setup.net.advance(14.5, step=0.25)
    assert setup.net.attempts == 1 + 3
    setup.net.up = True
    setup.net.advance(0.5)
    assert setup.net.attempts == 1 + 4
    assert events.names() == [
        "connection_interrupted",
        "connection_rebuild_start",
        "relogon_completed",
    ]
    (response,) = events.of("relogon_completed")[0]
    assert response.succeeded and response == client.logon_response
    assert client.logged_on
    assert result(setup.net, client.ping()) == 0


def test_backoff_timing(setup):
    """
    The retry policy gets the number of failed attempts, from 1.
    """
    asked = []

    def policy(attempt):
        asked.append(attempt)
        return 10.0 * attempt

    client = setup.logged_on("alice", retry_policy=policy)
    setup.net.up = False
    setup.net.drop_all()
    setup.net.advance(9.9, step=0.1)
    assert setup.net.attempts == 1
    setup.net.advance(0.1)
    assert setup.net.attempts == 2
    setup.net.advance(19.9, step=0.1)
    assert setup.net.attempts == 2
    setup.net.advance(0.1)
    assert setup.net.attempts == 3
    assert asked == [1, 2, 3]
    setup.net.up = True
    setup.net.advance(30)
    assert client.logged_on
    # A successful connection resets the count.
    setup.net.drop_all()
    setup.net.advance(10)
    assert client.logged_on and asked == [1, 2, 3, 1]


def test_default_retry_policy_has_jitter_and_a_cap(setup):
    client = setup.client("alice", retry_policy=None)
    random.seed(1)
    first = [client.retry_policy(1) for _ in range(50)]
    assert all(2.0 <= d <= 3.0 for d in first)
    assert len(set(first)) > 1
    late = [client.retry_policy(n) for n in (10, 50, 1000)]
    assert all(30.0 <= d <= 31.0 for d in late)


def test_server_restart_relogon(setup):
    client = setup.logged_on("alice")
    events = Events(client)
    old = setup.engine
    new = setup.net.restart()
    assert new is not old
    setup.net.advance(1)
    assert client.logged_on
    assert new.user_manager.is_user_online("alice")
    assert events.names() == [
        "connection_interrupted",
        "connection_rebuild_start",
        "relogon_completed",
    ]


def test_failed_relogon_stops_reconnecting(setup):
    client = setup.logged_on("alice", "pw")
    events = Events(client)
    setup.net.restart(new_engine(setup.clock, setup.config, handler=Passwords(alice="changed")))
    setup.net.advance(1)
    (response,) = events.of("relogon_completed")[0]
    assert response.result == LogonResult.FAILED
    assert response.failure_cause == "invalid user ID or password"
    assert not client.logged_on
    attempts = setup.net.attempts
    setup.net.advance(3600, step=10)
    assert setup.net.attempts == attempts
    assert events.names() == [
        "connection_interrupted",
        "connection_rebuild_start",
        "relogon_completed",
        "session_ended",
    ]
    ((ending,),) = events.of("session_ended")
    assert ending == Ending(
        EndingKind.REFUSED,
        DisconnectedType.LOGON_FAILED,
        "invalid user ID or password",
        response=response,
    )
    assert client.state is SessionState.ENDED and client.ending == ending


def test_relogon_unanswered_tries_again(setup):
    """
    A re-logon that is never answered: the connection is dropped after the
    request timeout and the client tries another.
    """
    client = setup.logged_on("alice", request_timeout=5)
    events = Events(client)
    mute = [True]
    mute_endpoint(client, lambda: mute[0])
    setup.net.drop_all()
    setup.net.advance(1)
    assert len(setup.net.open_links()) == 1
    mute[0] = False
    setup.net.advance(5)
    assert len(setup.net.links) == 2 and setup.net.links[1].closed
    # That connection was made but led nowhere: the backoff goes on growing
    # (the second delay, 2 s) rather than restart at the first.
    setup.net.advance(1.9, step=0.1)
    assert len(setup.net.links) == 2
    setup.net.advance(0.1)
    assert client.logged_on
    assert events.names() == [
        "connection_interrupted",
        "connection_rebuild_start",
        "connection_interrupted",
        "connection_rebuild_start",
        "relogon_completed",
    ]


def test_backoff_grows_when_connections_end_before_the_logon():
    """
    A server that accepts connections and closes them at once (here: full)
    is retried with a growing delay, not at the first delay again and
    again; a successful logon starts the count afresh.
    """
    s = Setup(ServerConfig(max_connections=1))
    alice = s.logged_on("alice")
    events = Events(alice)
    s.net.drop_all()
    squatter = s.client("carol")
    result(s.net, squatter.logon())
    times = []
    real_connect = alice.endpoint.connect

    def connect(factory):
        times.append(s.clock.seconds())
        return real_connect(factory)

    alice.endpoint.connect = connect
    s.net.advance(31, step=0.25)
    assert [t - times[0] for t in times] == [0, 2, 6, 14, 30]
    assert events.of("disconnected")[0][0] == DisconnectedType.MAX_CONNECTION_COUNT_LIMITTED
    result(s.net, squatter.close())
    s.net.advance(32, step=0.25)
    assert alice.logged_on
    s.net.drop_all()
    s.net.advance(1)
    assert alice.logged_on


def test_first_logon_on_a_full_server():
    s = Setup(ServerConfig(max_connections=1))
    s.logged_on("alice")
    bob = s.client("bob")
    events = Events(bob)
    error = failure(s.net, bob.logon(), NotConnected)
    assert "MAX_CONNECTION_COUNT_LIMITTED" in str(error)
    assert events.of("disconnected")[0][0] == DisconnectedType.MAX_CONNECTION_COUNT_LIMITTED
    s.net.advance(300)
    assert bob.endpoint.attempts == 1


def test_relogon_busy_tries_again_later():
    """
    A re-logon answered C{Busy} ("try later"; here: too many logons from
    one host) is not the end: the client goes on reconnecting, with a
    growing delay, until it gets in.
    """
    s = Setup(ServerConfig(logon_rate_limit=3, logon_rate_window=10))
    alice = s.logged_on("alice")
    s.logged_on("bob")
    s.logged_on("carol")
    events = Events(alice)
    s.net.links[0].drop()
    s.net.advance(1)
    (response,) = events.of("relogon_completed")[0]
    assert response.result == LogonResult.BUSY and "try later" in response.failure_cause
    assert not alice.logged_on
    # Busy at 1, 3 and 7 s (the delays grow: 2, 4, 8 s); by 15 s the
    # window has room again.
    s.net.advance(13.75, step=0.25)
    assert not alice.logged_on
    s.net.advance(0.25)
    assert alice.logged_on
    assert [r.result for (r,) in events.of("relogon_completed")] == [LogonResult.BUSY] * 3 + [
        LogonResult.SUCCEED
    ]
    assert (
        events.names()
        == ["connection_interrupted", "connection_rebuild_start"] + ["relogon_completed"] * 4
    )


def test_first_logon_busy_fails():
    s = Setup(ServerConfig(logon_rate_limit=1, logon_rate_window=10))
    s.logged_on("bob")
    alice = s.client("alice")
    error = failure(s.net, alice.logon(), LogonFailed)
    assert error.result == LogonResult.BUSY
    s.net.advance(60)
    assert alice.endpoint.attempts == 1


def test_relogon_refused_as_had_logged_on():
    """
    Under IgnoreNew, a client whose connection died without the server
    noticing is refused when it comes back (HadLoggedOn) and stops.
    """
    s = Setup(ServerConfig(relogon_mode=RelogonMode.IGNORE_NEW))
    alice = s.logged_on("alice")
    events = Events(alice)
    (link,) = s.net.links
    link.closed = True  # only the client sees the connection go
    link.client_io.reportDisconnect()
    s.net.advance(1)
    (response,) = events.of("relogon_completed")[0]
    assert response.result == LogonResult.HAD_LOGGED_ON
    assert not alice.logged_on
    s.net.advance(600, step=5)
    assert alice.endpoint.attempts == 2
    assert events.names() == [
        "connection_interrupted",
        "connection_rebuild_start",
        "relogon_completed",
        "session_ended",
    ]
    ((ending,),) = events.of("session_ended")
    assert ending.kind is EndingKind.REFUSED and ending.response == response


def test_close_while_waiting_to_reconnect(setup):
    alice = setup.logged_on("alice")
    setup.net.up = False
    setup.net.drop_all()
    setup.net.advance(1.5)
    assert result(setup.net, alice.close()) is None
    setup.net.up = True
    setup.net.advance(600, step=5)
    assert alice.endpoint.attempts == 2
    assert not alice.logged_on


# -- the stop conditions --------------------------------------------------------------------


def test_pushed_out(setup):
    old = setup.logged_on("alice", host="10.0.0.1")
    events = Events(old)
    new = setup.logged_on("alice", host="10.0.0.2")
    assert events.names() == ["being_pushed_out", "session_ended"]
    ((cause,),) = events.of("being_pushed_out")
    assert "10.0.0.2" in cause
    ((ending,),) = events.of("session_ended")
    assert ending == Ending(EndingKind.PUSHED_OUT, DisconnectedType.BEING_PUSHED_OUT, cause)
    assert ending.final
    assert not old.logged_on and new.logged_on
    setup.net.advance(3600, step=10)
    assert old.endpoint.attempts == 1
    assert events.names() == ["being_pushed_out", "session_ended"]
    assert setup.session("alice").address.startswith("10.0.0.2:")
    failure(setup.net, old.ping(), NotConnected)


def test_another_device_does_not_push_out(setup):
    pc = setup.logged_on("alice", client_type=ClientType.DOTNET)
    events = Events(pc)
    phone = setup.logged_on("alice", client_type=ClientType.ANDROID)
    assert pc.logged_on and phone.logged_on
    assert events.all == [("my_device_online", ClientType.ANDROID)]
    assert result(setup.net, pc.get_my_devices()) == [ClientType.DOTNET, ClientType.ANDROID]
    result(setup.net, phone.logoff())
    assert events.of("my_device_offline") == [(ClientType.ANDROID,)]


def test_kicked_out():
    s = Setup(handler=Passwords(admins=["root"]))
    alice = s.logged_on("alice")
    root = s.logged_on("root")
    events = Events(alice)
    assert result(s.net, root.kick_out("alice", "spamming")) is None
    assert events.all == [
        ("being_kicked_out", "root", "spamming"),
        (
            "session_ended",
            Ending(EndingKind.KICKED, DisconnectedType.BEING_KICKED_OUT, "spamming", "root"),
        ),
    ]
    assert not alice.logged_on
    s.net.advance(3600, step=10)
    assert alice.endpoint.attempts == 1
    assert not s.engine.user_manager.is_user_online("alice")


def test_kicked_out_by_the_server(setup):
    alice = setup.logged_on("alice")
    events = Events(alice)
    setup.engine.kick_out("alice", "maintenance")
    setup.net.flush()
    assert events.all == [
        ("being_kicked_out", "_0", "maintenance"),
        (
            "session_ended",
            Ending(EndingKind.KICKED, DisconnectedType.BEING_KICKED_OUT, "maintenance", "_0"),
        ),
    ]
    setup.net.advance(600)
    assert alice.endpoint.attempts == 1


def test_kick_out_refused(setup):
    alice = setup.logged_on("alice")
    bob = setup.logged_on("bob")
    error = failure(setup.net, alice.kick_out("bob"), RequestError)
    assert error.code == ErrorCode.NOT_AUTHORIZED
    assert "not authorised" in error.text
    assert bob.logged_on


def test_kick_out_offline_user():
    s = Setup(handler=Passwords(admins=["root"]))
    root = s.logged_on("root")
    error = failure(s.net, root.kick_out("nobody"), RequestError)
    assert error.code == ErrorCode.NOT_AUTHORIZED and "not online" in error.text


def test_logoff(setup):
    alice = setup.logged_on("alice")
    events = Events(alice)
    ended = []
    setup.engine.user_manager.user_disconnected.subscribe(
        lambda user_data, reason: ended.append(reason)
    )
    d = alice.logoff()
    assert not alice.logged_on
    assert result(setup.net, d) is None
    assert ended == [DisconnectedType.LOGGED_OFF]
    setup.net.advance(3600, step=10)
    assert alice.endpoint.attempts == 1
    assert events.all == [
        ("session_ended", Ending(EndingKind.LOGGED_OFF, DisconnectedType.LOGGED_OFF, "logged off"))
    ]


def test_logoff_before_the_close_completes(setup):
    """
    Time passes between the Logoff and the close: no heartbeat is attempted
    on the leaving connection.
    """
    alice = setup.logged_on("alice")
    alice.logoff()
    setup.clock.advance(10)
    setup.clock.advance(10)
    setup.net.flush()
    assert alice.endpoint.attempts == 1


def test_close(setup):
    alice = setup.logged_on("alice")
    events = Events(alice)
    d = alice.close()
    assert result(setup.net, d) is None
    assert not alice.logged_on
    setup.net.advance(600)
    assert alice.endpoint.attempts == 1
    assert events.all == [
        ("session_ended", Ending(EndingKind.CLOSED, None, "closed by the application"))
    ]


@pytest.mark.parametrize(
    "end, reason",
    [
        (lambda s: s.engine.stop(), DisconnectedType.SERVER_SHUTDOWN),
        (
            lambda s: s.session("alice").end(DisconnectedType.CHANNEL_CACHE_OVERFLOW, "slow"),
            DisconnectedType.CHANNEL_CACHE_OVERFLOW,
        ),
    ],
)
def test_other_server_close_reconnects(end, reason):
    s = Setup()
    alice = s.logged_on("alice")
    events = Events(alice)
    end(s)
    s.net.flush()
    assert [e[0] for e in events.all] == [
        "disconnected",
        "connection_interrupted",
        "connection_rebuild_start",
    ]
    (kind, text) = events.of("disconnected")[0]
    assert kind == reason and isinstance(kind, DisconnectedType)
    assert text
    if reason == DisconnectedType.SERVER_SHUTDOWN:
        s.net.restart()
    s.net.advance(1)
    assert alice.logged_on
    assert events.names()[-1] == "relogon_completed"


def test_server_heartbeat_timeout_reconnects():
    """
    The server ends a session it thinks silent (the client's heartbeats are
    lost on the way, while another user keeps the client busy): the client
    hears the notice and reconnects.
    """
    s = Setup()
    alice = s.logged_on("alice")
    bob = s.logged_on("bob")
    events = Events(alice)
    link = s.net.links[0]
    link.client_io.write = lambda data: None  # nothing alice writes arrives
    for _ in range(12):
        bob.send("alice", 1, b"are you there?")
        s.net.advance(4)
        if events.of("disconnected"):
            break
    (kind, text) = events.of("disconnected")[0]
    assert kind == DisconnectedType.HEARTBEAT_TIMEOUT and "30 s" in text
    assert 30 <= s.clock.seconds() <= 45
    s.net.advance(1)
    assert alice.logged_on
    assert [n for n in events.names() if n != "information_received"] == [
        "disconnected",
        "connection_interrupted",
        "connection_rebuild_start",
        "relogon_completed",
    ]


def test_pushed_out_then_events_are_not_doubled(setup):
    """
    The push-out notice is followed by a DisconnectNotice(BeingPushedOut):
    one event, no disconnected.
    """
    old = setup.logged_on("alice")
    events = Events(old)
    setup.logged_on("alice", host="10.0.0.2")
    setup.net.advance(60)
    assert events.names() == ["being_pushed_out", "session_ended"]


# -- calls ------------------------------------------------------------------------------------


def test_ping(setup):
    alice = setup.logged_on("alice")
    d = alice.ping()
    assert pending(d)
    setup.clock.advance(0.25)
    assert result(setup.net, d) == 0.25


def test_ping_by_server(setup):
    alice = setup.logged_on("alice")
    setup.logged_on("bob")
    assert result(setup.net, alice.ping_by_server("bob")) == 0
    error = failure(setup.net, alice.ping_by_server("nobody"), RequestError)
    assert error.code == ErrorCode.USER_OFFLINE


def test_get_my_ipe(setup):
    alice = setup.logged_on("alice", host="10.1.2.3")
    address = result(setup.net, alice.get_my_ipe())
    host, port = address.rsplit(":", 1)
    assert host == "10.1.2.3" and port.isdigit()


def test_get_all_online_users_pages():
    """
    More users than one reply holds: the client asks page after page.
    """
    wire = WireConfig(11, 100)  # 100 - 36 - 8: 56 bytes of names per reply
    s = Setup(ServerConfig(wire=wire))
    names = [f"user{i:03d}" for i in range(23)]
    clients = [s.logged_on(n) for n in names]
    (link,) = s.net.links[:1]
    before = len(link.frames_to_server(wire))
    users = result(s.net, clients[0].get_all_online_users())
    assert users == sorted(names)
    requests = [
        f
        for f in link.frames_to_server(wire)[before:]
        if f.message_type == MessageType.GET_ALL_ONLINE_USERS
    ]
    assert len(requests) == 4  # 6 names of 9 bytes fit the 56 bytes of a reply


class LyingLister:
    """
    Stands in for a client's C{_request}: answers each GetAllOnlineUsers
    with C{pages(offset)}, a C{(total, user_ids)}; fails loudly past 1000
    requests instead of letting a client that keeps asking run forever.
    """

    def __init__(self, client: ClientEngine, pages):
        self.pages = pages
        self.offsets: list[int] = []
        client._request = self  # type: ignore[method-assign]

    def __call__(self, message_type, body=b"", dest="_0", timeout=None):
        assert message_type == MessageType.GET_ALL_ONLINE_USERS
        self.offsets.append(m.GetAllOnlineUsers.decode(body).offset)
        if len(self.offsets) > 1000:
            raise AssertionError("more than 1000 pages asked for")
        total, user_ids = self.pages(self.offsets[-1])
        data = encode_frame(
            WireConfig(11, 1 << 24),
            MessageType.GET_ALL_ONLINE_USERS,
            m.GetAllOnlineUsersReply(total, user_ids).encode(),
            message_id=1,
            user_id="_0",
        )
        (frame,) = FrameDecoder(WireConfig(11, 1 << 24)).feed(data)
        return succeed(frame)


def test_get_all_online_users_does_not_trust_the_total(setup):
    """
    A server that claims 2**32 - 1 users online and sends fresh IDs page
    after page: the client stops at C{limit} IDs (100,000 by default).
    """
    alice = setup.logged_on("alice")
    lister = LyingLister(
        alice, lambda offset: (2**32 - 1, [f"u{offset + i}" for i in range(1000)])
    )
    users = result(setup.net, alice.get_all_online_users())
    assert len(users) == 100_000  # the default limit
    assert len(lister.offsets) == 100
    lister.offsets.clear()
    users = result(setup.net, alice.get_all_online_users(limit=2500))
    assert users == sorted(f"u{i}" for i in range(2500))
    assert lister.offsets == [0, 1000, 2000]


def test_get_all_online_users_stops_when_a_page_brings_nothing_new(setup):
    """
    A server that sends the same page again and again, however many users
    it claims: the list ends at the first page that adds no ID.
    """
    alice = setup.logged_on("alice")
    lister = LyingLister(alice, lambda offset: (2**32 - 1, ["bob", "alice", "bob"]))
    assert result(setup.net, alice.get_all_online_users()) == ["alice", "bob"]
    assert lister.offsets == [0, 3]
    with pytest.raises(ValueError):
        alice.get_all_online_users(limit=0)


def test_is_user_online_and_query_onlines(setup):
    alice = setup.logged_on("alice")
    setup.logged_on("bob")
    assert result(setup.net, alice.is_user_online("bob")) is True
    assert result(setup.net, alice.is_user_online("carol")) is False
    assert result(setup.net, alice.query_onlines(["bob", "carol", "alice"])) == {
        "bob": True,
        "carol": False,
        "alice": True,
    }


def test_get_my_devices(setup):
    alice = setup.logged_on("alice", client_type=ClientType.IOS)
    assert result(setup.net, alice.get_my_devices()) == [ClientType.IOS]


# -- application messages ------------------------------------------------------------------------


def test_send_between_clients(setup):
    handler = Recorder()
    alice = setup.logged_on("alice")
    bob = setup.logged_on("bob", client_type=ClientType.ANDROID, handler=handler)
    events = Events(bob)
    alice.send("bob", 7, b"hello")
    setup.net.flush()
    assert handler.information == [("alice", ClientType.OTHERS, 7, b"hello")]
    assert events.all == [("information_received", "alice", ClientType.OTHERS, 7, b"hello")]


def test_send_to_one_device(setup):
    alice = setup.logged_on("alice")
    pc, phone = Recorder(), Recorder()
    setup.logged_on("bob", client_type=ClientType.DOTNET, handler=pc)
    setup.logged_on("bob", client_type=ClientType.ANDROID, handler=phone)
    alice.send("bob", 1, b"to the phone", client_type=ClientType.ANDROID)
    setup.net.flush()
    assert pc.information == [] and len(phone.information) == 1


def test_send_to_the_server():
    handler = Recorder()
    s = Setup(customize_handler=handler)
    alice = s.logged_on("alice")
    alice.send("_0", 3, b"to the server")
    s.net.flush()
    assert handler.information == [("alice", ClientType.OTHERS, 3, b"to the server")]


def test_query_between_clients(setup):
    alice = setup.logged_on("alice")
    handler = Recorder()
    setup.logged_on("bob", handler=handler)
    assert result(setup.net, alice.query("bob", 5, b"question")) == b"QUESTION"
    assert handler.queries == [("alice", ClientType.OTHERS, 5, b"question")]


def test_query_answered_with_a_deferred(setup):
    answers = []

    def later(payload):
        answers.append(Deferred())
        return answers[-1]

    alice = setup.logged_on("alice")
    setup.logged_on("bob", handler=Recorder(later))
    d = alice.query("bob", 5, b"q")
    setup.net.flush()
    assert pending(d)
    answers[0].callback(b"answer")
    assert result(setup.net, d) == b"answer"


def test_query_handler_raises(setup, logged_errors):
    def broken(payload):
        raise ValueError("no such thing")

    alice = setup.logged_on("alice")
    bob = setup.logged_on("bob", handler=Recorder(broken))
    error = failure(setup.net, alice.query("bob", 5, b"q"), RequestError)
    assert error.code == ErrorCode.HANDLER_ERROR
    assert error.text == "ValueError: no such thing"
    assert bob.logged_on
    expect_logged(logged_errors, "the client handler raised")


def test_query_client_without_handler(setup):
    alice = setup.logged_on("alice")
    setup.logged_on("bob")
    error = failure(setup.net, alice.query("bob", 5, b"q"), RequestError)
    assert error.code == ErrorCode.HANDLER_ERROR


def test_query_offline_user(setup):
    alice = setup.logged_on("alice")
    error = failure(setup.net, alice.query("nobody", 5, b"q"), RequestError)
    assert error.code == ErrorCode.USER_OFFLINE
    assert "nobody" in error.text


def test_query_the_server():
    s = Setup(customize_handler=Recorder(lambda p: p[::-1]))
    alice = s.logged_on("alice")
    assert result(s.net, alice.query("_0", 1, b"abc")) == b"cba"


def test_query_timeout(setup):
    """
    An answer that never comes: TIMEOUT after 30 s, not before.
    """
    alice = setup.logged_on("alice")
    setup.logged_on("bob", handler=Recorder(lambda payload: Deferred()))
    d = alice.query("bob", 5, b"q")
    setup.net.advance(29.9, step=0.1)
    assert pending(d)
    setup.net.advance(0.1)
    error = failure(setup.net, d, RequestError)
    assert error.code == ErrorCode.TIMEOUT
    assert alice.logged_on


def test_query_timeout_argument(setup):
    alice = setup.logged_on("alice", request_timeout=100)
    setup.logged_on("bob", handler=Recorder(lambda payload: Deferred()))
    d1 = alice.query("bob", 5, b"q")
    d2 = alice.query("bob", 5, b"q", timeout=2)
    setup.net.advance(2)
    assert failure(setup.net, d2, RequestError).code == ErrorCode.TIMEOUT
    assert pending(d1)
    setup.net.advance(98)
    assert failure(setup.net, d1, RequestError).code == ErrorCode.TIMEOUT


def test_late_answer_after_timeout_is_dropped(setup):
    answers = []
    alice = setup.logged_on("alice", request_timeout=5)
    setup.logged_on("bob", handler=Recorder(lambda p: answers.append(Deferred()) or answers[-1]))
    d = alice.query("bob", 5, b"q")
    setup.net.advance(5)
    failure(setup.net, d, RequestError)
    answers[0].callback(b"late")
    setup.net.flush()
    assert alice.logged_on
    assert result(setup.net, alice.ping()) == 0


@implementer(ICustomizeHandler)
class Silent:
    """
    A handler that never finishes anything.
    """

    def handle_information(self, user_id, client_type, information_type, payload):
        return Deferred()

    def handle_query(self, user_id, client_type, information_type, payload):
        return Deferred()


def test_in_flight_requests_fail_when_the_connection_drops(setup):
    alice = setup.logged_on("alice")
    setup.logged_on("bob", handler=Silent())
    query = alice.query("bob", 5, b"q")
    certain = alice.send_certainly("bob", 5, b"x")
    setup.net.flush()
    setup.net.links[0].drop()
    for d in (query, certain):
        error = failure(setup.net, d, NotConnected)
        assert "lost" in str(error)
    # No timeout fires later for them.
    setup.net.advance(60)


def test_send_certainly(setup):
    gate = []

    @implementer(ICustomizeHandler)
    class Slow(Recorder):
        def handle_information(self, *args):
            super().handle_information(*args)
            gate.append(Deferred())
            return gate[-1]

    alice = setup.logged_on("alice")
    handler = Slow()
    setup.logged_on("bob", handler=handler)
    d = alice.send_certainly("bob", 9, b"important")
    setup.net.flush()
    assert handler.information == [("alice", ClientType.OTHERS, 9, b"important")]
    assert pending(d)  # acknowledged once the handler has run
    gate[0].callback(None)
    assert result(setup.net, d) is None


def test_send_certainly_handler_raises(setup, logged_errors):
    @implementer(ICustomizeHandler)
    class Broken(Recorder):
        def handle_information(self, *args):
            raise KeyError("nope")

    alice = setup.logged_on("alice")
    setup.logged_on("bob", handler=Broken())
    error = failure(setup.net, alice.send_certainly("bob", 9, b"x"), RequestError)
    assert error.code == ErrorCode.HANDLER_ERROR and "KeyError" in error.text
    expect_logged(logged_errors, "the client handler raised")


def test_send_certainly_offline(setup):
    alice = setup.logged_on("alice")
    error = failure(setup.net, alice.send_certainly("bob", 9, b"x"), RequestError)
    assert error.code == ErrorCode.USER_OFFLINE


def test_send_certainly_to_the_server():
    handler = Recorder()
    s = Setup(customize_handler=handler)
    alice = s.logged_on("alice")
    assert result(s.net, alice.send_certainly("_0", 2, b"x")) is None
    assert handler.information == [("alice", ClientType.OTHERS, 2, b"x")]


def test_send_blob_between_clients():
    wire = WireConfig(11, 256)
    s = Setup(ServerConfig(wire=wire))
    alice = s.logged_on("alice")
    handler = Recorder()
    bob = s.logged_on("bob", handler=handler)
    events = Events(bob)
    payload = bytes(random.Random(4).randrange(256) for _ in range(5000))
    d = alice.send_blob("bob", 11, payload)
    assert result(s.net, d) is None
    assert handler.information == [("alice", ClientType.OTHERS, 11, payload)]
    assert events.of("information_received") == [("alice", ClientType.OTHERS, 11, payload)]
    blobs = [
        f for f in s.net.links[0].frames_to_server(wire) if f.message_type == MessageType.BLOB
    ]
    assert len(blobs) == -(-5000 // (256 - 36 - 13))
    assert all(len(f.raw) <= 256 for f in blobs)


def test_send_blob_to_the_server():
    wire = WireConfig(11, 300)
    handler = Recorder()
    s = Setup(ServerConfig(wire=wire), customize_handler=handler)
    alice = s.logged_on("alice")
    payload = b"0123456789" * 300
    assert result(s.net, alice.send_blob("_0", 12, payload)) is None
    assert handler.information == [("alice", ClientType.OTHERS, 12, payload)]


def test_send_blob_small_payload(setup):
    alice = setup.logged_on("alice")
    handler = Recorder()
    setup.logged_on("bob", handler=handler)
    assert result(setup.net, alice.send_blob("bob", 1, b"tiny")) is None
    assert handler.information == [("alice", ClientType.OTHERS, 1, b"tiny")]


def test_receiving_blob_is_bounded():
    wire = WireConfig(11, 256)
    s = Setup(ServerConfig(wire=wire))
    alice = s.logged_on("alice")
    handler = Recorder()
    s.logged_on("bob", handler=handler, max_blob_size=1000)
    error = failure(s.net, alice.send_blob("bob", 1, b"x" * 5000), RequestError)
    assert error.code in (ErrorCode.TOO_LARGE, ErrorCode.BAD_REQUEST)
    assert handler.information == []
    # The bound is per blob: a small one still goes through.
    assert result(s.net, alice.send_blob("bob", 1, b"y" * 900)) is None
    assert handler.information == [("alice", ClientType.OTHERS, 1, b"y" * 900)]


def test_broadcast():
    s = Setup(group_manager=Groups(room=["alice", "bob", "carol"]))
    alice = s.logged_on("alice")
    bob = s.logged_on("bob")
    carol = s.logged_on("carol")
    dave = s.logged_on("dave")
    seen = {
        name: Events(c)
        for name, c in [("alice", alice), ("bob", bob), ("carol", carol), ("dave", dave)]
    }
    assert result(s.net, alice.broadcast("room", 3, b"hi all")) is None
    assert seen["bob"].of("broadcast_received") == [("alice", "room", 3, b"hi all")]
    assert seen["carol"].of("broadcast_received") == [("alice", "room", 3, b"hi all")]
    assert seen["alice"].all == [] and seen["dave"].all == []
    error = failure(s.net, dave.broadcast("room", 3, b"x"), RequestError)
    assert error.code == ErrorCode.NOT_AUTHORIZED


def test_broadcast_without_group_manager(setup):
    alice = setup.logged_on("alice")
    error = failure(setup.net, alice.broadcast("room", 3, b"x"), RequestError)
    assert error.code == ErrorCode.NOT_AUTHORIZED


def test_server_query_to_a_client(setup):
    setup.logged_on("alice", handler=Recorder(lambda p: b"client says " + p))
    d = setup.engine.query("alice", 4, b"hi")
    assert result(setup.net, d) == b"client says hi"


def test_server_push_to_a_client(setup):
    handler = Recorder()
    setup.logged_on("alice", handler=handler)
    assert setup.engine.send("alice", 6, b"news") == 1
    setup.net.flush()
    assert handler.information == [("_0", ClientType.DOTNET, 6, b"news")]


def test_requests_survive_a_reconnect_only_if_sent_after(setup):
    """
    After a drop and re-logon, new calls work again.
    """
    alice = setup.logged_on("alice")
    setup.logged_on("bob", handler=Recorder())
    setup.net.links[0].drop()
    setup.net.flush()
    failure(setup.net, alice.query("bob", 1, b"q"), NotConnected)
    setup.net.advance(1)
    assert result(setup.net, alice.query("bob", 1, b"q")) == b"Q"


# -- flow control ----------------------------------------------------------------------------


def client_protocol(link: Link) -> ClientProtocol:
    protocol = link.client_io.producer
    assert isinstance(protocol, ClientProtocol)
    return protocol


def test_channel_is_busy_and_wait_for_drain(setup):
    alice = setup.logged_on("alice")
    protocol = client_protocol(setup.net.links[0])
    assert not alice.channel_is_busy
    assert result(setup.net, alice.wait_for_drain()) is None
    protocol.pauseProducing()  # as the transport does when its buffer fills
    assert alice.channel_is_busy
    waiters = [alice.wait_for_drain(), alice.wait_for_drain()]
    setup.net.advance(20)  # within the request timeout (30 s)
    assert all(pending(d) for d in waiters)
    protocol.resumeProducing()
    assert not alice.channel_is_busy
    assert [result(setup.net, d) for d in waiters] == [None, None]


def test_wait_for_drain_fails_when_the_connection_drops(setup):
    alice = setup.logged_on("alice")
    client_protocol(setup.net.links[0]).pauseProducing()
    d = alice.wait_for_drain()
    setup.net.links[0].drop()
    failure(setup.net, d, NotConnected)


def test_wait_for_drain_times_out(setup):
    """
    A server that keeps the session alive (its heartbeats arrive) but
    reads nothing: the wait for the drain fails with TIMEOUT, after its
    timeout or by default the request timeout, and leaves no waiter behind.
    """
    alice = setup.logged_on("alice", request_timeout=30)
    client_protocol(setup.net.links[0]).pauseProducing()
    short, default = alice.wait_for_drain(timeout=5), alice.wait_for_drain()
    setup.net.advance(5)
    error = failure(setup.net, short, RequestError)
    assert error.code == ErrorCode.TIMEOUT
    assert "the channel stayed busy for 5 s" in error.text
    assert pending(default)
    setup.net.advance(25)
    assert failure(setup.net, default, RequestError).code == ErrorCode.TIMEOUT
    assert alice.logged_on  # the session itself goes on
    assert alice._drain_waiters == []


def test_send_blob_fails_when_the_channel_stays_busy():
    wire = WireConfig(11, 256)
    s = Setup(ServerConfig(wire=wire))
    alice = s.logged_on("alice")
    s.logged_on("bob", handler=Recorder())
    client_protocol(s.net.links[0]).pauseProducing()
    d = alice.send_blob("bob", 1, b"z" * 2000, timeout=10)
    s.net.advance(10)
    assert failure(s.net, d, RequestError).code == ErrorCode.TIMEOUT
    assert alice._drain_waiters == []


def test_send_blob_waits_while_busy():
    wire = WireConfig(11, 256)
    s = Setup(ServerConfig(wire=wire))
    alice = s.logged_on("alice")
    handler = Recorder()
    s.logged_on("bob", handler=handler)
    protocol = client_protocol(s.net.links[0])
    protocol.pauseProducing()
    d = alice.send_blob("bob", 1, b"z" * 2000)
    s.net.advance(5)
    assert pending(d) and handler.information == []
    blobs = [
        f for f in s.net.links[0].frames_to_server(wire) if f.message_type == MessageType.BLOB
    ]
    assert blobs == []
    protocol.resumeProducing()
    assert result(s.net, d) is None
    assert handler.information == [("alice", ClientType.OTHERS, 1, b"z" * 2000)]


def test_no_ping_ack_while_the_server_does_not_read(setup):
    """
    Pings through the server get no PingAck while the server reads nothing
    of this client's output: they time out at the asker, and nothing piles
    up here; once the channel drains, pings are answered again.
    """
    alice = setup.logged_on("alice")
    bob = setup.logged_on("bob")
    link = setup.net.links[0]
    protocol = client_protocol(link)
    protocol.pauseProducing()
    pings = [bob.ping_by_server("alice", timeout=5) for _ in range(20)]
    setup.net.flush()
    assert [
        f for f in link.frames_to_server(WireConfig()) if f.message_type == MessageType.PING_ACK
    ] == []
    assert alice.counters["pings_unanswered"] == 20
    setup.net.advance(5)
    for d in pings:
        assert failure(setup.net, d, RequestError).code == ErrorCode.TIMEOUT
    protocol.resumeProducing()
    assert result(setup.net, bob.ping_by_server("alice")) >= 0


def test_a_server_that_does_not_read_is_given_up(setup):
    """
    A server that sends message after message to be acknowledged and reads
    nothing: past C{max_output_buffer} bytes of answers written while the
    channel is busy, the client closes the connection as broken, says so,
    and reconnects.
    """
    alice = setup.logged_on("alice", max_output_buffer=2000)
    events = Events(alice)
    bob = setup.logged_on("bob")
    protocol = client_protocol(setup.net.links[0])
    protocol.pauseProducing()
    sends = [bob.send_certainly("alice", 1, b"ack me") for _ in range(100)]
    for d in sends:
        d.addErrback(lambda _: None)
    setup.net.flush()
    assert alice.counters["output_overflows"] == 1
    assert 2000 < protocol.answers_while_busy <= 2000 + 100
    (kind, text) = events.of("disconnected")[0]
    assert kind == DisconnectedType.CHANNEL_CACHE_OVERFLOW
    assert "the server read nothing while" in text
    assert [e[0] for e in events.all] == [
        "information_received",
    ] * len(events.of("information_received")) + [
        "disconnected",
        "connection_interrupted",
        "connection_rebuild_start",
    ]
    assert alice.state is SessionState.RECONNECTING
    setup.net.advance(1)
    assert alice.logged_on
    assert events.of("relogon_completed")


def test_a_call_on_a_connection_given_up_fails_saying_why(setup):
    """
    Only the answers the client writes on its own count towards the bound:
    what the application sends while the channel is busy does not (it has
    the drain to pace itself).  Past the bound, a call waiting on the
    connection fails saying why, and a send raises (the connection is
    gone).
    """
    alice = setup.logged_on("alice", max_output_buffer=100)
    bob = setup.logged_on("bob")
    setup.logged_on("carol")
    setup.net.links[2].mute_server = True  # carol hears nothing: she never answers
    protocol = client_protocol(setup.net.links[0])
    protocol.pauseProducing()
    waiting = alice.ping_by_server("carol")
    for _ in range(10):
        alice.send("_0", 1, b"x" * 1000)  # 10 KB of its own: not counted
    setup.net.flush()
    assert alice.counters["output_overflows"] == 0
    sends = [bob.send_certainly("alice", 1, b"ack me") for _ in range(5)]
    for d in sends:
        d.addErrback(lambda _: None)
    setup.net.flush()  # three Acks of 40 bytes pass the bound
    assert alice.counters["output_overflows"] == 1
    error = failure(setup.net, waiting, NotConnected)
    assert "this client closed the connection: the server read nothing" in str(error)
    with pytest.raises(NotConnected):
        alice.send("_0", 1, b"x")


# -- the session's life: states and session_ended ---------------------------------------------


def test_states_through_a_session(setup):
    client = setup.client("alice")
    assert client.state is SessionState.IDLE
    d = client.logon()
    assert client.state is SessionState.LOGGING_ON  # the memory endpoint connects at once
    result(setup.net, d)
    assert client.state is SessionState.LOGGED_ON and client.ending is None
    setup.net.up = False
    setup.net.drop_all()
    assert client.state is SessionState.RECONNECTING
    setup.net.up = True
    setup.net.advance(1)
    assert client.state is SessionState.LOGGED_ON
    result(setup.net, client.logoff())
    assert client.state is SessionState.ENDED
    assert client.ending.kind is EndingKind.LOGGED_OFF


def test_close_while_waiting_to_reconnect_ends_the_session_at_once(setup):
    alice = setup.logged_on("alice")
    events = Events(alice)
    setup.net.up = False
    setup.net.drop_all()
    setup.net.advance(1.5)
    alice.close()
    assert events.names() == [
        "connection_interrupted",
        "connection_rebuild_start",
        "session_ended",
    ]
    assert events.of("session_ended") == [
        (Ending(EndingKind.CLOSED, None, "closed by the application"),)
    ]
    # Closing again changes nothing.
    assert result(setup.net, alice.close()) is None
    assert events.names().count("session_ended") == 1


def test_close_during_the_first_logon():
    """
    close() before the logon is answered: logon() fails with NotConnected,
    the connection closes, no session_ended (there was no session).
    """
    s = Setup()
    client = s.client("alice")
    mute_endpoint(client)
    events = Events(client)
    d = client.logon()
    s.net.flush()
    assert result(s.net, client.close()) is None
    failure(s.net, d, NotConnected)
    s.net.advance(120)
    assert s.net.open_links() == [] and s.net.attempts == 1
    assert events.all == []


@pytest.mark.parametrize(
    "reason, kind",
    [
        (DisconnectedType.BEING_KICKED_OUT, EndingKind.KICKED),
        (DisconnectedType.BEING_PUSHED_OUT, EndingKind.PUSHED_OUT),
        (DisconnectedType.NEW_CONNECTION_IGNORED, EndingKind.REFUSED),
        (DisconnectedType.LOGON_FAILED, EndingKind.REFUSED),
    ],
)
def test_a_final_disconnect_notice_alone_ends_the_session(setup, reason, kind):
    """
    A server that sends only the DisconnectNotice (no push-out or kick
    notice first) still ends the session for good, with the reason.
    """
    alice = setup.logged_on("alice")
    events = Events(alice)
    notice = m.DisconnectNotice(reason, "bye").encode()
    frame = encode_frame(
        setup.config.wire,
        MessageType.DISCONNECT_NOTICE,
        notice,
        user_id="_0",
        dest_user_id="alice",
    )
    client_protocol(setup.net.links[0]).dataReceived(frame)
    setup.net.links[0].drop()
    setup.net.advance(600)
    assert events.all == [("session_ended", Ending(kind, reason, "bye"))]
    assert alice.endpoint.attempts == 1


def test_a_session_ends_once_whatever_follows(setup):
    """
    Kicked, then the application closes and logs off: one session_ended.
    """
    alice = setup.logged_on("alice")
    events = Events(alice)
    setup.engine.kick_out("alice", "bye")
    setup.net.flush()
    alice.close()
    alice.logoff()
    setup.net.advance(60)
    assert events.names() == ["being_kicked_out", "session_ended"]
    assert alice.ending.kind is EndingKind.KICKED


@pytest.mark.parametrize(
    "message_type, body",
    [
        (MessageType.PING_BY_SERVER, b""),  # answered with a PingAck
        (MessageType.REQUEST, m.Information(1, b"q").encode()),  # no handler: an Error
        (MessageType.SEND_CERTAINLY, b"\x01"),  # malformed: an Error
    ],
)
def test_what_asks_for_an_answer_after_the_logoff_is_dropped(setup, message_type, body):
    """
    Bob's ping, query or message reaches alice after she sent her Logoff
    and before the server's close: it goes unanswered (she is no longer
    logged on), nothing escapes from the connection's dataReceived, and the
    logoff completes as the server's close.
    """
    alice = setup.logged_on("alice")
    ended = []
    setup.engine.user_manager.user_disconnected.subscribe(
        lambda user_data, reason: ended.append(reason)
    )
    d = alice.logoff()
    frame = encode_frame(
        setup.config.wire,
        message_type,
        body,
        client_type=ClientType.ANDROID,
        message_id=7,
        user_id="bob",
        dest_user_id="alice",
    )
    protocol = client_protocol(setup.net.links[0])
    protocol.dataReceived(frame)
    assert result(setup.net, d) is None
    assert ended == [DisconnectedType.LOGGED_OFF]
    frames = setup.net.links[0].frames_to_server(setup.config.wire)
    assert [f.message_type for f in frames][-1] == MessageType.LOGOFF


def test_a_user_whose_id_leaves_no_room_for_the_device_mark_is_answered():
    """
    A user ID of 10 or 11 bytes leaves no room for C{#kind} in the
    default 11-byte slot: alice answers that user's ping, query and
    SendCertainly to the plain user ID, which the server hands to the
    device that asked.
    """
    s = Setup()
    s.logged_on("alice", handler=Recorder())
    for user_id in ("bobbobbobb", "bobbobbobbo"):
        bob = s.logged_on(user_id, client_type=ClientType.ANDROID)
        assert result(s.net, bob.ping_by_server("alice")) >= 0
        assert result(s.net, bob.query("alice", 1, b"q")) == b"Q"
        assert result(s.net, bob.send_certainly("alice", 1, b"m")) is None
    assert len(s.net.open_links()) == 3


# -- answers only from the party asked ----------------------------------------------------


def forge(client: ClientEngine, message_type, body, sender, client_type=ClientType.OTHERS):
    """
    Deliver to C{client}, as its server would relay it, an answer from
    C{sender} carrying the MessageID of C{client}'s latest request.
    """
    message_id = list(client._pending)[-1]
    frame = encode_frame(
        client.wire,
        message_type,
        body,
        client_type=client_type,
        message_id=message_id,
        user_id=sender,
        dest_user_id=client.user_id,
    )
    client._protocol.dataReceived(frame)


def test_forged_response_to_a_query_through_the_server():
    """
    Mallory, an ordinary user, answers alice's query to bob with bob's
    MessageID: the server no longer relays it (it answers no request relayed
    to mallory), so alice never sees it and waits for bob.
    """
    s = Setup()
    answers = []
    alice = s.logged_on("alice")
    s.logged_on("bob", handler=Recorder(lambda p: answers.append(Deferred()) or answers[-1]))
    mallory = s.logged_on("mallory")
    d = alice.query("bob", 5, b"q")
    s.net.flush()
    message_id = list(alice._pending)[-1]
    mallory.write_message(
        MessageType.RESPONSE,
        m.Information(5, b"forged").encode(),
        message_id=message_id,
        dest="alice",
    )
    mallory.write_message(
        MessageType.ERROR,
        m.Error(MessageType.REQUEST, ErrorCode.USER_OFFLINE, "forged").encode(),
        message_id=message_id,
        dest="alice",
    )
    s.net.flush()
    assert pending(d)
    assert s.engine.counters["unsolicited_answers"] == 2
    assert alice.counters["forged_answers"] == 0
    answers[0].callback(b"real")
    assert result(s.net, d) == b"real"


def test_forged_ack_to_send_certainly(setup):
    gate = []

    @implementer(ICustomizeHandler)
    class Slow(Recorder):
        def handle_information(self, *args):
            gate.append(Deferred())
            return gate[-1]

    alice = setup.logged_on("alice")
    setup.logged_on("bob", handler=Slow())
    d = alice.send_certainly("bob", 9, b"x")
    setup.net.flush()
    forge(alice, MessageType.ACK, m.Ack(9).encode(), "mallory")
    assert pending(d) and alice.counters["forged_answers"] == 1
    gate[0].callback(None)
    assert result(setup.net, d) is None


def test_forged_ping_ack(setup):
    alice = setup.logged_on("alice")
    setup.logged_on("bob")
    d = alice.ping_by_server("bob")
    forge(alice, MessageType.PING_ACK, b"", "mallory")
    assert pending(d) and alice.counters["forged_answers"] == 1
    setup.clock.advance(0.5)
    assert result(setup.net, d) == 0.5


def test_is_user_online_answered_by_a_user_is_dropped(setup):
    """
    The server answers QueryOnline; the user asked about may not.
    """
    alice = setup.logged_on("alice")
    setup.logged_on("bob")
    d = alice.is_user_online("bob")
    forge(alice, MessageType.QUERY_ONLINE, m.QueryOnlineReply(False).encode(), "bob")
    forge(
        alice,
        MessageType.ERROR,
        m.Error(MessageType.QUERY_ONLINE, ErrorCode.BAD_REQUEST, "x").encode(),
        "bob",
    )
    assert pending(d) and alice.counters["forged_answers"] == 2
    assert result(setup.net, d) is True


def test_a_query_to_the_server_is_answered_by_the_server_only():
    s = Setup(customize_handler=Recorder(lambda p: p[::-1]))
    alice = s.logged_on("alice")
    d = alice.query("_0", 1, b"abc")
    forge(alice, MessageType.RESPONSE, m.Information(1, b"forged").encode(), "mallory")
    assert pending(d) and alice.counters["forged_answers"] == 1
    assert result(s.net, d) == b"cba"


def test_a_query_to_one_device_is_answered_by_that_device_only(setup):
    alice = setup.logged_on("alice")
    answers = []
    setup.logged_on(
        "bob",
        client_type=ClientType.ANDROID,
        handler=Recorder(lambda p: answers.append(Deferred()) or answers[-1]),
    )
    d = alice.query("bob", 5, b"q", client_type=ClientType.ANDROID)
    setup.net.flush()
    # bob's other device (or anyone stamping bob's name with another kind)
    forge(alice, MessageType.RESPONSE, m.Information(5, b"pc").encode(), "bob", ClientType.DOTNET)
    assert pending(d) and alice.counters["forged_answers"] == 1
    answers[0].callback(b"phone")
    assert result(setup.net, d) == b"phone"


def test_answers_go_to_the_device_that_asked(setup):
    """
    Two devices of alice ask bob with the same MessageID: each gets its own
    answer, not the other's.
    """
    pc = setup.logged_on("alice", client_type=ClientType.DOTNET)
    phone = setup.logged_on("alice", client_type=ClientType.ANDROID)
    answers = []
    setup.logged_on(
        "bob", handler=Recorder(lambda p: answers.append((p, Deferred())) or answers[-1][1])
    )
    d_pc = pc.query("bob", 1, b"pc")
    d_phone = phone.query("bob", 1, b"phone")
    setup.net.flush()
    assert list(pc._pending) == list(phone._pending)  # the same MessageID
    dict(answers)[b"phone"].callback(b"for the phone")
    setup.net.flush()
    assert pending(d_pc)
    assert result(setup.net, d_phone) == b"for the phone"
    dict(answers)[b"pc"].callback(b"for the pc")
    assert result(setup.net, d_pc) == b"for the pc"
    assert pc.counters["unexpected_answers"] == phone.counters["unexpected_answers"] == 0


def test_late_answers_are_counted(setup):
    alice = setup.logged_on("alice", request_timeout=5)
    answers = []
    setup.logged_on("bob", handler=Recorder(lambda p: answers.append(Deferred()) or answers[-1]))
    d = alice.query("bob", 5, b"q")
    setup.net.advance(5)
    failure(setup.net, d, RequestError)
    answers[0].callback(b"late")
    setup.net.flush()
    assert alice.counters["unexpected_answers"] == 1


# -- bounds on blobs from others ------------------------------------------------------------


def start_blob(sender: ClientEngine, to: str, blob_id: int, size: int = 100) -> Deferred:
    """
    The first fragment of an unfinished blob, sent with a MessageID so that
    a refusal comes back as an error.
    """
    fragment = m.BlobFragment(1, blob_id, 0, False, b"b" * size)
    return sender._request(MessageType.BLOB, fragment.encode(), dest=to)


def test_blob_defaults():
    s = Setup()
    blobs = s.client("alice")._inbox.blobs
    assert (blobs.max_blob_size, blobs.max_per_sender, blobs.max_bytes, blobs.max_blobs) == (
        16 * 1024 * 1024,
        2,
        64 * 1024 * 1024,
        16,
    )


def test_a_sender_has_at_most_two_blobs_in_progress(setup):
    alice = setup.logged_on("alice", handler=Recorder())
    mallory = setup.logged_on("mallory")
    bob = setup.logged_on("bob")
    first, second = start_blob(mallory, "alice", 1), start_blob(mallory, "alice", 2)
    third = start_blob(mallory, "alice", 3)
    assert failure(setup.net, third, RequestError).code == ErrorCode.RATE_LIMITED
    assert pending(first) and pending(second)
    assert alice.counters["blob_errors"] == 1
    # Another sender is not held back by mallory's.
    assert result(setup.net, bob.send_blob("alice", 1, b"z" * 5000, fragment_size=1000)) is None
    assert alice._inbox.blobs.pending == 2


def test_blobs_share_a_byte_budget():
    s = Setup()
    alice = s.logged_on("alice", handler=Recorder(), max_blob_bytes=250)
    mallory = s.logged_on("mallory")
    bob = s.logged_on("bob")
    start_blob(mallory, "alice", 1, size=200)
    s.net.flush()
    assert alice._inbox.blobs.buffered == 200
    error = failure(s.net, start_blob(bob, "alice", 1, size=100), RequestError)
    assert error.code == ErrorCode.RATE_LIMITED and "250 bytes" in error.text
    # A blob of one fragment is never buffered: it still goes through.
    assert result(s.net, bob.send_blob("alice", 1, b"small")) is None


def test_idle_blobs_are_dropped(setup):
    alice = setup.logged_on("alice", handler=Recorder())
    mallory = setup.logged_on("mallory")
    d = start_blob(mallory, "alice", 1)
    setup.net.flush()
    assert alice._inbox.blobs.pending == 1
    setup.net.advance(75, step=5)
    assert alice._inbox.blobs.pending == 0
    assert failure(setup.net, d, RequestError).code == ErrorCode.TIMEOUT  # nobody answered it


def test_a_blob_of_tiny_fragments_costs_its_bytes_not_an_object_each():
    """
    A sender's tiny fragments are held as bytes, not as one object (and
    one list slot) per fragment: what the client holds for an unfinished
    blob stays near the bytes its bound counts.
    """
    import tracemalloc

    from esf.client._inbox import ClientBlobs

    blobs = ClientBlobs()
    bodies = [
        m.BlobFragment(1, 7, i, False, b"%04d" % (i % 10_000)).encode() for i in range(50_000)
    ]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for body in bodies:  # decoded as they arrive, as the inbox does
            blobs.add("mallory", m.BlobFragment.decode(body), 0.0)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert blobs.buffered == 200_000
    # A list of the payloads held 50,000 x (an object of 37 bytes, 48 with
    # the allocator's rounding, and a slot of 8): 2.3 MB measured for 200 KB.
    assert held < 2 * 200_000, held


def test_a_refused_fragment_leaves_no_frame_in_the_log():
    """
    What the client logs about a sender's bad fragments is text: a kept
    log event (Twisted keeps the last 200 of a process that has not begun
    logging) must not keep the frame, the error's traceback or the dropped
    blob alive.
    """
    from esf.testing import LogCapture

    s = Setup()
    alice = s.logged_on("alice", handler=Recorder(), max_blob_bytes=250)
    mallory = s.logged_on("mallory")
    start_blob(mallory, "alice", 1, size=200)
    with LogCapture() as logs:
        refused = start_blob(mallory, "alice", 2, size=100)  # past max_blob_bytes
        failure(s.net, refused, RequestError)
        failure(
            s.net,
            mallory._request(  # of a blob that was dropped
                MessageType.BLOB, m.BlobFragment(1, 1, 1, False, b"x").encode(), dest="alice"
            ),
            RequestError,
        )
    assert alice.counters["blob_errors"] == 2
    events = [e for e in logs.events if e.get("log_namespace") == "esf.client"]
    assert len(events) == 2
    for event in events:
        for key, value in event.items():
            if not key.startswith("log_"):
                assert isinstance(value, (str, int)), (key, value)


def test_a_handler_failure_is_logged_without_its_frames(setup, logged_errors):
    """
    The failure of a handler given someone's blob is logged with its
    traceback as text: a kept event must not keep the handler's frames,
    and the payload in them, alive.
    """

    class Broken(Recorder):
        def handle_information(self, user_id, client_type, information_type, payload):
            raise ValueError("cannot read this")

    setup.logged_on("bob", handler=Broken())
    alice = setup.logged_on("alice")
    error = failure(
        setup.net, alice.send_blob("bob", 5, b"b" * 5000, fragment_size=1000), RequestError
    )
    assert error.code == ErrorCode.HANDLER_ERROR
    [event] = [e for e in logged_errors if "the client handler raised" in formatEvent(e)]
    logged = event["log_failure"]
    assert logged.tb is None and logged.value.__traceback__ is None
    assert "cannot read this" in logged.getTraceback()
    expect_logged(logged_errors, "the client handler raised")
