"""
The server engine: sessions, the user manager, routing and the framework
messages of the ESF v1 contract.

The engine never touches a transport.  A connection is an L{IChannel} (the
protocol provides one); the engine hands it bytes to write and tells it when
to close.  Time comes from an injected L{IReactorTime}.
"""

from __future__ import annotations

import collections
import inspect
import itertools
from enum import Enum
from typing import Any, Callable

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import _messages as m
from ._wire import (
    DEFAULT_MAX_MESSAGE_SIZE,
    DEVICE_MARK,
    EVERYONE_ID,
    SERVER_ID,
    ClientType,
    DisconnectedType,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameError,
    LogonResult,
    MessageType,
    WireConfig,
    device_address,
    encode_frame,
)
from .interfaces import (
    IBasicHandler,
    IChannel,
    ICustomizeHandler,
    IEvent,
    IGroupManager,
    IPresence,
    IUserManager,
)

__all__ = [
    "RelogonMode",
    "ServerConfig",
    "UserData",
    "LogonRefused",
    "Event",
    "AcceptAll",
    "LocalPresence",
    "UserManager",
    "ServerEngine",
    "Session",
    "call",
]

log = Logger(namespace="esf.server")

#: Frames a peer may send before it has logged on are at most this big: an
#: unauthenticated peer cannot make the server reserve a full-size body.
PRE_LOGON_MAX_MESSAGE_SIZE = 64 * 1024

_RESERVED_IDS = frozenset({SERVER_ID, EVERYONE_ID, ""})


#: DestUserIDs that address the server itself.
_TO_SERVER = frozenset({SERVER_ID, ""})

#: DestUserIDs that are not a plain user's (the relay's fast path skips them).
_NOT_A_PLAIN_USER = _RESERVED_IDS | _TO_SERVER

#: Message types that a DestUserID other than the server's relays to a user.
_RELAYED = frozenset(
    {
        MessageType.PING_ACK,
        MessageType.SEND,
        MessageType.REQUEST,
        MessageType.RESPONSE,
        MessageType.SEND_CERTAINLY,
        MessageType.ACK,
        MessageType.ERROR,
        MessageType.BLOB,
    }
)

#: Reasons whose notice is the BeingPushedOut / BeingKickedOut message
#: itself, and reasons where the peer asked for the close.
_PEER_INITIATED = frozenset({DisconnectedType.NETWORK_INTERRUPTED, DisconnectedType.LOGGED_OFF})


#: Most keys (hosts, devices) a rate limiter tracks; past it, the oldest go.
_MAX_TRACKED_KEYS = 100_000


class SlidingWindow:
    """
    Counts events per key over the last C{window} seconds, up to C{limit} + 1
    (more need not be told apart), for at most C{max_keys} keys (the least
    recently seen are forgotten first).
    """

    def __init__(self, window: float, limit: int, max_keys: int = _MAX_TRACKED_KEYS):
        self.window = window
        self.limit = limit
        self.max_keys = max_keys
        self._hits: dict[Any, collections.deque] = {}

    def hit(self, key: Any, now: float) -> int:
        """
        Record an event; return how many fell in the window, this one
        included.
        """
        hits = self._hits.pop(key, None)
        if hits is None:
            hits = collections.deque()
            if len(self._hits) >= self.max_keys:
                del self._hits[next(iter(self._hits))]
        self._hits[key] = hits  # now the most recently seen
        deadline = now - self.window
        while hits and hits[0] <= deadline:
            hits.popleft()
        if len(hits) <= self.limit:
            hits.append(now)
        return len(hits)


class RelogonMode(Enum):
    """
    What a second logon of the same user and device kind does.
    """

    #: Keep the session that is on; refuse the new one with C{HadLoggedOn}.
    IGNORE_NEW = "ignore-new"
    #: Push the old session out and bind the new one (the default).
    REPLACE_OLD = "replace-old"


class LogonRefused(Exception):
    """
    Raised by L{IBasicHandler.verify_user} to refuse a logon with a cause
    that the client sees.
    """

    def __init__(self, cause: str = "logon refused"):
        super().__init__(cause)
        self.cause = cause


def call(f: Callable, *args: Any) -> Deferred:
    """
    Call an application method that may answer synchronously, with a
    Deferred or as a coroutine; always return a Deferred.
    """
    try:
        result = f(*args)
    except BaseException:
        return fail()
    if isinstance(result, Deferred):
        return result
    if inspect.isawaitable(result):
        return Deferred.fromCoroutine(result)
    return succeed(result)


@implementer(IEvent)
class Event:
    """
    A list of subscribers, called in order; a subscriber's exception is
    logged and goes no further.
    """

    def __init__(self, name: str):
        self.name = name
        self._subscribers: list[Callable] = []

    def subscribe(self, callback: Callable) -> Callable[[], None]:
        self._subscribers.append(callback)
        return lambda: self.unsubscribe(callback)

    def unsubscribe(self, callback: Callable) -> None:
        try:
            self._subscribers.remove(callback)
        except ValueError:
            pass

    def fire(self, *args: Any) -> None:
        for callback in list(self._subscribers):
            try:
                callback(*args)
            except Exception:
                log.failure(
                    "subscriber {callback!r} of {event} raised",
                    callback=callback,
                    event=self.name,
                )

    def __repr__(self) -> str:
        return f"<Event {self.name} ({len(self._subscribers)} subscribers)>"


@implementer(IBasicHandler)
class AcceptAll:
    """
    The handler used when the application gives none: every logon is
    accepted and nobody may kick.
    """

    def verify_user(self, system_token, user_id, password, client_type, address):
        return True

    def can_kick_out(self, operator_id, target_id, client_type):
        return False


def _positive(instance, attribute, value):
    if value is not None and value <= 0:
        raise ValueError(f"{attribute.name} must be positive, not {value}")


@attrs.frozen
class ServerConfig:
    """
    The server's settings (the C{twistd esf} options).
    """

    wire: WireConfig = attrs.field(factory=WireConfig)
    relogon_mode: RelogonMode = RelogonMode.REPLACE_OLD
    heartbeat_interval: int = attrs.field(default=10, validator=_positive)
    heartbeat_timeout: int = attrs.field(default=30, validator=_positive)
    logon_timeout: float = attrs.field(default=10, validator=_positive)
    system_token: str = ""
    admins: frozenset = attrs.field(default=frozenset(), converter=frozenset)
    max_connections: int | None = attrs.field(default=None, validator=_positive)
    #: Device kinds allowed to log on.
    client_types: frozenset = attrs.field(
        default=frozenset(ClientType), converter=frozenset
    )
    #: Bytes that may wait for a peer that does not read, beyond the
    #: transport's own buffer, before its session ends with
    #: ChannelCacheOverflow.
    max_output_buffer: int = attrs.field(default=2 * DEFAULT_MAX_MESSAGE_SIZE, validator=_positive)
    #: Seconds a closing connection has to take its last bytes before it
    #: is aborted.
    close_timeout: float = attrs.field(default=5, validator=_positive)
    #: Largest reassembled Blob addressed to the server, in bytes.
    max_blob_size: int = attrs.field(default=64 * 1024 * 1024, validator=_positive)
    #: Blobs one session may have in progress at once.
    max_concurrent_blobs: int = attrs.field(default=4, validator=_positive)
    #: Seconds an incomplete Blob may wait for its next fragment.
    blob_idle_timeout: float = attrs.field(default=60, validator=_positive)
    #: Seconds L{ServerEngine.query} waits for an answer.
    query_timeout: float = attrs.field(default=30, validator=_positive)
    #: Logons one host may attempt per C{logon_rate_window} seconds; more
    #: are answered C{Busy}.
    logon_rate_limit: int = attrs.field(default=200, validator=_positive)
    logon_rate_window: float = attrs.field(default=10, validator=_positive)
    #: Takeovers (C{REPLACE_OLD}) of one user's device allowed per
    #: C{takeover_window} seconds; one more refuses that device with
    #: C{Busy} for C{takeover_cooldown} seconds.
    takeover_limit: int = attrs.field(default=5, validator=_positive)
    takeover_window: float = attrs.field(default=60, validator=_positive)
    takeover_cooldown: float = attrs.field(default=60, validator=_positive)

    @heartbeat_timeout.validator
    def _check_timeout(self, attribute, value):
        if value <= self.heartbeat_interval:
            raise ValueError(
                f"heartbeat_timeout ({value}) must exceed heartbeat_interval "
                f"({self.heartbeat_interval})"
            )


@attrs.define(eq=False)
class UserData:
    """
    One logged-on device, as applications see it.

    @ivar tag: free for the application; the only field it should change.
    """

    user_id: str
    client_type: int
    address: str
    logon_time: float
    tag: Any = None


class _State(Enum):
    AWAITING_LOGON = "awaiting logon"
    VERIFYING = "verifying"
    LOGGED_ON = "logged on"
    ENDED = "ended"


class Session:
    """
    The engine's side of one connection, from accept to close.

    The protocol feeds it bytes (L{data_received}) and flow-control signals
    (L{pause_writing}, L{resume_writing}) and tells it when the connection
    is gone (L{connection_lost}).
    """

    __slots__ = (
        "engine",
        "channel",
        "address",
        "decoder",
        "state",
        "user_id",
        "client_type",
        "user_data",
        "attempt",
        "connected_at",
        "active",
        "last_active",
        "_logon_timer",
        "_paused",
        "_backlog",
        "_heartbeat_echo",
        "blobs",
        "queries",
        "_out",
        "__weakref__",
    )

    def __init__(self, engine: ServerEngine, channel: IChannel, attempt: int):
        self.engine = engine
        self.channel = channel
        self.address = channel.address
        self.decoder = FrameDecoder(
            engine.config.wire,
            max_message_size=min(PRE_LOGON_MAX_MESSAGE_SIZE, engine.config.wire.max_message_size),
        )
        self.state = _State.AWAITING_LOGON
        self.user_id: str | None = None
        self.client_type: int | None = None
        self.user_data: UserData | None = None
        self.attempt = attempt
        self.connected_at = engine.clock.seconds()
        self.active = False
        self.last_active = self.connected_at
        self._logon_timer = None
        self._paused = False
        self._backlog = 0
        self._heartbeat_echo = b""
        #: Blobs addressed to the server, being reassembled (made on demand).
        self.blobs: m.BlobAssembler | None = None
        #: MessageIDs of the server's queries waiting for this session
        #: (made on demand: most sessions are never asked anything).
        self.queries: set[int] | None = None
        #: Output gathered during a read, written by L{flush}.
        self._out: list[bytes] | None = None

    def __repr__(self) -> str:
        who = f"{self.user_id}/{self.client_type}" if self.user_id is not None else "-"
        return f"<Session {who} {self.address} {self.state.value}>"

    @property
    def logged_on(self) -> bool:
        return self.state is _State.LOGGED_ON

    @property
    def ended(self) -> bool:
        return self.state is _State.ENDED

    # -- input from the protocol --------------------------------------------

    def data_received(self, data: bytes) -> None:
        """
        Bytes arrived from the peer.
        """
        self.active = True
        engine = self.engine
        error = None
        try:
            frames = self.decoder.feed(data)
        except FrameError as e:
            frames, error = e.frames, e
        # Output to every session is gathered while this read's frames are
        # handled and written once per session afterwards: a read of many
        # small frames costs each receiver one transport write, not many.
        outermost = engine._batch is None
        if outermost:
            engine._batch = []
        try:
            frame_received = engine.frame_received
            devices = engine.presence.devices
            logged_on = _State.LOGGED_ON
            for frame in frames:
                state = self.state
                if (
                    state is logged_on
                    and frame.message_type in _RELAYED
                    and frame.user_id == self.user_id
                ):
                    # The relay's common case, inline: a plain user ID that
                    # is online.  Everything else takes frame_received.
                    dest = frame.dest_user_id
                    if dest not in _NOT_A_PLAIN_USER and DEVICE_MARK not in dest:
                        targets = devices(dest)
                        if targets:
                            raw = frame.raw
                            for target in targets:
                                target.send(raw)
                            continue
                elif state is _State.ENDED:
                    return
                frame_received(self, frame)
            if error is not None:
                self.end(error.reason, error.message)
        finally:
            if outermost:
                engine._flush()

    def connection_lost(self) -> None:
        """
        The connection is gone; end the session if it has not ended yet.
        """
        self.end(DisconnectedType.NETWORK_INTERRUPTED, "connection lost")
        self.engine._connection_closed(self)

    def pause_writing(self) -> None:
        """
        The transport's buffer is full: the peer is not reading fast enough.
        """
        self._paused = True

    def resume_writing(self) -> None:
        """
        The transport's buffer has drained.
        """
        self._paused = False
        self._backlog = 0

    # -- output -------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """
        Write a frame to the peer, unless the session has ended.  Past the
        output bound the session ends with C{ChannelCacheOverflow}.
        """
        if self.state is _State.ENDED:
            return
        if self._paused:
            self._backlog += len(data)
            if self._backlog > self.engine.config.max_output_buffer:
                self.end(
                    DisconnectedType.CHANNEL_CACHE_OVERFLOW,
                    f"more than {self.engine.config.max_output_buffer} bytes wait "
                    f"for a peer that does not read",
                )
                return
        out = self._out
        if out is not None:
            out.append(data)
            return
        batch = self.engine._batch
        if batch is not None:
            self._out = [data]
            batch.append(self)
            return
        try:
            self.channel.write(data)
        except Exception:
            self._write_failed()

    def flush(self) -> None:
        """
        Write the output gathered for this session during a read.
        """
        out = self._out
        if out is None:
            return
        self._out = None
        try:
            self.channel.write(out[0] if len(out) == 1 else b"".join(out))
        except Exception:
            self._write_failed()

    def _write_failed(self) -> None:
        # Twisted's transports do not raise on write; a channel that does
        # is treated as a connection that went away, never as an error of
        # whoever was sending.
        log.failure("writing to {session!r} failed", session=self)
        self.end(DisconnectedType.NETWORK_INTERRUPTED, "writing to the connection failed")

    def reply(self, frame: Frame, body: bytes, message_type: int | None = None) -> None:
        """
        Answer C{frame}: same MessageType (unless given) and MessageID, from
        the server to this session's user.
        """
        self.send(
            encode_frame(
                self.engine.config.wire,
                frame.message_type if message_type is None else message_type,
                body,
                message_id=frame.message_id,
                user_id=SERVER_ID,
                dest_user_id=self.user_id or "",
            )
        )

    def error(self, frame: Frame, code: ErrorCode, text: str) -> None:
        """
        Answer a request with C{Error}; a one-way message (MessageID 0) is
        logged instead, since nothing waits for an answer.
        """
        if frame.message_id:
            body = m.Error(frame.message_type, code, text[:1000]).encode()
            self.reply(frame, body, MessageType.ERROR)
        else:
            # Debug only: a peer must not be able to fill the log.
            self.engine.counters["dropped"] += 1
            log.debug(
                "dropped {message_type} from {session!r}: {code.name}: {text}",
                message_type=frame.message_type,
                session=self,
                code=code,
                text=text,
            )

    def notify(self, message_type: int, body: bytes = b"", client_type: int = 0) -> None:
        """
        Send the peer a server-initiated message (MessageID 0).
        """
        self.send(
            encode_frame(
                self.engine.config.wire,
                message_type,
                body,
                client_type=client_type,
                user_id=SERVER_ID,
                dest_user_id=self.user_id or "",
            )
        )

    # -- ending ---------------------------------------------------------------

    def end(self, reason: DisconnectedType, text: str = "") -> None:
        """
        End the session, exactly once: unbind it (firing the user manager's
        events), log one event, and, unless the peer ended it, send a
        C{DisconnectNotice} and close the connection.
        """
        if self.state is _State.ENDED:
            return
        self.flush()  # what was sent before the end arrives before the notice
        was_logged_on = self.state is _State.LOGGED_ON
        self.state = _State.ENDED
        if self._logon_timer is not None and self._logon_timer.active():
            self._logon_timer.cancel()
        self._logon_timer = None
        engine = self.engine
        engine._session_ended(self, reason, text, was_logged_on)
        try:
            if reason not in _PEER_INITIATED:
                notice = m.DisconnectNotice(reason, text[:1000]).encode()
                # Written directly: the output bound no longer matters, and
                # the close timeout bounds how long it may take.
                self.channel.write(
                    encode_frame(
                        engine.config.wire,
                        MessageType.DISCONNECT_NOTICE,
                        notice,
                        user_id=SERVER_ID,
                        dest_user_id=self.user_id or "",
                    )
                )
            self.channel.close()
        except Exception:
            log.failure("closing {session!r} failed", session=self)


@implementer(IPresence)
class LocalPresence:
    """
    The in-process registry: this node's own sessions.
    """

    def __init__(self):
        # user ID -> that user's handles in logon order.  A tuple: the relay
        # reads it for every message and must not copy it, and a handle may
        # leave while a caller is still iterating over it.
        self._users: dict[str, tuple] = {}

    def get(self, user_id, client_type):
        for handle in self._users.get(user_id, ()):
            if handle.client_type == client_type:
                return handle
        return None

    def devices(self, user_id):
        return self._users.get(user_id, ())

    def add(self, handle):
        devices = self._users.get(handle.user_id, ())
        self._users[handle.user_id] = devices + (handle,)
        return not devices

    def remove(self, handle):
        devices = self._users.get(handle.user_id, ())
        if handle not in devices:
            return False
        rest = tuple(h for h in devices if h is not handle)
        if rest:
            self._users[handle.user_id] = rest
            return False
        del self._users[handle.user_id]
        return True

    def user_ids(self):
        return sorted(self._users)

    def user_count(self):
        return len(self._users)


@implementer(IUserManager)
class UserManager:
    """
    The online users, read from an L{IPresence}, and the events applications
    subscribe to.
    """

    def __init__(self, presence: IPresence, relogon_mode: RelogonMode = RelogonMode.REPLACE_OLD):
        self.presence = presence
        self.relogon_mode = relogon_mode
        self.user_connected = Event("user_connected")
        self.user_disconnected = Event("user_disconnected")
        self.device_connected = Event("device_connected")
        self.device_disconnected = Event("device_disconnected")
        self.device_being_pushed_out = Event("device_being_pushed_out")
        self.new_connection_ignored = Event("new_connection_ignored")
        self.user_count_changed = Event("user_count_changed")
        self.heartbeat_timed_out = Event("heartbeat_timed_out")

    @property
    def user_count(self) -> int:
        return self.presence.user_count()

    def is_user_online(self, user_id: str) -> bool:
        return bool(self.presence.devices(user_id))

    def get_user_data(self, user_id: str, client_type: int | None = None) -> UserData | None:
        if client_type is None:
            devices = self.presence.devices(user_id)
            return devices[0].user_data if devices else None
        handle = self.presence.get(user_id, client_type)
        return handle.user_data if handle is not None else None

    def get_online_user_list(self) -> list[str]:
        return self.presence.user_ids()

    def get_all_user_data(self) -> list[UserData]:
        return [
            handle.user_data
            for user_id in self.presence.user_ids()
            for handle in self.presence.devices(user_id)
        ]

    def get_all_login_devices(self, user_id: str) -> list[ClientType | int]:
        return [_client_type(h.client_type) for h in self.presence.devices(user_id)]


def _client_type(value: int) -> ClientType | int:
    try:
        return ClientType(value)
    except ValueError:
        return value


def _kind_name(client_type: int) -> str:
    """
    C{"ANDROID (5)"}, or C{"42"} for a kind without a name.
    """
    kind = _client_type(client_type)
    return f"{kind.name} ({int(kind)})" if isinstance(kind, ClientType) else str(kind)


def _address(peer) -> str:
    """
    C{"host:port"} for an address object, C{"[host]:port"} for IPv6.
    """
    host = getattr(peer, "host", None)
    if host is None:
        return str(peer)
    if ":" in host:
        return f"[{host}]:{peer.port}"
    return f"{host}:{peer.port}"


class ServerEngine:
    """
    The server side of ESF v1 (ESFramework's C{RapidServerEngine}).

    @ivar user_manager: the L{IUserManager} applications read and subscribe
        to.
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        clock: IReactorTime,
        handler: IBasicHandler | None = None,
        customize_handler: ICustomizeHandler | None = None,
        group_manager: IGroupManager | None = None,
        presence: IPresence | None = None,
    ):
        self.config = config = config or ServerConfig()
        self.clock = clock
        self.handler = handler if handler is not None else AcceptAll()
        self.customize_handler = customize_handler
        self.group_manager = group_manager
        #: L{Event}: C{(sender_id, dest_user_id, message_type, raw)}: a message
        #: addressed to a user could not be delivered because the user is not
        #: online; the hook for an offline store.
        self.transmit_failed = Event("transmit_failed")
        #: Counts of what did not go as asked, by cause.
        self.counters: collections.Counter = collections.Counter()
        self._queries: dict[int, tuple[Session, Deferred, Any]] = {}
        self._message_ids = itertools.count(1)
        #: While a read is handled: the sessions with gathered output.
        self._batch: list[Session] | None = None
        self._logon_rate = SlidingWindow(config.logon_rate_window, config.logon_rate_limit)
        self._takeovers = SlidingWindow(config.takeover_window, config.takeover_limit)
        self._takeover_blocked: dict[tuple, float] = {}
        self.presence = presence if presence is not None else LocalPresence()
        self.user_manager = UserManager(self.presence, config.relogon_mode)
        #: Sessions not yet ended.
        self.sessions: set[Session] = set()
        #: Sessions whose connection is not yet closed.
        self._open: set[Session] = set()
        self._drained: list[Deferred] = []
        self._attempts = itertools.count(1)
        self._stopping = False
        self._scan = LoopingCall(self._scan_heartbeats)
        self._scan.clock = clock
        self._dispatch = {
            MessageType.HEARTBEAT: self._on_heartbeat,
            MessageType.GET_MY_IPE: self._on_get_my_ipe,
            MessageType.PING_BY_SERVER: self._on_ping_by_server,
            MessageType.PING_ACK: self._on_relay,
            MessageType.LOGOFF: self._on_logoff,
            MessageType.KICK_OUT: self._on_kick_out,
            MessageType.GET_ALL_ONLINE_USERS: self._on_get_all_online_users,
            MessageType.QUERY_ONLINE: self._on_query_online,
            MessageType.QUERY_ONLINES: self._on_query_onlines,
            MessageType.GET_MY_DEVICES: self._on_get_my_devices,
            MessageType.LOGON: self._on_second_logon,
            MessageType.SEND: self._on_send,
            MessageType.REQUEST: self._on_request,
            MessageType.RESPONSE: self._on_response,
            MessageType.SEND_CERTAINLY: self._on_send,
            MessageType.ACK: self._on_ack,
            MessageType.ERROR: self._on_response,
            MessageType.BLOB: self._on_blob,
            MessageType.BROADCAST: self._on_broadcast,
        }

    # -- life -------------------------------------------------------------

    def start(self) -> None:
        """
        Start the heartbeat scan: every quarter of the timeout, so a silent
        session ends between 1x and 1.5x the timeout after its last frame.
        """
        if not self._scan.running:
            self._scan.start(self.config.heartbeat_timeout / 4, now=False)

    def stop(self) -> Deferred:
        """
        Send C{DisconnectNotice(ServerShutdown)} to every session and close
        them; refuse new connections.

        @return: a Deferred that fires when every connection has closed.
        """
        self._stopping = True
        if self._scan.running:
            self._scan.stop()
        for session in list(self.sessions):
            session.end(DisconnectedType.SERVER_SHUTDOWN, "the server is shutting down")
        if not self._open:
            return succeed(None)
        d = Deferred()
        self._drained.append(d)
        return d

    # -- connections ----------------------------------------------------------

    def connection_made(self, channel: IChannel) -> Session:
        """
        A peer connected; return the session the protocol will feed.
        """
        session = Session(self, channel, next(self._attempts))
        self.sessions.add(session)
        self._open.add(session)
        if self._stopping:
            session.end(DisconnectedType.SERVER_SHUTDOWN, "the server is shutting down")
            return session
        limit = self.config.max_connections
        if limit is not None and len(self.sessions) > limit:
            session.end(
                DisconnectedType.MAX_CONNECTION_COUNT_LIMITTED,
                f"the server holds its maximum of {limit} connections; try later",
            )
            return session
        session._logon_timer = self.clock.callLater(
            self.config.logon_timeout, self._logon_timed_out, session
        )
        return session

    def _flush(self) -> None:
        batch, self._batch = self._batch, None
        for session in batch:
            session.flush()

    def _connection_closed(self, session: Session) -> None:
        self._open.discard(session)
        if self._stopping and not self._open:
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)

    def _logon_timed_out(self, session: Session) -> None:
        session._logon_timer = None
        text = f"no logon within {self.config.logon_timeout:g} s"
        if session.decoder.buffered:
            # Bytes that never made a whole frame: most likely a client whose
            # header is shorter than this server's.  Say which one we expect.
            wire = self.config.wire
            text += (
                f"; {session.decoder.buffered} bytes arrived that are not a whole frame "
                f"(this server expects {wire.header_length}-byte headers, max UserID "
                f"length {wire.max_userid_length})"
            )
        session.end(DisconnectedType.LOGON_TIMEOUT, text)

    def _session_ended(
        self, session: Session, reason: DisconnectedType, text: str, was_logged_on: bool
    ) -> None:
        self.sessions.discard(session)
        if was_logged_on:
            self._unbind(session, reason)
        if session.queries:
            self._fail_queries(session)
        session.blobs = None
        log.info(
            "session ended: {user_id}/{client_type} from {address}: {reason} "
            "({text}) after {duration:.1f} s",
            esf_event="session_ended",
            user_id=session.user_id,
            client_type=session.client_type,
            address=session.address,
            reason=reason.name,
            reason_code=int(reason),
            text=text,
            duration=self.clock.seconds() - session.connected_at,
            logged_on=was_logged_on,
        )

    # -- frames -----------------------------------------------------------------

    def frame_received(self, session: Session, frame: Frame) -> None:
        """
        Dispatch one frame from C{session}.
        """
        if session.state is not _State.LOGGED_ON:
            self._before_logon(session, frame)
            return
        if frame.user_id != session.user_id:
            session.end(
                DisconnectedType.MESSAGE_WITH_WRONG_USER_ID,
                f"frame from {frame.user_id!r} on the session of {session.user_id!r}",
            )
            return
        if frame.message_type in _RELAYED and frame.dest_user_id not in _TO_SERVER:
            self._on_relay(session, frame)
            return
        handler = self._dispatch.get(frame.message_type)
        if handler is None:
            session.error(
                frame,
                ErrorCode.UNKNOWN_MESSAGE_TYPE,
                f"unknown message type {frame.message_type}",
            )
            return
        try:
            handler(session, frame)
        except m.BadRequest as e:
            session.error(frame, ErrorCode.BAD_REQUEST, str(e))

    def _before_logon(self, session: Session, frame: Frame) -> None:
        if frame.message_type != MessageType.LOGON:
            session.end(
                DisconnectedType.NOT_LOGGED_ON,
                f"message type {frame.message_type} before logon; log on first",
            )
            return
        if session.state is _State.VERIFYING:
            session.end(DisconnectedType.INVALID_MESSAGE, "a second Logon while the first is verified")
            return
        try:
            logon = m.Logon.decode(frame.body)
        except m.BadRequest as e:
            # Before logon a Logon body that does not parse is far more
            # likely a header of another length than a client bug: say so.
            wire = self.config.wire
            session.end(
                DisconnectedType.INVALID_MESSAGE,
                f"malformed Logon body ({e}); this server expects "
                f"{wire.header_length}-byte headers, max UserID length "
                f"{wire.max_userid_length}: do both sides agree?",
            )
            return
        self._logon(session, frame, logon)

    # -- logon ------------------------------------------------------------------

    def _logon(self, session: Session, frame: Frame, logon: m.Logon) -> None:
        config = self.config
        user_id, client_type = frame.user_id, frame.client_type
        session.user_id = user_id
        session.client_type = client_type
        if logon.protocol_version != m.PROTOCOL_VERSION:
            self._refuse(
                session,
                frame,
                LogonResult.VERSION_MISMATCHED,
                f"this server speaks protocol version {m.PROTOCOL_VERSION}, "
                f"not {logon.protocol_version}",
            )
            return
        if config.system_token and logon.system_token != config.system_token:
            self._refuse(session, frame, LogonResult.VERSION_MISMATCHED, "wrong system token")
            return
        if user_id in _RESERVED_IDS or DEVICE_MARK in user_id:
            self._refuse(
                session,
                frame,
                LogonResult.FAILED,
                f"user ID {user_id!r} is reserved (as are IDs holding {DEVICE_MARK!r})",
            )
            return
        if client_type not in config.client_types:
            self._refuse(
                session,
                frame,
                LogonResult.CLIENT_TYPE_REJECTED,
                f"device kind {client_type} is not allowed here",
                DisconnectedType.UNAUTHORIZED_CLIENT_TYPE,
            )
            return
        host = session.address.rpartition(":")[0]
        now = self.clock.seconds()
        if self._logon_rate.hit(host, now) > config.logon_rate_limit:
            self.counters["logons_rate_limited"] += 1
            self._refuse(
                session,
                frame,
                LogonResult.BUSY,
                f"more than {config.logon_rate_limit} logons from {host} within "
                f"{config.logon_rate_window:g} s; try later",
            )
            return
        blocked_until = self._takeover_blocked.get((user_id, client_type), 0)
        if blocked_until > now:
            self._refuse(
                session,
                frame,
                LogonResult.BUSY,
                f"{user_id} took this device over too often; try again in "
                f"{blocked_until - now:.0f} s",
            )
            return
        session.state = _State.VERIFYING
        d = call(
            self.handler.verify_user,
            logon.system_token,
            user_id,
            logon.password,
            _client_type(client_type),
            session.address,
        )
        d.addBoth(self._verified, session, frame)

    def _verified(self, outcome: Any, session: Session, frame: Frame) -> None:
        if session.state is not _State.VERIFYING:
            return  # the connection went away meanwhile
        if isinstance(outcome, Failure):
            if outcome.check(LogonRefused):
                cause = outcome.value.cause
            else:
                log.failure(
                    "verify_user raised for {user_id}", outcome, user_id=session.user_id
                )
                cause = "logon verification failed"
            self._refuse(session, frame, LogonResult.FAILED, cause)
            return
        if not outcome:
            self._refuse(session, frame, LogonResult.FAILED, "invalid user ID or password")
            return
        old = self.presence.get(session.user_id, session.client_type)
        if old is not None:
            if self.user_manager.relogon_mode is RelogonMode.IGNORE_NEW:
                self.user_manager.new_connection_ignored.fire(
                    session.user_id, _client_type(session.client_type), session.address
                )
                self._refuse(
                    session,
                    frame,
                    LogonResult.HAD_LOGGED_ON,
                    f"{session.user_id} is already logged on with this device "
                    f"from {old.user_data.address}",
                    DisconnectedType.NEW_CONNECTION_IGNORED,
                )
                return
            if getattr(old, "attempt", 0) > session.attempt:
                # A newer logon of the same device was verified first: it
                # stands, and this older attempt is the one replaced.
                self._refuse(
                    session,
                    frame,
                    LogonResult.FAILED,
                    f"superseded by a newer logon of this device from {old.user_data.address}",
                )
                return
            if not self._count_takeover(session):
                self._refuse(
                    session,
                    frame,
                    LogonResult.BUSY,
                    f"{session.user_id} took this device over more than "
                    f"{self.config.takeover_limit} times within "
                    f"{self.config.takeover_window:g} s; try again in "
                    f"{self.config.takeover_cooldown:g} s",
                )
                return
            self._push_out(old, session)
        self._bind(session, frame, handover=old is not None)

    def _refuse(
        self,
        session: Session,
        frame: Frame,
        result: LogonResult,
        cause: str,
        reason: DisconnectedType | None = None,
    ) -> None:
        if reason is None:
            reason = (
                DisconnectedType.NEW_CONNECTION_IGNORED
                if result is LogonResult.HAD_LOGGED_ON
                else DisconnectedType.LOGON_FAILED
            )
        session.reply(frame, self._logon_reply(result, cause))
        session.end(reason, f"logon refused ({result.name}): {cause}")

    def _logon_reply(self, result: LogonResult, cause: str = "") -> bytes:
        config = self.config
        return m.LogonReply(
            result,
            cause[:1000],
            config.heartbeat_interval,
            config.heartbeat_timeout,
            config.wire.max_message_size,
        ).encode()

    def _count_takeover(self, session: Session) -> bool:
        """
        Count a takeover of a (user, device); C{False} when it is one too
        many, which also refuses that device for the cooldown.
        """
        key = (session.user_id, session.client_type)
        now = self.clock.seconds()
        if self._takeovers.hit(key, now) <= self.config.takeover_limit:
            return True
        self.counters["takeovers_refused"] += 1
        self._takeover_blocked[key] = now + self.config.takeover_cooldown
        if len(self._takeover_blocked) > _MAX_TRACKED_KEYS:
            self._takeover_blocked = {
                k: t for k, t in self._takeover_blocked.items() if t > now
            }
        log.warn(
            "{user_id}/{client_type} flaps between connections: refused for {cooldown} s",
            esf_event="takeover_flapping",
            user_id=session.user_id,
            client_type=session.client_type,
            cooldown=self.config.takeover_cooldown,
        )
        return False

    def _push_out(self, old: Session, new: Session) -> None:
        cause = (
            f"{old.user_id} logged on again with the same device "
            f"({_kind_name(new.client_type)}) from {new.address}"
        )
        self.user_manager.device_being_pushed_out.fire(old.user_data, new.address)
        old.notify(MessageType.BEING_PUSHED_OUT_NOTIFY, m.BeingPushedOutNotify(cause).encode())
        old.end(DisconnectedType.BEING_PUSHED_OUT, cause)

    def _bind(self, session: Session, frame: Frame, handover: bool) -> None:
        config = self.config
        session.state = _State.LOGGED_ON
        if session._logon_timer is not None:
            session._logon_timer.cancel()
            session._logon_timer = None
        session.decoder.max_message_size = config.wire.max_message_size
        session.last_active = self.clock.seconds()
        session.active = False
        session.user_data = UserData(
            session.user_id, _client_type(session.client_type), session.address, session.last_active
        )
        session._heartbeat_echo = encode_frame(
            config.wire, MessageType.HEARTBEAT, user_id=SERVER_ID, dest_user_id=session.user_id
        )
        first = self.presence.add(session)
        session.reply(frame, self._logon_reply(LogonResult.SUCCEED))
        log.info(
            "logged on: {user_id}/{client_type} from {address}",
            esf_event="logged_on",
            user_id=session.user_id,
            client_type=session.client_type,
            address=session.address,
        )
        um = self.user_manager
        if not handover:
            self._tell_other_devices(session, MessageType.MY_DEVICE_ONLINE)
        um.device_connected.fire(session.user_data)
        # A subscriber may end the session at once (a kick, say); its end has
        # then been reported, and reporting it online now would be false.
        if first and not handover and session.state is _State.LOGGED_ON:
            um.user_connected.fire(session.user_data)
            if session.state is _State.LOGGED_ON:
                um.user_count_changed.fire(um.user_count)

    def _unbind(self, session: Session, reason: DisconnectedType) -> None:
        last = self.presence.remove(session)
        handover = reason is DisconnectedType.BEING_PUSHED_OUT
        um = self.user_manager
        um.device_disconnected.fire(session.user_data, reason)
        if handover:
            # The same device of the same user logs on at once: the user
            # never goes offline and the other devices see no change.
            return
        if last:
            um.user_disconnected.fire(session.user_data, reason)
            um.user_count_changed.fire(um.user_count)
        elif not self._stopping:
            # (When the server stops, every device gets ServerShutdown.)
            self._tell_other_devices(session, MessageType.MY_DEVICE_OFFLINE)

    def _tell_other_devices(self, session: Session, message_type: MessageType) -> None:
        for other in self.presence.devices(session.user_id):
            if other is not session:
                other.notify(message_type, client_type=session.client_type)

    # -- heartbeat -------------------------------------------------------------

    def _scan_heartbeats(self) -> None:
        now = self.clock.seconds()
        deadline = now - self.config.heartbeat_timeout
        expired = []
        for session in self.sessions:
            if session.state is not _State.LOGGED_ON:
                continue
            if session.active:
                session.active = False
                session.last_active = now
            elif session.last_active <= deadline:
                expired.append(session)
            if session.blobs is not None and session.blobs.pending:
                for blob_id in session.blobs.expire(now):
                    log.info(
                        "dropped blob {blob_id} of {session!r}: idle too long",
                        blob_id=blob_id,
                        session=session,
                    )
        for session in expired:
            if session.state is not _State.LOGGED_ON:
                continue  # ended meanwhile, by a subscriber of an earlier one
            self.user_manager.heartbeat_timed_out.fire(session.user_data)
            session.end(
                DisconnectedType.HEARTBEAT_TIMEOUT,
                f"nothing received for {self.config.heartbeat_timeout} s",
            )

    # -- framework messages ----------------------------------------------------

    def _on_heartbeat(self, session: Session, frame: Frame) -> None:
        session.send(session._heartbeat_echo)

    def _on_second_logon(self, session: Session, frame: Frame) -> None:
        session.error(frame, ErrorCode.BAD_REQUEST, "already logged on")

    def _on_get_my_ipe(self, session: Session, frame: Frame) -> None:
        m.Empty.decode(frame.body)
        session.reply(frame, m.GetMyIPEReply(session.address).encode())

    def _on_ping_by_server(self, session: Session, frame: Frame) -> None:
        m.Empty.decode(frame.body)
        if frame.dest_user_id in ("", SERVER_ID):
            session.reply(frame, b"", MessageType.PING_ACK)
        else:
            self._on_relay(session, frame)

    def _targets(self, dest_user_id: str) -> list | None:
        """
        The devices a relayed message goes to: every device of the user, or
        one (C{"alice#5"}).  C{None} when the DestUserID is not a user.
        """
        if dest_user_id in _RESERVED_IDS:
            return None
        if DEVICE_MARK in dest_user_id:
            user_id, _, kind = dest_user_id.rpartition(DEVICE_MARK)
            if not (kind.isascii() and kind.isdigit()) or not user_id:
                return None
            handle = self.presence.get(user_id, int(kind))
            return [handle] if handle is not None else []
        return self.presence.devices(dest_user_id)

    def _on_relay(self, session: Session, frame: Frame) -> None:
        """
        Forward a frame, its original bytes, to its DestUserID's devices.
        """
        targets = self._targets(frame.dest_user_id)
        if targets:
            raw = frame.raw
            for target in targets:
                target.send(raw)
            return
        if targets is None:
            session.error(
                frame, ErrorCode.BAD_REQUEST, f"{frame.dest_user_id!r} is not a user to relay to"
            )
            return
        self.counters["transmit_failed"] += 1
        self.transmit_failed.fire(
            session.user_id, frame.dest_user_id, frame.message_type, frame.raw
        )
        session.error(frame, ErrorCode.USER_OFFLINE, f"{frame.dest_user_id} is not online")

    def _on_logoff(self, session: Session, frame: Frame) -> None:
        session.end(DisconnectedType.LOGGED_OFF, "logged off")

    def _on_get_all_online_users(self, session: Session, frame: Frame) -> None:
        request = m.GetAllOnlineUsers.decode(frame.body)
        users = self.presence.user_ids()
        room = self.config.wire.max_message_size - self.config.wire.header_length - 8
        limit = request.limit or len(users)
        page = []
        for user_id in users[request.offset : request.offset + limit]:
            room -= 2 + len(user_id.encode("utf-8"))
            if room < 0:
                break
            page.append(user_id)
        session.reply(frame, m.GetAllOnlineUsersReply(len(users), page).encode())

    def _on_query_online(self, session: Session, frame: Frame) -> None:
        m.Empty.decode(frame.body)
        online = self.user_manager.is_user_online(frame.dest_user_id)
        session.reply(frame, m.QueryOnlineReply(online).encode())

    def _on_query_onlines(self, session: Session, frame: Frame) -> None:
        request = m.QueryOnlines.decode(frame.body)
        online = [self.user_manager.is_user_online(u) for u in request.user_ids]
        session.reply(frame, m.QueryOnlinesReply(online).encode())

    def _on_get_my_devices(self, session: Session, frame: Frame) -> None:
        m.Empty.decode(frame.body)
        kinds = [h.client_type for h in self.presence.devices(session.user_id)]
        session.reply(frame, m.GetMyDevicesReply(kinds).encode())

    def _on_kick_out(self, session: Session, frame: Frame) -> None:
        request = m.KickOut.decode(frame.body)
        operator, target = session.user_id, frame.dest_user_id
        if operator in self.config.admins:
            allowed: Deferred = succeed(True)
        else:
            allowed = call(self.handler.can_kick_out, operator, target, None)
        allowed.addBoth(self._kick_authorised, session, frame, target, request.reason)

    def _kick_authorised(self, allowed, session, frame, target, reason) -> None:
        if isinstance(allowed, Failure):
            log.failure("can_kick_out raised", allowed)
            allowed = False
        if session.state is not _State.LOGGED_ON:
            return
        if not allowed:
            log.info(
                "kick of {target} by {operator} refused",
                esf_event="kick_refused",
                operator=session.user_id,
                target=target,
                reason=reason,
            )
            session.reply(frame, m.KickOutReply(False, "not authorised to kick").encode())
            return
        if not self.user_manager.is_user_online(target):
            session.reply(frame, m.KickOutReply(False, f"{target} is not online").encode())
            return
        session.reply(frame, m.KickOutReply(True, "").encode())
        self.kick_out(target, reason, operator=session.user_id)

    # -- application messages ------------------------------------------------------

    def _on_send(self, session: Session, frame: Frame) -> None:
        """
        Send (202) and SendCertainly (205): to the server's handler, or
        relayed.  SendCertainly is acknowledged once the handler has run.
        """
        if frame.dest_user_id not in _TO_SERVER:
            self._on_relay(session, frame)
            return
        info = m.Information.decode(frame.body)
        ack = frame.message_type == MessageType.SEND_CERTAINLY
        if ack and not frame.message_id:
            raise m.BadRequest("a SendCertainly needs a non-zero MessageID")
        self._handle_information(session, frame, info.information_type, info.payload, ack)

    def _handle_information(
        self, session: Session, frame: Frame, information_type: int, payload: bytes, ack: bool
    ) -> None:
        """
        Hand a message to the customize handler; once it has run, answer
        with an Ack if C{ack}.
        """
        if self.customize_handler is None:
            self.counters["unhandled"] += 1
            session.error(frame, ErrorCode.HANDLER_ERROR, "this server has no customize handler")
            return
        d = call(
            self.customize_handler.handle_information,
            session.user_id,
            _client_type(session.client_type),
            information_type,
            payload,
        )
        if ack:
            body = m.Ack(information_type).encode()
            d.addCallback(lambda _: session.reply(frame, body, MessageType.ACK))
        d.addErrback(self._handler_failed, session, frame, "handle_information")

    def _on_request(self, session: Session, frame: Frame) -> None:
        if frame.dest_user_id not in _TO_SERVER:
            self._on_relay(session, frame)
            return
        if not frame.message_id:
            raise m.BadRequest("a Request needs a non-zero MessageID")
        info = m.Information.decode(frame.body)
        if self.customize_handler is None:
            session.error(frame, ErrorCode.HANDLER_ERROR, "this server has no customize handler")
            return
        d = call(
            self.customize_handler.handle_query,
            session.user_id,
            _client_type(session.client_type),
            info.information_type,
            info.payload,
        )
        d.addCallback(self._answer_query, session, frame, info.information_type)
        d.addErrback(self._handler_failed, session, frame, "handle_query")

    def _answer_query(self, result, session: Session, frame: Frame, information_type: int):
        if result is None:
            result = b""
        if not isinstance(result, (bytes, bytearray, memoryview)):
            raise TypeError(f"handle_query returned {type(result).__name__}, not bytes")
        payload = bytes(result)
        wire = self.config.wire
        if wire.header_length + 4 + len(payload) > wire.max_message_size:
            session.error(
                frame,
                ErrorCode.TOO_LARGE,
                f"the handler's {len(payload)}-byte answer does not fit one message",
            )
            return
        session.reply(frame, m.Information(information_type, payload).encode(), MessageType.RESPONSE)

    def _handler_failed(self, failure: Failure, session: Session, frame: Frame, what: str):
        """
        An application handler failed: a L{esf.RequestError} it raised goes
        back as it is (its code and text, no log); anything else is logged
        with its traceback and answered C{HandlerError} with a short text.
        """
        error = failure.value
        if isinstance(error, m.RequestError):
            session.error(frame, error.code, error.text[:200])
            return
        log.failure(
            "{what} raised for {message_type} from {session!r}",
            failure,
            what=what,
            message_type=frame.message_type,
            session=session,
        )
        self.counters["handler_errors"] += 1
        text = f"{type(error).__name__}: {error}"[:200]
        session.error(frame, ErrorCode.HANDLER_ERROR, text)

    def _on_response(self, session: Session, frame: Frame) -> None:
        """
        A Response (204) or Error (120): relayed back to the user that asked,
        or the answer to one of the server's own L{query} calls.
        """
        if frame.dest_user_id not in _TO_SERVER:
            self._on_relay(session, frame)
            return
        pending = self._queries.pop(frame.message_id, None)
        if pending is None or pending[0] is not session:
            if pending is not None:
                self._queries[frame.message_id] = pending
            log.info(
                "dropped an answer nobody waits for: {message_type} #{message_id} from {session!r}",
                message_type=frame.message_type,
                message_id=frame.message_id,
                session=session,
            )
            return
        _, d, timer = pending
        session.queries.discard(frame.message_id)
        timer.cancel()
        try:
            if frame.message_type == MessageType.ERROR:
                error = m.Error.decode(frame.body)
                d.errback(m.RequestError(error.code, error.text))
            else:
                d.callback(m.Information.decode(frame.body).payload)
        except m.BadRequest as e:
            d.errback(m.RequestError(ErrorCode.BAD_REQUEST, f"malformed answer: {e}"))

    def _on_ack(self, session: Session, frame: Frame) -> None:
        if frame.dest_user_id not in _TO_SERVER:
            self._on_relay(session, frame)

    def _on_blob(self, session: Session, frame: Frame) -> None:
        if frame.dest_user_id not in _TO_SERVER:
            self._on_relay(session, frame)
            return
        fragment = m.BlobFragment.decode(frame.body)
        if session.blobs is None:
            config = self.config
            session.blobs = m.BlobAssembler(
                config.max_blob_size, config.max_concurrent_blobs, config.blob_idle_timeout
            )
        try:
            payload = session.blobs.add(fragment, self.clock.seconds())
        except m.BlobError as e:
            self.counters["blob_errors"] += 1
            session.error(frame, e.code, e.text)
            return
        if payload is not None:
            self._handle_information(
                session, frame, fragment.information_type, payload, bool(frame.message_id)
            )

    def _on_broadcast(self, session: Session, frame: Frame) -> None:
        info = m.Information.decode(frame.body)
        group_id = frame.dest_user_id
        manager = self.group_manager
        if manager is None or group_id in ("", SERVER_ID):
            session.error(frame, ErrorCode.NOT_AUTHORIZED, f"no group {group_id!r} here")
            return
        allowed = call(manager.can_broadcast, session.user_id, group_id)

        def members(allowed):
            if not allowed:
                raise m.RequestError(
                    ErrorCode.NOT_AUTHORIZED, f"{session.user_id} may not broadcast to {group_id}"
                )
            if group_id == EVERYONE_ID:
                return self.presence.user_ids()
            return call(manager.get_members, group_id)

        def deliver(user_ids):
            raw = frame.raw
            sender = session.user_id
            for user_id in dict.fromkeys(user_ids):
                if user_id != sender:
                    for target in self.presence.devices(user_id):
                        target.send(raw)
            if frame.message_id:
                session.reply(frame, m.Ack(info.information_type).encode(), MessageType.ACK)

        def failed(failure):
            if failure.check(m.RequestError):
                session.error(frame, failure.value.code, failure.value.text)
            else:
                self._handler_failed(failure, session, frame, "group manager")

        allowed.addCallback(members).addCallback(deliver).addErrback(failed)

    # -- application-facing ------------------------------------------------------

    def kick_out(
        self,
        user_id: str,
        reason: str = "",
        client_type: int | None = None,
        *,
        operator: str = SERVER_ID,
    ) -> int:
        """
        Kick C{user_id} off (one device, or every device when
        C{client_type} is C{None}): each gets C{BeingKickedOutNotify} with
        the operator and reason, then its connection is closed.

        @return: how many sessions were ended.
        """
        targets = self._devices(user_id, client_type)
        log.info(
            "kick: {operator} kicks {user_id} ({count} devices): {reason}",
            esf_event="kick_out",
            operator=operator,
            user_id=user_id,
            client_type=client_type,
            count=len(targets),
            reason=reason,
        )
        notice = m.BeingKickedOutNotify(operator, reason[:1000]).encode()
        for target in targets:
            target.notify(MessageType.BEING_KICKED_OUT_NOTIFY, notice)
            target.end(DisconnectedType.BEING_KICKED_OUT, f"kicked by {operator}: {reason}")
        return len(targets)

    def send(
        self,
        user_id: str,
        information_type: int,
        payload: bytes = b"",
        client_type: int | None = None,
    ) -> int:
        """
        Send C{user_id} a one-way application message (Send, 202) from the
        server: to every device, or to C{client_type} only.

        @return: how many devices it was written to (0: not online).
        """
        targets = self._devices(user_id, client_type)
        body = m.Information(information_type, payload).encode()
        if not targets:
            dest = device_address(user_id, client_type)
            self.counters["transmit_failed"] += 1
            self.transmit_failed.fire(
                SERVER_ID,
                dest,
                MessageType.SEND,
                encode_frame(
                    self.config.wire, MessageType.SEND, body, user_id=SERVER_ID, dest_user_id=dest
                ),
            )
            return 0
        for target in targets:
            target.notify(MessageType.SEND, body)
        return len(targets)

    def query(
        self,
        user_id: str,
        information_type: int,
        payload: bytes = b"",
        client_type: int | None = None,
        timeout: float | None = None,
    ) -> Deferred:
        """
        Ask one device of C{user_id} (C{client_type}, or the first that
        logged on) a Request (203); its client's handler answers.

        @return: a Deferred firing with the answer's payload, or failing with
            L{esf.RequestError}: C{USER_OFFLINE}, C{TIMEOUT} (after
            C{timeout}, by default the configured query timeout), the
            client's own error, or C{USER_OFFLINE} again when the session
            ends first.
        """
        targets = self._devices(user_id, client_type)
        if not targets or not isinstance(targets[0], Session):
            return fail(m.RequestError(ErrorCode.USER_OFFLINE, f"{user_id} is not online"))
        session = targets[0]
        message_id = self._next_message_id()
        d = Deferred()
        timer = self.clock.callLater(
            self.config.query_timeout if timeout is None else timeout,
            self._query_timed_out,
            message_id,
        )
        self._queries[message_id] = (session, d, timer)
        if session.queries is None:
            session.queries = set()
        session.queries.add(message_id)
        session.send(
            encode_frame(
                self.config.wire,
                MessageType.REQUEST,
                m.Information(information_type, payload).encode(),
                message_id=message_id,
                user_id=SERVER_ID,
                dest_user_id=session.user_id,
            )
        )
        return d

    def _devices(self, user_id: str, client_type: int | None) -> list:
        if client_type is None:
            return self.presence.devices(user_id)
        handle = self.presence.get(user_id, client_type)
        return [handle] if handle is not None else []

    def _next_message_id(self) -> int:
        while True:
            message_id = next(self._message_ids) % 0x7FFFFFFF + 1
            if message_id not in self._queries:
                return message_id

    def _query_timed_out(self, message_id: int) -> None:
        session, d, _ = self._queries.pop(message_id)
        session.queries.discard(message_id)
        d.errback(m.RequestError(ErrorCode.TIMEOUT, "no answer in time"))

    def _fail_queries(self, session: Session) -> None:
        for message_id in list(session.queries):
            _, d, timer = self._queries.pop(message_id)
            timer.cancel()
            d.errback(
                m.RequestError(ErrorCode.USER_OFFLINE, f"{session.user_id}'s session ended")
            )
        session.queries.clear()
