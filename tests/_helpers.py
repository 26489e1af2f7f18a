"""
Test doubles for driving an esf server engine without sockets or real time.

  - L{make_engine} builds a L{ServerEngine} on a fresh L{task.Clock}
    (C{engine.clock}); advance it to make time pass.
  - L{Client} is one connection: a L{ServerProtocol} from L{ServerFactory} on
    a L{StringTransport}.  It sends frames (L{Client.send}, L{Client.logon})
    and decodes what the server wrote (L{Client.take}).
  - L{connect} is a client that has logged on successfully.
  - L{record_events} appends every L{IUserManager} event to a list.
  - L{LogCapture} collects the structured log events of a test.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import attrs
from twisted.internet import task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from esf import AcceptAll, ServerConfig, ServerEngine, ServerFactory, testing
from esf.interfaces import IBasicHandler, ICustomizeHandler, IEngineAware, IGroupManager
from esf.wire import (
    REPLY_BODIES,
    SERVER_ID,
    FrameDecoder,
    Logon,
    LogonReply,
    LogonResult,
    MessageType,
    WireConfig,
    encode_frame,
)

__all__ = [
    "make_engine",
    "advance_to",
    "timers",
    "Received",
    "Client",
    "connect",
    "logon_reply",
    "USER_MANAGER_EVENTS",
    "record_events",
    "ident",
    "LogCapture",
    "PendingHandler",
    "RefuseAll",
    "REFUSE_ALL",
    "ACCEPT_ALL",
    "ECHO",
    "ROOMS",
]

_ports = itertools.count(5001)


def make_engine(
    *,
    handler: Any = None,
    presence: Any = None,
    start: bool = True,
    max_userid_length: int = 11,
    max_message_size: int = 1024 * 1024,
    **settings: Any,
) -> ServerEngine:
    """
    An engine whose clock is a new L{task.Clock} (C{engine.clock}).

    @param start: start the heartbeat scan (at clock time 0).
    @param settings: L{ServerConfig} fields; the two wire settings are given
        by name and go into its L{WireConfig}.
    """
    config = ServerConfig(wire=WireConfig(max_userid_length, max_message_size), **settings)
    engine = ServerEngine(config, clock=task.Clock(), handler=handler, presence=presence)
    if start:
        engine.start()
    return engine


def timers(engine: ServerEngine) -> list:
    """
    The delayed calls on C{engine}'s clock other than the heartbeat reaper's
    (which runs from the first connection until the engine stops).
    """
    return [c for c in engine.clock.getDelayedCalls() if "Reaper.scan" not in repr(c)]


def advance_to(clock: task.Clock, when: float) -> None:
    """
    Move C{clock} forward to the absolute time C{when}, stopping at the time
    of every delayed call on the way, so that each runs when it is due (as
    on an idle reactor) rather than all at C{when}.
    """
    while True:
        due = [c.getTime() for c in clock.getDelayedCalls() if c.getTime() <= when]
        target = min(due) if due else when
        amount = max(target - clock.seconds(), 0.0)
        while clock.seconds() + amount < target:  # float rounding
            amount = math.nextafter(amount, math.inf)
        clock.advance(amount)
        if not due:
            return


@attrs.frozen
class Received:
    """
    One frame the server wrote, its body decoded with L{REPLY_BODIES} (the
    raw body bytes for a type not listed there).
    """

    message_type: int
    body: Any
    message_id: int = 0
    user_id: str = SERVER_ID
    dest_user_id: str = ""
    client_type: int = 0
    raw: bytes = attrs.field(default=b"", eq=False, repr=False)


class Client:
    """
    One connection to C{engine}, over an in-memory transport.

    @ivar transport: the L{StringTransport}; C{transport.value()} holds
        everything the server ever wrote on it.
    @ivar protocol: the L{ServerProtocol}.
    @ivar address: the peer as the server sees it, C{"host:port"}.
    @ivar user_id: the UserID put in the header by default (set by
        L{logon}).
    """

    def __init__(
        self,
        engine: ServerEngine,
        host: str = "10.0.0.1",
        port: int | None = None,
        *,
        factory: ServerFactory | None = None,
        transport: StringTransport | None = None,
    ):
        """
        Connect to C{engine}, through C{factory} when given, on C{transport}
        (a new L{StringTransport} by default).
        """
        self.engine = engine
        self.wire: WireConfig = engine.config.wire
        port = next(_ports) if port is None else port
        if ":" in host:
            peer = IPv6Address("TCP", host, port)
            self.address = f"[{host}]:{port}"
        else:
            peer = IPv4Address("TCP", host, port)
            self.address = f"{host}:{port}"
        if transport is None:
            transport = StringTransport()
        transport.peerAddr = peer
        self.transport = transport
        self.protocol = (factory or ServerFactory(engine)).buildProtocol(peer)
        self.protocol.makeConnection(self.transport)
        self.user_id = ""
        self.client_type = 0
        self._decoder = FrameDecoder(self.wire)
        self._read = 0

    def __repr__(self) -> str:
        return f"<Client {self.user_id or '-'}/{self.client_type} {self.address}>"

    # -- sending --------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        """
        Deliver bytes to the server as if they arrived on the connection.
        """
        self.protocol.dataReceived(data)

    def frame(
        self,
        message_type: int,
        body: Any = b"",
        *,
        message_id: int = 0,
        dest: str = SERVER_ID,
        user_id: str | None = None,
        client_type: int | None = None,
    ) -> bytes:
        """
        Encode a frame from this client (UserID and ClientType default to
        the client's own); C{body} is bytes or a body object.
        """
        if not isinstance(body, (bytes, bytearray)):
            body = body.encode()
        return encode_frame(
            self.wire,
            message_type,
            body,
            client_type=self.client_type if client_type is None else client_type,
            message_id=message_id,
            user_id=self.user_id if user_id is None else user_id,
            dest_user_id=dest,
        )

    def send(self, message_type: int, body: Any = b"", **header: Any) -> bytes:
        """
        Send one frame (see L{frame}); return its bytes.
        """
        data = self.frame(message_type, body, **header)
        self.send_raw(data)
        return data

    def logon(
        self,
        user_id: str,
        client_type: int = 0,
        password: str = "pw",
        system_token: str = "",
        protocol_version: int = 1,
        message_id: int = 1,
    ) -> None:
        """
        Send a Logon; later frames carry C{user_id} and C{client_type}.
        """
        self.user_id = user_id
        self.client_type = client_type
        self.send(
            MessageType.LOGON,
            Logon(protocol_version, system_token, password),
            message_id=message_id,
        )

    def lose(self) -> None:
        """
        The connection is gone (as the reactor reports it).
        """
        self.protocol.connectionLost(Failure(ConnectionDone()))

    # -- receiving ------------------------------------------------------------

    def take(self) -> list[Received]:
        """
        The frames the server wrote since the last call, decoded.
        """
        data = self.transport.value()
        chunk, self._read = data[self._read :], len(data)
        out = []
        for frame in self._decoder.feed(chunk):
            body_class = REPLY_BODIES.get(frame.message_type)
            body = body_class.decode(frame.body) if body_class else bytes(frame.body)
            out.append(
                Received(
                    frame.message_type,
                    body,
                    frame.message_id,
                    frame.user_id,
                    frame.dest_user_id,
                    frame.client_type,
                    frame.raw,
                )
            )
        assert self._decoder.buffered == 0, "the server wrote a partial frame"
        return out

    @property
    def closing(self) -> bool:
        """
        Whether the server asked the transport to close (C{loseConnection}).
        """
        return self.transport.disconnecting

    @property
    def aborted(self) -> bool:
        """
        Whether the server aborted the transport (C{abortConnection}).
        """
        return self.transport.disconnected

    @property
    def ident(self) -> tuple:
        """
        How L{record_events} shows this client's L{esf.UserData}.
        """
        return (self.user_id, self.client_type, self.address)


def logon_reply(
    engine: ServerEngine, result: LogonResult = LogonResult.SUCCEED, cause: str = ""
) -> LogonReply:
    """
    The Logon reply body C{engine} sends with C{result}.
    """
    config = engine.config
    return LogonReply(
        result,
        cause,
        config.heartbeat_interval,
        config.heartbeat_timeout,
        config.wire.max_message_size,
    )


def connect(
    engine: ServerEngine,
    user_id: str,
    client_type: int = 0,
    host: str = "10.0.0.1",
    **logon: Any,
) -> Client:
    """
    A client that has logged on as C{user_id}; its Logon reply is consumed.
    """
    client = Client(engine, host)
    client.logon(user_id, client_type, **logon)
    replies = client.take()
    assert [(r.message_type, r.body) for r in replies] == [
        (MessageType.LOGON, logon_reply(engine))
    ], replies
    return client


#: The event attributes of L{IUserManager}.
USER_MANAGER_EVENTS = (
    "user_connected",
    "user_disconnected",
    "device_connected",
    "device_disconnected",
    "device_being_pushed_out",
    "new_connection_ignored",
    "user_count_changed",
    "heartbeat_timed_out",
)


def ident(value: Any) -> Any:
    """
    A L{esf.UserData} as C{(user_id, client_type, address)}; anything else
    as it is.
    """
    if hasattr(value, "logon_time"):
        return (value.user_id, value.client_type, value.address)
    return value


def record_events(user_manager: Any) -> list[tuple]:
    """
    Subscribe to every user-manager event; return the list that receives
    C{(event_name, *arguments)} tuples, user data shown by L{ident}.
    """
    return testing.EventRecorder(user_manager, USER_MANAGER_EVENTS, convert=ident).events


class LogCapture(testing.LogCapture):
    """
    Collects every event sent to the global log publisher while started
    (L{esf.testing.LogCapture} of every namespace).
    """

    def __init__(self) -> None:
        super().__init__(namespace=None)

    def esf(self, esf_event: str) -> list[dict]:
        """
        The captured events whose C{esf_event} field is C{esf_event}.
        """
        return self.esf_events(esf_event)

    def failures(self) -> list[dict]:
        """
        The captured events that carry a failure (C{log.failure}).
        """
        return [e for e in self.events if "log_failure" in e]


@implementer(IBasicHandler)
class PendingHandler:
    """
    A handler whose answers the test gives: every call returns a new
    Deferred, kept with its arguments in C{verifications} or C{kicks}.
    """

    def __init__(self):
        self.verifications: list[tuple] = []
        self.kicks: list[tuple] = []

    def verify_user(self, system_token, user_id, password, client_type, address):
        d = Deferred()
        self.verifications.append(((system_token, user_id, password, client_type, address), d))
        return d

    def can_kick_out(self, operator_id, target_id, client_type):
        d = Deferred()
        self.kicks.append(((operator_id, target_id, client_type), d))
        return d

    def pending(self, address: str):
        """
        The Deferred of the verification asked for by the peer C{address}.
        """
        (d,) = [d for args, d in self.verifications if args[4] == address]
        return d


@implementer(IBasicHandler)
class RefuseAll:
    """
    Refuses every logon and every kick (importable as C{_helpers:REFUSE_ALL}
    for C{--handler}).
    """

    def verify_user(self, system_token, user_id, password, client_type, address):
        return False

    def can_kick_out(self, operator_id, target_id, client_type):
        return False


REFUSE_ALL = RefuseAll()

#: Another IBasicHandler (for C{--handler} given twice for one interface).
ACCEPT_ALL = AcceptAll()


@implementer(ICustomizeHandler, IEngineAware)
class Echo:
    """
    Answers every query with its payload; remembers the engines it was
    given (importable as C{_helpers:ECHO}).
    """

    def __init__(self):
        self.engines: list = []

    def initialize(self, engine):
        self.engines.append(engine)

    def handle_information(self, user_id, client_type, information_type, payload):
        pass

    def handle_query(self, user_id, client_type, information_type, payload):
        return payload


@implementer(IGroupManager, IEngineAware)
class Rooms:
    """
    One group, C{"room"}, of alice and bob (importable as C{_helpers:ROOMS}).
    """

    def __init__(self):
        self.engines: list = []

    def initialize(self, engine):
        self.engines.append(engine)

    def get_members(self, group_id):
        return ["alice", "bob"] if group_id == "room" else []

    def can_broadcast(self, user_id, group_id):
        return group_id == "room"


ECHO = Echo()
ROOMS = Rooms()
