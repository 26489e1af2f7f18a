"""
The client engine (ESFramework's C{RapidPassiveEngine}): logs on, keeps the
session alive with heartbeats, reconnects and logs on again by itself, and
offers every call of the ESF v1 protocol as a Deferred.

Reconnection is Twisted's L{ClientService}, with the engine's clock and
retry policy, and the logon done in its C{prepareConnection}: a connection
whose logon fails, is refused or goes unanswered counts as a failed attempt,
so the backoff grows until a logon succeeds.  On top of it the engine keeps
the session's named state (L{SessionState}) and how it ended (L{Ending}),
the rules for when I{not} to reconnect (pushed out, kicked, refused,
logged off, closed) and heartbeats with dead-server detection.

The calls are in L{esf.client._calls}, their request table in
L{esf.client._requests}, the connection in L{esf.client._connection}; what the
client receives unasked is dispatched by L{esf.client._inbox}.
"""

from __future__ import annotations

import collections
import itertools
import random
from typing import Any, Callable

from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from esf.interfaces import ICustomizeHandler
from esf.wire import _messages as m
from esf.wire._frames import (
    ClientType,
    DisconnectedType,
    Frame,
    MessageType,
    WireConfig,
    validate_id,
)
from esf.wire._pending import PendingRequests

from ._calls import ClientCalls
from ._connection import ClientProtocol, Reconnector
from ._events import ClientEvents
from ._inbox import ClientBlobs, Connection, Inbox, MiB
from ._state import (
    Ending,
    EndingKind,
    LogonFailed,
    LogonResponse,
    NotConnected,
    SessionState,
)

__all__ = [
    "ClientEngine",
    "ClientProtocol",
    "Ending",
    "EndingKind",
    "LogonResponse",
    "LogonFailed",
    "NotConnected",
    "SessionState",
]

log = Logger(namespace="esf.client")


class _Heartbeat:
    """
    A logged-on connection's heartbeats, and dead-server detection: no
    frame at all from the server for the announced timeout drops the
    connection (the engine then reconnects).
    """

    def __init__(self, engine: ClientEngine, blobs: ClientBlobs):
        self.engine = engine
        #: Incomplete blobs from other users, expired on each beat.
        self.blobs = blobs
        self.last_heard = 0.0
        self.timeout = 0
        self._loop = LoopingCall(self.beat)
        self._loop.clock = engine.clock

    def heard(self) -> None:
        """
        Something arrived from the server: it is alive.
        """
        self.last_heard = self.engine.clock.seconds()

    def start(self, response: LogonResponse) -> None:
        self.stop()
        self.timeout = response.heartbeat_timeout
        self._loop.start(max(response.heartbeat_interval, 1), now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def beat(self) -> None:
        engine = self.engine
        protocol = engine.connection
        if protocol is None or not engine.logged_on or protocol.broken is not None:
            return  # gone, or leaving (logged off, pushed out, closed, given up)
        now = engine.clock.seconds()
        if now - self.last_heard >= self.timeout:
            log.warn(
                "nothing from the server for {timeout} s: treating the connection as lost",
                timeout=self.timeout,
            )
            protocol.transport.abortConnection()
            return
        engine.write_message(MessageType.HEARTBEAT)
        self.blobs.expire(now)


class ClientEngine(ClientEvents, ClientCalls):
    """
    A logged-on session with an esf server that survives connection loss.

    Create it, subscribe to its events, then call L{logon}; every other call
    returns a Deferred and needs a logged-on session.

    Its events are attributes (see L{ClientEvents}); its calls are those of
    L{ClientCalls}.
    """

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        user_id: str,
        password: str = "",
        client_type: int = ClientType.OTHERS,
        *,
        system_token: str = "",
        handler: ICustomizeHandler | None = None,
        clock: IReactorTime,
        wire: WireConfig | None = None,
        request_timeout: float = 30.0,
        retry_policy: Callable[[int], float] | None = None,
        max_blob_size: int = 16 * MiB,
        max_blobs_per_sender: int = 2,
        max_blob_bytes: int = 64 * MiB,
        max_output_buffer: int = 8 * MiB,
    ):
        self.endpoint = endpoint
        self.user_id = user_id
        self.password = password
        self.client_type = client_type
        self.system_token = system_token
        self.handler = handler
        self.clock = clock
        self.wire = wire or WireConfig()
        self.request_timeout = request_timeout
        #: Bytes written while the server reads none, past which the
        #: connection is closed as broken.
        self.max_output_buffer = max_output_buffer
        self.retry_policy = retry_policy or backoffPolicy(
            initialDelay=1.0, maxDelay=30.0, factor=2.0, jitter=random.random
        )
        m.encode_str(password)  # fail early on an impossible password
        validate_id(user_id, self.wire)

        super().__init__()
        #: The current L{LogonResponse}, once logged on.
        self.logon_response: LogonResponse | None = None
        #: How the session ended, once C{state} is C{ENDED} (an L{Ending}).
        self.ending: Ending | None = None
        #: What went wrong, by name (see L{esf.server._counters.ClientCount}).
        self.counters: collections.Counter[str] = collections.Counter()
        self._state = SessionState.IDLE
        self._announced = False  # session_ended fires once
        self._protocol: ClientProtocol | None = None
        self._reconnector = Reconnector(self, endpoint, self.retry_policy, clock)
        self._first_logon: Deferred[LogonResponse] | None = None
        self._pending = PendingRequests(clock, request_timeout)
        self._blob_ids = itertools.count(1)
        blobs = ClientBlobs(max_blob_size, max_blobs_per_sender, max_blob_bytes)
        self._heartbeat = _Heartbeat(self, blobs)
        self._drain_waiters: list[Deferred[None]] = []
        self._inbox = Inbox(self, blobs)
        #: The highest ID of a message from the server's offline store that
        #: this engine has handled: one delivered again (after a lost
        #: connection) is acknowledged and not handled twice.  An
        #: application that must not handle one twice across restarts of
        #: its process saves it and sets it before logon.
        self.offline_mark = 0

    # -- state ---------------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        """
        Where the session is in its life (a L{SessionState}).
        """
        return self._state

    @property
    def logged_on(self) -> bool:
        """
        Whether a session is logged on now.
        """
        return self._state is SessionState.LOGGED_ON

    # -- life ------------------------------------------------------------------------

    def logon(self) -> Deferred[LogonResponse]:
        """
        Connect and log on.

        @return: a Deferred firing with the L{LogonResponse}, or failing with
            L{LogonFailed} (refused), L{NotConnected} (closed before the
            answer), L{esf.RequestError} (C{TIMEOUT}) or the connection error
            (the first connection could not be made); nothing is retried
            then.  Later reconnects log on again by themselves and report
            through C{relogon_completed}.
        """
        if self._reconnector.service is not None:
            raise RuntimeError("logon() was already called")
        first: Deferred[LogonResponse] = Deferred()
        self._first_logon = first
        self._state = SessionState.CONNECTING
        self._reconnector.start(self._log_on, self._first_attempt_failed)
        return first

    def logoff(self) -> Deferred[None]:
        """
        Leave gracefully: send Logoff, after which the server ends the
        session (C{LoggedOff}) and closes the connection; this client does
        not reconnect.

        The protocol has no reply to a Logoff: the server's close is its
        answer.  So this fires once the server has closed the connection,
        when it has read the Logoff and ended the session.  A server that
        has not closed it within C{request_timeout} seconds is cut off
        (it then ends the session otherwise) and this fires then.  Without
        a logged-on session it is L{close}.
        """
        ending = Ending(EndingKind.LOGGED_OFF, DisconnectedType.LOGGED_OFF, "logged off")
        protocol = self._protocol
        if not self.logged_on or protocol is None or not protocol.writable:
            return self._leave(ending)
        self.write_message(MessageType.LOGOFF)
        self._end(protocol, ending)
        closed = protocol.closed_within(self.clock, self.request_timeout)
        # Then stop the retry ClientService planned.
        return closed.addCallback(lambda _: self._stop_reconnecting())

    def close(self) -> Deferred[None]:
        """
        Stop reconnecting and close the connection (no Logoff is sent; see
        L{logoff}).  Fires when the connection is closed.
        """
        return self._leave(Ending(EndingKind.CLOSED, None, "closed by the application"))

    def _leave(self, ending: Ending) -> Deferred[None]:
        protocol = self._protocol
        if self._state is not SessionState.ENDED:
            self._end(protocol, ending)
            if protocol is None:
                self._announce_end()  # no connection to wait for
        d = self._stop_reconnecting()
        if protocol is not None and not protocol.accepted and protocol.transport is not None:
            protocol.transport.loseConnection()  # ClientService does not own it yet
        first, self._first_logon = self._first_logon, None
        if first is not None:
            first.errback(NotConnected("the client was closed before the logon completed"))
        return d

    def _end(self, protocol: Connection | None, ending: Ending) -> None:
        """
        The session is over for good: no more reconnects.
        """
        self._state = SessionState.ENDED
        self.ending = ending
        if protocol is not None and (protocol.ending is None or not protocol.ending.final):
            protocol.ending = ending

    def end_for_good(self, connection: Connection, ending: Ending) -> None:
        """
        The server ended the session (pushed out, kicked, refused): no
        reconnect follows.
        """
        self._end(connection, ending)
        self._stop_reconnecting()

    def _announce_end(self) -> None:
        # Only a session that had logged on ends; a first logon that fails
        # is reported by logon()'s Deferred alone.
        if self.logon_response is not None and self.ending is not None and not self._announced:
            self._announced = True
            self.session_ended.fire(self.ending)

    def _first_attempt_failed(self, failure: Failure) -> None:
        first, self._first_logon = self._first_logon, None
        if first is None:
            return
        self._state = SessionState.ENDED
        self._stop_reconnecting()
        first.errback(failure)

    def _stop_reconnecting(self) -> Deferred[None]:
        return self._reconnector.stop(self._protocol)

    # -- one connection -----------------------------------------------------------

    @property
    def connection(self) -> ClientProtocol | None:
        """
        The current connection (logged on or not yet), or C{None}.
        """
        return self._protocol

    def connection_made(self, protocol: ClientProtocol) -> None:
        """
        C{protocol} is connected; its logon follows.
        """
        self._protocol = protocol
        self._heartbeat.heard()

    def frames_received(self, protocol: ClientProtocol, frames: list[Frame]) -> None:
        """
        C{protocol} read C{frames}: the server is alive; each goes to the
        inbox.
        """
        self._heartbeat.heard()
        inbox = self._inbox
        for frame in frames:
            inbox.frame_received(protocol, frame)

    def _log_on(self, side: Any) -> Deferred[None]:
        """
        ClientService's C{prepareConnection}: log on; the connection is
        ClientService's once this fires.

        @param side: ClientService's protocol for the connection (its proxy
            of the stand-in that the endpoint linked to it).
        """
        protocol: ClientProtocol = side.protocol
        if self._state is SessionState.ENDED:  # closed while connecting
            protocol.transport.loseConnection()
            return fail(NotConnected("the client was closed"))
        self._state = SessionState.LOGGING_ON
        body = m.Logon(m.PROTOCOL_VERSION, self.system_token, self.password).encode()
        answer = self._request_logon(protocol, body, self.request_timeout)
        answer.addCallbacks(
            self._logon_answered,
            self._logon_unanswered,
            callbackArgs=(protocol,),
            errbackArgs=(protocol,),
        )
        return protocol.prepared

    def _logon_answered(self, response: LogonResponse, protocol: ClientProtocol) -> None:
        first = self._first_logon
        if response.succeeded:
            self.logon_response = response
            self._state = SessionState.LOGGED_ON
            self._inbox.logged_on()
            self._heartbeat.start(response)
            protocol.accept()
            if first is not None:
                self._first_logon = None
                first.callback(response)
            else:
                self.relogon_completed.fire(response)
            return
        ending = Ending.refusal(response, relogon=first is None)
        if ending.final:
            self._end(protocol, ending)
        else:
            protocol.ending = ending  # a failed attempt, retried after a delay
        protocol.reject(Failure(LogonFailed(response)))
        if self._state is SessionState.ENDED:
            self._stop_reconnecting()
        protocol.transport.loseConnection()
        if first is None:
            self.relogon_completed.fire(response)

    def _logon_unanswered(self, failure: Failure, protocol: ClientProtocol) -> None:
        protocol.reject(failure)
        if protocol is self._protocol and protocol.transport is not None:
            # Unanswered, or a reply that does not parse: try another
            # connection (or, for the first logon, give up).
            protocol.transport.abortConnection()

    def connection_lost(self, protocol: ClientProtocol, reason: Failure | None) -> None:
        """
        C{protocol}'s connection is gone: its waiting calls fail, and the
        session ends or reconnects.
        """
        if protocol is not self._protocol:
            return
        self._protocol = None
        self._heartbeat.stop()
        ending = protocol.ending
        self._fail_waiting(_why_lost(protocol, reason))
        self._inbox.blobs.clear()
        if self._state is SessionState.ENDED:
            self._announce_end()
            return
        told = ending is not None and ending.kind is EndingKind.DISCONNECTED
        if self.logon_response is None:
            # The first logon: logon()'s Deferred fails; no session, no
            # events but the server's own reason.
            if told and ending is not None:
                self.disconnected.fire(ending.reason, ending.text)
            return
        self._state = SessionState.RECONNECTING
        if ending is not None and ending.kind is EndingKind.BUSY:
            return  # relogon_completed said it; the next attempt follows
        if told and ending is not None:
            self.disconnected.fire(ending.reason, ending.text)
        self.connection_interrupted.fire()
        if self._reconnector.running:
            self.connection_rebuild_start.fire()


def _why_lost(protocol: ClientProtocol, reason: Failure | None) -> str:
    """
    Why a connection's waiting calls fail, in words.
    """
    ending = protocol.ending
    if protocol.broken is not None:
        return f"this client closed the connection: {protocol.broken}"
    if ending is not None and ending.kind is EndingKind.DISCONNECTED:
        name = getattr(ending.reason, "name", str(ending.reason))
        return f"the server closed the connection ({name}: {ending.text})"
    why = "the connection to the server was lost"
    if reason is not None and not reason.check(ConnectionDone):
        why += f": {reason.getErrorMessage()}"
    return why
