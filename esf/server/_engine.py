"""
The server engine: wires the parts of an esf server together::

    Session       one connection: frames in, output queued (esf.server._session)
    Logons        the logon pipeline (esf.server._logon), on LogonPolicy's
                  decisions (esf.server._policy)
    IPresence     who is online (esf.server._presence: LocalPresence, UserManager)
    Router        which devices a DestUserID names (esf.server._router)
    Reaper        ends silent sessions (esf.server._heartbeat)
    Relay         forwards frames between users (esf.server._relay)
    services      what the server itself answers (esf.server._services)
    Broadcasts    a frame to a group's members, or a run of them (esf.server._broadcast)
    PendingRequests  the server's own queries to clients (esf.wire._pending)

The engine never touches a transport.  A connection is an L{IChannel} (the
protocol provides one); the engine hands it bytes to write and tells it when
to close.  Time comes from an injected L{IReactorTime}.
"""

from __future__ import annotations

import collections

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from esf.interfaces import (
    IBasicHandler,
    IChannel,
    ICustomizeHandler,
    IGroupManager,
    IOfflinePolicy,
    IOfflineStore,
    IPresence,
    IRelayPolicy,
    IRelogonPolicy,
)
from esf.wire import _messages as m
from esf.wire._events import Event, call
from esf.wire._frames import DisconnectedType, ErrorCode, Frame, MessageType
from esf.wire._pending import PendingRequests

from ._api import ServerApplicationAPI
from ._broadcast import Broadcasts
from ._budget import MemoryBudget
from ._config import (
    IDS_PER_UNIT,
    RelogonMode,
    ServerConfig,
    SessionPhase,
    UserData,
    default_node_id,
)
from ._counters import TrafficByTransport
from ._heartbeat import Reaper
from ._logon import Logons
from ._offline import OfflineMessages
from ._output import OutputBatch
from ._policy import LogonRefused
from ._presence import LocalPresence, UserManager
from ._relay import Relay
from ._relay_policy import RelayGate
from ._router import AnswerRouter, Router
from ._services import TO_SERVER, ApplicationServices, BasicServices
from ._session import RELAYED, Session

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


@implementer(IBasicHandler)
class AcceptAll:
    """
    The handler used when the application gives none: every logon is
    accepted and nobody may kick.
    """

    def verify_user(
        self, system_token: str, user_id: str, password: str, client_type: int, address: str
    ) -> bool:
        return True

    def can_kick_out(self, operator_id: str, target_id: str, client_type: int | None) -> bool:
        return False


class ServerEngine(ServerApplicationAPI):
    """
    The server side of ESF v1 (ESFramework's C{RapidServerEngine}).

    @ivar user_manager: the L{IUserManager} applications read and subscribe
        to.
    @ivar sessions: the sessions not yet ended.
    @ivar counters: counts of what did not go as asked, by
        L{esf.server._counters.Count} name.
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
        node_id: str | None = None,
        offline_store: IOfflineStore | None = None,
        offline_policy: IOfflinePolicy | None = None,
        relogon_policy: IRelogonPolicy | None = None,
        relay_policy: IRelayPolicy | None = None,
    ):
        self.config = config = config or ServerConfig()
        self.clock = clock
        self.node_id = node_id or default_node_id()
        self.handler = handler if handler is not None else AcceptAll()
        self.customize_handler = customize_handler
        self.group_manager = group_manager
        #: The application's L{IRelogonPolicy}, or C{None}: then
        #: C{config.relogon_mode} applies to every user and device kind.
        self.relogon_policy = relogon_policy
        #: L{Event}: C{(sender_id, dest_user_id, message_type, raw)}: a message
        #: addressed to a user could not be delivered because the user is not
        #: online (fired whether or not an offline store keeps it).
        self.transmit_failed = Event("transmit_failed")
        self.counters: collections.Counter[str] = collections.Counter()
        #: What each kind of transport carried (its protocols count it).
        self.traffic = TrafficByTransport()
        self.presence = presence if presence is not None else LocalPresence()
        self.user_manager = UserManager(self.presence, config)
        self.router = Router(self.presence)
        self.answers = AnswerRouter(
            self.router, clock, config.query_timeout, config.max_unanswered_requests
        )
        self.batch = OutputBatch()
        #: Asks the application's L{IRelayPolicy}, if any, about every frame
        #: a user relays (C{None}: nothing is asked); the relay forwards.
        self.relay_gate = RelayGate(self, relay_policy) if relay_policy is not None else None
        self.relay = Relay(self)
        #: Bytes held for peers (output backlogs, partial frames, blobs).
        self.budget = MemoryBudget(config.max_buffered_bytes)
        self.pending = PendingRequests(clock, config.query_timeout)
        self.logons = Logons(self)
        self.reaper = Reaper(
            clock,
            config.heartbeat_timeout,
            lambda: self.sessions,
            self._heartbeat_timed_out,
            self._expire_blobs,
        )
        self.sessions: set[Session] = set()
        #: How many connections are not yet closed (a count, not a set: one
        #: entry less per connection).
        self._open = 0
        #: A full work bucket (L{Session.charge}), one float object that
        #: every new session starts with.
        self.full_bucket = float(config.work_burst)
        self._drained: list[Deferred[None]] = []
        self.stopping = False
        self._dispatch = {}
        broadcasts = Broadcasts(self)
        for service in (BasicServices(self), ApplicationServices(self), broadcasts):
            self._dispatch.update(service.handlers)
        #: A run of Broadcasts from one read, taken whole where it can be.
        self.broadcast_run = broadcasts.run
        #: The offline part (L{OfflineMessages}), when there is a store.
        self.offline: OfflineMessages | None = None
        self._store_opened = False
        if offline_store is not None:
            self.offline = OfflineMessages(self, offline_store, offline_policy)
        self.presence.attach(self)

    # -- life -------------------------------------------------------------

    def start(self) -> None:
        """
        Start the heartbeat reaper and open the offline store, if there is
        one.  The first connection does so too, so an engine built by hand
        never runs without them; L{stop} closes the store once every
        connection has closed.  The store is opened once.

        @raise esf.offline.OfflineStoreError: the store cannot be opened
            (corrupt, unwritable, a newer schema); a failure it reports
            later is logged (C{offline_store_failed}).
        """
        self.reaper.start()
        if self.offline is not None and not self._store_opened:
            self._store_opened = True
            self.offline.store.start().addErrback(
                lambda f: log.failure(
                    "the offline store could not be opened", f, esf_event="offline_store_failed"
                )
            )

    def stop(self) -> Deferred[None]:
        """
        Send C{DisconnectNotice(ServerShutdown)} to every session and close
        them; refuse new connections.

        @return: a Deferred that fires when every connection has closed.
        """
        self.stopping = True
        self.reaper.stop()
        self.logons.record.stop()
        if self.relay_gate is not None:
            self.relay_gate.stop()
        for session in list(self.sessions):
            session.end(DisconnectedType.SERVER_SHUTDOWN, "the server is shutting down")
        drained: Deferred[None]
        if not self._open:
            drained = succeed(None)
        else:
            drained = Deferred()
            self._drained.append(drained)
        if self.offline is None or not self._store_opened:
            return drained
        # Closed once the sessions have ended: they release what they hold.
        self._store_opened = False
        store = self.offline.store
        return drained.addCallback(lambda _: store.stop())

    # -- connections ----------------------------------------------------------

    def connection_made(self, channel: IChannel) -> Session:
        """
        A peer connected; return the session the protocol will feed.
        """
        session = Session(self, channel)
        self.sessions.add(session)
        self._open += 1
        if self.stopping:
            session.end(DisconnectedType.SERVER_SHUTDOWN, "the server is shutting down")
            return session
        if not self.reaper.running:
            try:
                self.start()
            except Exception:
                log.failure(
                    "the offline store could not be opened", esf_event="offline_store_failed"
                )
        limit = self.config.max_connections
        if limit is not None and len(self.sessions) > limit:
            session.end(
                DisconnectedType.MAX_CONNECTION_COUNT_LIMITTED,
                f"the server holds its maximum of {limit} connections; try later",
            )
            return session
        session.logon_timer = self.clock.callLater(
            self.config.logon_timeout, self.logons.timed_out, session
        )
        return session

    def connection_closed(self, session: Session) -> None:
        """
        C{session}'s connection is closed (once for each L{connection_made}:
        a channel reports its end once).
        """
        self._open -= 1
        if self.stopping and not self._open:
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)

    def session_ended(
        self, session: Session, reason: DisconnectedType, text: str, was_logged_on: bool
    ) -> None:
        """
        C{session} ended (it calls this once): unbind it and log one event.
        """
        self.sessions.discard(session)
        if was_logged_on:
            self.logons.unbind(session, reason)
        if len(self.pending):
            self.pending.fail_where(
                lambda asked: asked is session,
                m.RequestError(ErrorCode.USER_OFFLINE, f"{session.user_id}'s session ended"),
            )
        if self.offline is not None:
            self.offline.session_ended(session)
        if self.relay_gate is not None:
            self.relay_gate.session_ended(session)
        if session.blobs is not None:
            self.budget.add_blob_bytes(session.user_id or "", -session.blobs.buffered)
            session.blobs = None
        session.asked = None
        suppressed = session.suppressed_logs
        self.logons.record.flush_for(session.user_id)  # its logon is logged first
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
            suppressed_logs=suppressed,
        )
        if suppressed:
            session.summarise_logs()

    def _heartbeat_timed_out(self, session: Session) -> None:
        self.user_manager.heartbeat_timed_out.fire(session.user_data)
        text = f"no whole frame received for {self.config.heartbeat_timeout} s"
        if session.decoder.buffered:
            # Bytes trickle in but never finish a frame: only whole frames
            # keep a session alive (protocol.md 7.2).
            text += f" ({session.decoder.buffered} bytes of an unfinished frame)"
        session.end(DisconnectedType.HEARTBEAT_TIMEOUT, text)

    def _expire_blobs(self, now: float) -> None:
        for session in self.sessions:
            if session.blobs is not None and session.blobs.pending:
                before = session.blobs.buffered
                expired = session.blobs.expire(now)
                self.budget.add_blob_bytes(session.user_id or "", session.blobs.buffered - before)
                for blob_id in expired:
                    if session.may_log():
                        log.info(
                            "dropped blob {blob_id} of {session!r}: idle too long",
                            blob_id=blob_id,
                            session=session,
                        )
        if self.offline is not None:
            self.offline.expire_blobs(now)

    # -- frames -----------------------------------------------------------------

    def frame_received(self, session: Session, frame: Frame) -> None:
        """
        Dispatch one frame from C{session} (the relay's common case never
        gets here: the session forwards it itself).
        """
        if session.state is not SessionPhase.LOGGED_ON:
            self.logons.frame_received(session, frame)
            return
        if frame.user_id != session.user_id:
            session.end(
                DisconnectedType.MESSAGE_WITH_WRONG_USER_ID,
                f"frame from {frame.user_id!r} on the session of {session.user_id!r}",
            )
            return
        if frame.message_type in RELAYED and frame.dest_user_id not in TO_SERVER:
            self.relay.frame(session, frame)
            return
        if (
            frame.message_type == MessageType.ACK
            and self.offline is not None
            and self.offline.ack(session, frame)
        ):
            return  # acknowledged stored messages: as cheap as a relay, not charged
        if not session.charge(1):
            self._work_refused(session, frame)
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

    def _work_refused(self, session: Session, frame: Frame) -> None:
        if session.over_budget():
            return
        session.error(
            frame,
            ErrorCode.RATE_LIMITED,
            f"too many requests to the server: at most {self.config.work_rate:g} units "
            f"of work a second (1 per request, 1 more per {IDS_PER_UNIT} user IDs); slow down",
        )
