"""
The client engine (ESFramework's C{RapidPassiveEngine}): logs on, keeps the
session alive with heartbeats, reconnects and logs on again by itself, and
offers every call of the ESF v1 protocol as a Deferred.

Reconnection is Twisted's L{ClientService} with an injectable clock and
backoff policy; the engine adds what a session protocol needs on top: the
logon on every new connection, the rules for when I{not} to reconnect
(pushed out, kicked, refused, logged off), heartbeats with dead-server
detection, and request/response matching.
"""

from __future__ import annotations

import itertools
import random
from typing import Any, Callable

import attrs
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import _messages as m
from ._events import Event, call
from ._wire import as_client_type as _client_type
from ._wire import (
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
    validate_id,
)
from .interfaces import ICustomizeHandler

__all__ = [
    "ClientEngine",
    "ClientProtocol",
    "LogonResponse",
    "LogonFailed",
    "NotConnected",
]

log = Logger(namespace="esf.client")


@attrs.frozen
class LogonResponse:
    """
    What the server answered to a logon.
    """

    result: LogonResult | int
    failure_cause: str
    heartbeat_interval: int
    heartbeat_timeout: int
    max_message_size: int

    @property
    def succeeded(self) -> bool:
        return self.result == LogonResult.SUCCEED


class LogonFailed(Exception):
    """
    The server refused the logon.

    @ivar response: the L{LogonResponse}.
    """

    def __init__(self, response: LogonResponse):
        super().__init__(f"{_name(response.result)}: {response.failure_cause}")
        self.response = response
        self.result = response.result
        self.cause = response.failure_cause


class NotConnected(Exception):
    """
    The call needs a logged-on session and there is none, or the
    connection dropped while the call waited for its answer.
    """


def _name(value) -> str:
    return getattr(value, "name", str(value))


#: Replies to this client's own requests, matched by MessageID.
_REPLY_TYPES = frozenset(
    {
        MessageType.LOGON,
        MessageType.GET_MY_IPE,
        MessageType.PING_ACK,
        MessageType.KICK_OUT,
        MessageType.GET_ALL_ONLINE_USERS,
        MessageType.QUERY_ONLINE,
        MessageType.QUERY_ONLINES,
        MessageType.GET_MY_DEVICES,
        MessageType.ERROR,
        MessageType.RESPONSE,
        MessageType.ACK,
    }
)


@implementer(IPushProducer)
class ClientProtocol(Protocol):
    """
    One connection of a L{ClientEngine}: bytes in, frames to the engine.
    """

    def __init__(self, engine: ClientEngine):
        self.engine = engine
        self.decoder = FrameDecoder(engine.wire)
        self.paused = False

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        setter = getattr(self.transport, "setTcpNoDelay", None)
        if setter is not None:
            setter(True)
        self.engine._connection_made(self)

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except FrameError as e:
            frames = e.frames
            log.error("the server sent an invalid frame: {error}", error=e.message)
            self.transport.abortConnection()
        engine = self.engine
        engine._last_received = engine.clock.seconds()
        for frame in frames:
            engine._frame_received(self, frame)

    def connectionLost(self, reason: Failure = None) -> None:
        self.engine._connection_lost(self, reason)

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.engine._drained()

    def stopProducing(self) -> None:
        pass


class _Factory(Factory):
    noisy = False

    def __init__(self, engine: ClientEngine):
        self.engine = engine

    def buildProtocol(self, addr):
        return ClientProtocol(self.engine)


class ClientEngine:
    """
    A logged-on session with an esf server that survives connection loss.

    Create it, subscribe to its events, then call L{logon}; every other call
    returns a Deferred and needs a logged-on session.

    Events (L{esf.interfaces.IEvent}; subscribe with
    C{client.being_kicked_out.subscribe(callback)}):
      - C{connection_interrupted()}: the connection dropped; a reconnect
        follows unless the session was ended for good.
      - C{connection_rebuild_start()}: reconnecting.
      - C{relogon_completed(response)}: a re-logon after a reconnect was
        answered (a L{LogonResponse}; a failure stops reconnecting).
      - C{being_pushed_out(cause)}: the same user logged on with this
        device elsewhere; no reconnect.
      - C{being_kicked_out(operator, reason)}: no reconnect.
      - C{disconnected(disconnected_type, text)}: the server closed the
        connection for another reason (a L{esf.DisconnectedType}).
      - C{my_device_online(client_type)}, C{my_device_offline(client_type)}.
      - C{broadcast_received(sender_id, group_id, information_type, payload)}.
      - C{information_received(sender_id, client_type, information_type,
        payload)}: a Send, SendCertainly or Blob (also handed to the
        handler, if any).
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
        max_blob_size: int = 64 * 1024 * 1024,
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
        self.retry_policy = retry_policy or backoffPolicy(
            initialDelay=1.0, maxDelay=30.0, factor=2.0, jitter=random.random
        )
        m.encode_str(password)  # fail early on an impossible password
        validate_id(user_id, self.wire)

        self.connection_interrupted = Event("connection_interrupted")
        self.connection_rebuild_start = Event("connection_rebuild_start")
        self.relogon_completed = Event("relogon_completed")
        self.being_pushed_out = Event("being_pushed_out")
        self.being_kicked_out = Event("being_kicked_out")
        self.disconnected = Event("disconnected")
        self.my_device_online = Event("my_device_online")
        self.my_device_offline = Event("my_device_offline")
        self.broadcast_received = Event("broadcast_received")
        self.information_received = Event("information_received")

        #: The current L{LogonResponse}, once logged on.
        self.logon_response: LogonResponse | None = None
        self._protocol: ClientProtocol | None = None
        self._logged_on = False
        self._service: ClientService | None = None
        self._first_logon: Deferred | None = None
        self._pending: dict[int, tuple[Deferred, Any]] = {}
        self._ids = itertools.count(1)
        self._blob_ids = itertools.count(1)
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = clock
        self._last_received = 0.0
        self._ending: tuple | None = None
        self._drain_waiters: list[Deferred] = []
        self._blobs = m.BlobAssembler(max_blob_size, max_concurrent=16)
        #: Connections in a row that ended before a successful logon.
        self._fruitless = 0

    # -- life ------------------------------------------------------------------

    @property
    def logged_on(self) -> bool:
        """
        Whether a session is logged on now.
        """
        return self._logged_on

    @property
    def channel_is_busy(self) -> bool:
        """
        Whether the connection's unsent output is above the transport's
        buffer threshold; L{wait_for_drain} fires when it no longer is.
        """
        return self._protocol is not None and self._protocol.paused

    def wait_for_drain(self) -> Deferred:
        """
        A Deferred that fires once the channel is not busy.
        """
        if not self.channel_is_busy:
            return succeed(None)
        d = Deferred()
        self._drain_waiters.append(d)
        return d

    def logon(self) -> Deferred:
        """
        Connect and log on.

        @return: a Deferred firing with the L{LogonResponse}, or failing with
            L{LogonFailed} (refused) or the connection error (the first
            connection could not be made).  Later reconnects log on again by
            themselves and report through C{relogon_completed}.
        """
        if self._service is not None:
            raise RuntimeError("logon() was already called")
        first = self._first_logon = Deferred()
        self._service = ClientService(
            self.endpoint,
            _Factory(self),
            retryPolicy=self._retry_delay,
            clock=self.clock,
        )
        # Asked before starting: an endpoint may fail at once.
        connected = self._service.whenConnected(failAfterFailures=1)
        self._service.startService()

        def could_not_connect(failure):
            if failure.check(CancelledError):
                return None
            # This runs inside ClientService's state machine, which must not
            # be re-entered (stopService, or a close() by whoever waits for
            # the logon): go on from the event loop.
            self.clock.callLater(0, first_connection_failed, failure)
            return None

        def first_connection_failed(failure):
            self._stop_reconnecting()
            if self._first_logon is not None:
                first, self._first_logon = self._first_logon, None
                first.errback(failure)

        connected.addErrback(could_not_connect)
        return first

    def close(self) -> Deferred:
        """
        Stop reconnecting and close the connection (no Logoff is sent; see
        L{logoff}).  Fires when the connection is closed.
        """
        if self._protocol is not None and self._ending is None:
            self._ending = ("closed",)  # no connection_interrupted for this
        self._logged_on = False
        return self._stop_reconnecting()

    def _stop_reconnecting(self) -> Deferred:
        service = self._service
        if service is None or not service.running:
            return succeed(None)
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            # A registered producer would hold the close back (TLS waits
            # for it to unregister before its shutdown).
            protocol.transport.unregisterProducer()
        return service.stopService().addBoth(lambda _: None)

    def _retry_delay(self, attempt: int) -> float:
        # ClientService counts failures from the last connection made; a
        # server that accepts and then closes before the logon succeeds
        # (full, shutting down, silent) must not be retried at the first
        # delay forever.
        return self.retry_policy(attempt + self._fruitless)

    @property
    def _reconnecting(self) -> bool:
        return self._service is not None and self._service.running

    # -- protocol callbacks ----------------------------------------------------

    def _connection_made(self, protocol: ClientProtocol) -> None:
        self._protocol = protocol
        self._ending = None
        self._last_received = self.clock.seconds()
        message_id = self._next_id()
        body = m.Logon(m.PROTOCOL_VERSION, self.system_token, self.password).encode()
        d = self._expect(message_id, timeout=self.request_timeout)
        protocol.write(
            encode_frame(
                self.wire,
                MessageType.LOGON,
                body,
                client_type=self.client_type,
                message_id=message_id,
                user_id=self.user_id,
                dest_user_id=SERVER_ID,
            )
        )
        d.addCallbacks(
            self._logon_answered,
            self._logon_unanswered,
            callbackArgs=(protocol,),
            errbackArgs=(protocol,),
        )

    def _logon_answered(self, frame: Frame, protocol: ClientProtocol) -> None:
        reply = m.LogonReply.decode(frame.body)
        response = LogonResponse(
            reply.result,
            reply.failure_cause,
            reply.heartbeat_interval,
            reply.heartbeat_timeout,
            reply.max_message_size,
        )
        first, self._first_logon = self._first_logon, None
        if response.succeeded:
            self.logon_response = response
            self._logged_on = True
            self._fruitless = 0
            if self._heartbeat.running:
                self._heartbeat.stop()
            self._heartbeat.start(max(response.heartbeat_interval, 1), now=True)
        elif first is None and response.result == LogonResult.BUSY:
            # "Try later": the server closes this connection and the
            # client goes on reconnecting, with a growing delay.
            self._ending = ("busy",)
        else:
            # A refused logon or re-logon ends the session for good.
            self._ending = ("refused", response)
            self._stop_reconnecting()
        if first is not None:
            if response.succeeded:
                first.callback(response)
            else:
                first.errback(LogonFailed(response))
        else:
            self.relogon_completed.fire(response)

    def _logon_unanswered(self, failure: Failure, protocol: ClientProtocol) -> None:
        first, self._first_logon = self._first_logon, None
        if first is not None:
            self._stop_reconnecting()
            first.errback(failure)
        elif protocol is self._protocol:
            # A re-logon went unanswered: try another connection.
            protocol.transport.abortConnection()

    def _connection_lost(self, protocol: ClientProtocol, reason: Failure | None) -> None:
        if protocol is not self._protocol:
            return
        self._protocol = None
        if not self._logged_on:
            self._fruitless += 1
        self._logged_on = False
        if self._heartbeat.running:
            self._heartbeat.stop()
        why = "the connection to the server was lost"
        if reason is not None and not reason.check(ConnectionDone):
            why += f": {reason.getErrorMessage()}"
        if self._ending is not None and self._ending[0] == "disconnected":
            why = f"the server closed the connection ({_name(self._ending[1])}: {self._ending[2]})"
        pending, self._pending = self._pending, {}
        for d, timer in pending.values():
            if timer.active():
                timer.cancel()
            d.errback(NotConnected(why))
        for d in self._drain_waiters:
            d.errback(NotConnected(why))
        self._drain_waiters = []
        ending, self._ending = self._ending, None
        if ending is None:
            self.connection_interrupted.fire()
            if self._reconnecting:
                self.connection_rebuild_start.fire()
            return
        kind, *args = ending
        if kind in ("pushed_out", "kicked", "refused", "logged_off", "closed", "busy"):
            return
        if kind == "disconnected":
            self.disconnected.fire(*args)
            self.connection_interrupted.fire()
            if self._reconnecting:
                self.connection_rebuild_start.fire()

    def _drained(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for d in waiters:
            d.callback(None)

    # -- incoming frames ---------------------------------------------------------

    def _frame_received(self, protocol: ClientProtocol, frame: Frame) -> None:
        message_type = frame.message_type
        if frame.message_id and message_type in _REPLY_TYPES:
            pending = self._pending.pop(frame.message_id, None)
            if pending is not None:
                d, timer = pending
                timer.cancel()
                d.callback(frame)
            else:
                log.debug("dropped an answer nobody waits for: {frame!r}", frame=frame)
            return
        handler = self._incoming.get(message_type)
        if handler is None:
            log.info("ignored message type {message_type}", message_type=message_type)
            return
        try:
            handler(self, protocol, frame)
        except m.BadRequest as e:
            log.warn(
                "malformed {message_type} from {sender}: {error}",
                message_type=message_type,
                sender=frame.user_id,
                error=e,
            )
            self._answer_error(protocol, frame, ErrorCode.BAD_REQUEST, str(e))

    def _on_heartbeat(self, protocol, frame) -> None:
        pass  # the echo's arrival already counted as activity

    def _on_pushed_out(self, protocol, frame) -> None:
        cause = m.BeingPushedOutNotify.decode(frame.body).cause
        self._end_for_good("pushed_out")
        self.being_pushed_out.fire(cause)

    def _on_kicked(self, protocol, frame) -> None:
        notice = m.BeingKickedOutNotify.decode(frame.body)
        self._end_for_good("kicked")
        self.being_kicked_out.fire(notice.operator, notice.reason)

    def _on_disconnect_notice(self, protocol, frame) -> None:
        notice = m.DisconnectNotice.decode(frame.body)
        if self._ending is not None:
            return  # the pushed-out / kicked / refused notice came first
        if notice.reason in (
            DisconnectedType.BEING_PUSHED_OUT,
            DisconnectedType.BEING_KICKED_OUT,
            DisconnectedType.NEW_CONNECTION_IGNORED,
            DisconnectedType.LOGON_FAILED,
        ):
            self._end_for_good("closed")
        else:
            self._ending = ("disconnected", notice.reason, notice.text)

    def _end_for_good(self, kind: str) -> None:
        self._ending = (kind,)
        self._logged_on = False
        self._stop_reconnecting()

    def _on_device_online(self, protocol, frame) -> None:
        self.my_device_online.fire(_client_type(frame.client_type))

    def _on_device_offline(self, protocol, frame) -> None:
        self.my_device_offline.fire(_client_type(frame.client_type))

    def _on_ping(self, protocol, frame) -> None:
        # Another user pings us through the server: answer it.
        self._write(MessageType.PING_ACK, b"", message_id=frame.message_id, dest=frame.user_id)

    def _on_information(self, protocol, frame) -> None:
        info = m.Information.decode(frame.body)
        self._deliver(
            frame,
            info.information_type,
            info.payload,
            ack=frame.message_type == MessageType.SEND_CERTAINLY and frame.message_id != 0,
        )

    def _on_blob(self, protocol, frame) -> None:
        fragment = m.BlobFragment.decode(frame.body)
        try:
            payload = self._blobs.add(
                fragment, self.clock.seconds(), key=(frame.user_id, fragment.blob_id)
            )
        except m.BlobError as e:
            self._answer_error(protocol, frame, e.code, e.text)
            return
        if payload is not None:
            self._deliver(frame, fragment.information_type, payload, ack=frame.message_id != 0)

    def _deliver(self, frame: Frame, information_type: int, payload: bytes, ack: bool) -> None:
        sender, kind = frame.user_id, _client_type(frame.client_type)
        self.information_received.fire(sender, kind, information_type, payload)
        if self.handler is None:
            d = succeed(None)
        else:
            d = call(self.handler.handle_information, sender, kind, information_type, payload)
        if ack:
            body = m.Ack(information_type).encode()
            d.addCallback(
                lambda _: self._write(
                    MessageType.ACK, body, message_id=frame.message_id, dest=sender
                )
            )
        d.addErrback(self._handler_failed, frame)

    def _on_request(self, protocol, frame) -> None:
        info = m.Information.decode(frame.body)
        if self.handler is None:
            self._answer_error(protocol, frame, ErrorCode.HANDLER_ERROR, "this client answers no queries")
            return
        d = call(
            self.handler.handle_query,
            frame.user_id,
            _client_type(frame.client_type),
            info.information_type,
            info.payload,
        )

        def answer(result):
            body = m.Information(info.information_type, b"" if result is None else bytes(result))
            self._write(
                MessageType.RESPONSE, body.encode(), message_id=frame.message_id, dest=frame.user_id
            )

        d.addCallback(answer).addErrback(self._handler_failed, frame)

    def _on_broadcast(self, protocol, frame) -> None:
        info = m.Information.decode(frame.body)
        self.broadcast_received.fire(
            frame.user_id, frame.dest_user_id, info.information_type, info.payload
        )

    def _handler_failed(self, failure: Failure, frame: Frame) -> None:
        if failure.check(NotConnected):
            return
        log.failure("the client handler raised for {frame!r}", failure, frame=frame)
        error = failure.value
        self._answer_error(
            self._protocol, frame, ErrorCode.HANDLER_ERROR, f"{type(error).__name__}: {error}"[:200]
        )

    def _answer_error(self, protocol, frame: Frame, code: ErrorCode, text: str) -> None:
        if frame.message_id and protocol is not None and protocol is self._protocol:
            body = m.Error(frame.message_type, code, text).encode()
            self._write(MessageType.ERROR, body, message_id=frame.message_id, dest=frame.user_id)

    _incoming = {
        MessageType.HEARTBEAT: _on_heartbeat,
        MessageType.BEING_PUSHED_OUT_NOTIFY: _on_pushed_out,
        MessageType.BEING_KICKED_OUT_NOTIFY: _on_kicked,
        MessageType.DISCONNECT_NOTICE: _on_disconnect_notice,
        MessageType.MY_DEVICE_ONLINE: _on_device_online,
        MessageType.MY_DEVICE_OFFLINE: _on_device_offline,
        MessageType.PING_BY_SERVER: _on_ping,
        MessageType.SEND: _on_information,
        MessageType.SEND_CERTAINLY: _on_information,
        MessageType.REQUEST: _on_request,
        MessageType.BLOB: _on_blob,
        MessageType.BROADCAST: _on_broadcast,
    }

    # -- heartbeat -----------------------------------------------------------------

    def _beat(self) -> None:
        protocol = self._protocol
        if protocol is None or not self._logged_on:
            return  # gone, or leaving (logged off, pushed out, closed)
        response = self.logon_response
        if self.clock.seconds() - self._last_received >= response.heartbeat_timeout:
            log.warn(
                "nothing from the server for {timeout} s: treating the connection as lost",
                timeout=response.heartbeat_timeout,
            )
            protocol.transport.abortConnection()
            return
        self._write(MessageType.HEARTBEAT)
        self._blobs.expire(self.clock.seconds())

    # -- output ----------------------------------------------------------------------

    def _next_id(self) -> int:
        while True:
            message_id = next(self._ids) % 0x7FFFFFFF + 1
            if message_id not in self._pending:
                return message_id

    def _write(
        self, message_type: int, body: bytes = b"", *, message_id: int = 0, dest: str = SERVER_ID
    ) -> None:
        protocol = self._protocol
        if protocol is None or not self._logged_on:
            raise NotConnected("not logged on")
        protocol.write(
            encode_frame(
                self.wire,
                message_type,
                body,
                client_type=self.client_type,
                message_id=message_id,
                user_id=self.user_id,
                dest_user_id=dest,
            )
        )

    def _expect(self, message_id: int, timeout: float | None) -> Deferred:
        d = Deferred(lambda _: self._forget(message_id))
        timer = self.clock.callLater(
            self.request_timeout if timeout is None else timeout, self._timed_out, message_id
        )
        self._pending[message_id] = (d, timer)
        return d

    def _forget(self, message_id: int) -> None:
        pending = self._pending.pop(message_id, None)
        if pending is not None and pending[1].active():
            pending[1].cancel()

    def _timed_out(self, message_id: int) -> None:
        pending = self._pending.pop(message_id, None)
        if pending is not None:
            pending[0].errback(m.RequestError(ErrorCode.TIMEOUT, "no answer in time"))

    def _request(
        self,
        message_type: int,
        body: bytes = b"",
        dest: str = SERVER_ID,
        timeout: float | None = None,
    ) -> Deferred:
        """
        Send a request; fire with the answer's frame, fail with
        L{esf.RequestError} on an Error answer or a timeout, or with
        L{NotConnected}.
        """
        if self._protocol is None or not self._logged_on:
            return fail(NotConnected("not logged on"))
        message_id = self._next_id()
        d = self._expect(message_id, timeout)
        try:
            self._write(message_type, body, message_id=message_id, dest=dest)
        except ValueError as e:
            self._forget(message_id)
            return fail(m.RequestError(ErrorCode.TOO_LARGE, str(e)))
        return d.addCallback(_raise_error)

    # -- framework calls ---------------------------------------------------------------

    def ping(self, timeout: float | None = None) -> Deferred:
        """
        Round-trip time to the server, in seconds.
        """
        start = self.clock.seconds()
        d = self._request(MessageType.PING_BY_SERVER, timeout=timeout)
        return d.addCallback(lambda _: self.clock.seconds() - start)

    def ping_by_server(self, user_id: str, timeout: float | None = None) -> Deferred:
        """
        Round-trip time to another user's client, through the server.
        """
        start = self.clock.seconds()
        d = self._request(MessageType.PING_BY_SERVER, dest=user_id, timeout=timeout)
        return d.addCallback(lambda _: self.clock.seconds() - start)

    def get_my_ipe(self) -> Deferred:
        """
        This client's address as the server sees it, C{"host:port"}.
        """
        d = self._request(MessageType.GET_MY_IPE)
        return d.addCallback(lambda f: m.GetMyIPEReply.decode(f.body).address)

    async def _all_online_users(self) -> list[str]:
        users: list[str] = []
        while True:
            frame = await self._request(
                MessageType.GET_ALL_ONLINE_USERS, m.GetAllOnlineUsers(len(users), 0).encode()
            )
            page = m.GetAllOnlineUsersReply.decode(frame.body)
            users.extend(page.user_ids)
            if not page.user_ids or len(users) >= page.total:
                return users

    def get_all_online_users(self) -> Deferred:
        """
        Every online user's ID, sorted (as many requests as it takes).
        """
        return Deferred.fromCoroutine(self._all_online_users())

    def is_user_online(self, user_id: str) -> Deferred:
        """
        Whether C{user_id} is online.
        """
        d = self._request(MessageType.QUERY_ONLINE, dest=user_id)
        return d.addCallback(lambda f: m.QueryOnlineReply.decode(f.body).online)

    def query_onlines(self, user_ids) -> Deferred:
        """
        C{{user_id: online}} for several users at once.
        """
        user_ids = list(user_ids)
        d = self._request(MessageType.QUERY_ONLINES, m.QueryOnlines(user_ids).encode())
        return d.addCallback(
            lambda f: dict(zip(user_ids, m.QueryOnlinesReply.decode(f.body).online))
        )

    def get_my_devices(self) -> Deferred:
        """
        The L{ClientType}s of this user's devices online now, this one
        included.
        """
        d = self._request(MessageType.GET_MY_DEVICES)
        return d.addCallback(
            lambda f: [_client_type(k) for k in m.GetMyDevicesReply.decode(f.body).client_types]
        )

    def kick_out(self, user_id: str, reason: str = "") -> Deferred:
        """
        Ask the server to kick C{user_id}; fails with L{esf.RequestError}
        (C{NOT_AUTHORIZED}) when the server refuses.
        """
        d = self._request(MessageType.KICK_OUT, m.KickOut(reason).encode(), dest=user_id)

        def answered(frame):
            reply = m.KickOutReply.decode(frame.body)
            if not reply.ok:
                raise m.RequestError(ErrorCode.NOT_AUTHORIZED, reply.cause)

        return d.addCallback(answered)

    def logoff(self) -> Deferred:
        """
        Leave gracefully: the server ends the session (C{LoggedOff}) and this
        client does not reconnect.  Fires when the connection is closed.
        """
        if self._protocol is not None and self._logged_on:
            self._write(MessageType.LOGOFF)
        self._ending = ("logged_off",)
        self._logged_on = False
        return self._stop_reconnecting()

    # -- application messages --------------------------------------------------------

    def send(
        self, user_id: str, information_type: int, payload: bytes = b"", client_type: int | None = None
    ) -> None:
        """
        Send a one-way message to a user (every device, or C{client_type})
        or to the server (C{"_0"}).

        @raise NotConnected: not logged on.
        """
        self._write(
            MessageType.SEND,
            m.Information(information_type, payload).encode(),
            dest=device_address(user_id, client_type),
        )

    def query(
        self,
        user_id: str,
        information_type: int,
        payload: bytes = b"",
        timeout: float | None = None,
        client_type: int | None = None,
    ) -> Deferred:
        """
        Ask a user's client (or the server, C{"_0"}) and get its answer's
        payload; remote errors fail with L{esf.RequestError}.
        """
        d = self._request(
            MessageType.REQUEST,
            m.Information(information_type, payload).encode(),
            dest=device_address(user_id, client_type),
            timeout=timeout,
        )
        return d.addCallback(lambda f: m.Information.decode(f.body).payload)

    def send_certainly(
        self,
        user_id: str,
        information_type: int,
        payload: bytes = b"",
        timeout: float | None = None,
        client_type: int | None = None,
    ) -> Deferred:
        """
        Send a message that the receiver acknowledges once its handler has
        run; fires then.
        """
        d = self._request(
            MessageType.SEND_CERTAINLY,
            m.Information(information_type, payload).encode(),
            dest=device_address(user_id, client_type),
            timeout=timeout,
        )
        return d.addCallback(lambda _: None)

    def send_blob(
        self,
        user_id: str,
        information_type: int,
        payload: bytes,
        fragment_size: int | None = None,
        timeout: float | None = None,
    ) -> Deferred:
        """
        Send a payload of any size (up to the receiver's blob bound) in
        fragments; fires when the receiver has acknowledged the last one.
        Fragments are written only while the channel is not busy.
        """
        return Deferred.fromCoroutine(
            self._send_blob(user_id, information_type, payload, fragment_size, timeout)
        )

    async def _send_blob(self, user_id, information_type, payload, fragment_size, timeout):
        limit = self.logon_response.max_message_size if self.logon_response else 1 << 20
        size = fragment_size or (min(limit, self.wire.max_message_size) - self.wire.header_length - 13)
        fragments = m.fragment_blob(information_type, next(self._blob_ids), payload, size)
        for fragment in fragments[:-1]:
            await self.wait_for_drain()
            self._write(MessageType.BLOB, fragment.encode(), dest=user_id)
        await self.wait_for_drain()
        await self._request(MessageType.BLOB, fragments[-1].encode(), dest=user_id, timeout=timeout)

    def broadcast(
        self, group_id: str, information_type: int, payload: bytes = b"", timeout: float | None = None
    ) -> Deferred:
        """
        Broadcast to a group's online members (or C{"*"}); fires once the
        server has fanned it out.
        """
        d = self._request(
            MessageType.BROADCAST,
            m.Information(information_type, payload).encode(),
            dest=group_id,
            timeout=timeout,
        )
        return d.addCallback(lambda _: None)


def _raise_error(frame: Frame) -> Frame:
    if frame.message_type == MessageType.ERROR:
        error = m.Error.decode(frame.body)
        raise m.RequestError(error.code, error.text)
    return frame
