"""
The services the server itself answers: the framework's basic messages
(heartbeat, online queries, kick, ...) and application messages addressed
to the server (Send, Request, Blob and the answers to the server's own
queries).  Broadcasts have a module of their own (L{esf.server._broadcast}).

Each service maps message types to handlers C{handler(session, frame)};
the engine dispatches logged-on sessions' frames to them.  A handler may
raise L{esf.wire._messages.BadRequest} for a body that does not parse.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from esf.wire import _messages as m
from esf.wire._events import call
from esf.wire._frames import (
    SERVER_ID,
    DisconnectedType,
    ErrorCode,
    Frame,
    MessageType,
    as_client_type,
    encode_frame,
)

from ._config import IDS_PER_UNIT, EngineBasics
from ._counters import Count

if TYPE_CHECKING:
    from esf.interfaces import IBasicHandler, ICustomizeHandler, IPresence
    from esf.wire._pending import PendingRequests

    from ._budget import MemoryBudget
    from ._config import ServerConfig
    from ._logon import LogonRecord
    from ._session import Session

__all__ = [
    "BasicServices",
    "ApplicationServices",
    "BasicEngine",
    "ApplicationEngine",
    "TO_SERVER",
    "handler_failed",
]


log = Logger(namespace="esf.server")

#: DestUserIDs that address the server itself.
TO_SERVER = frozenset({SERVER_ID, ""})

Handler = Callable[["Session", Frame], None]


def handler_failed(
    counters: Counter[str], failure: Failure, session: Session, frames: Sequence[Frame], what: str
) -> None:
    """
    An application handler failed for C{frames} (one request, or a run of
    them it was asked about once): a L{esf.RequestError} it raised goes
    back as it is (its code and text, no log); anything else is logged once
    with its traceback, and each frame is answered C{HandlerError} with a
    short text.
    """
    error = failure.value
    if isinstance(error, m.RequestError):
        code, text = error.code, error.text[:200]
    else:
        if session.may_log():
            log.failure(
                "{what} raised for {message_type} from {session!r}",
                failure,
                what=what,
                message_type=frames[0].message_type,
                session=session,
            )
        counters[Count.HANDLER_ERRORS] += 1
        code, text = ErrorCode.HANDLER_ERROR, f"{type(error).__name__}: {error}"[:200]
    for frame in frames:
        session.error(frame, code, text)


class _Relay(Protocol):
    def frame(self, session: Session, frame: Frame) -> None: ...


class _Logons(Protocol):
    @property
    def record(self) -> LogonRecord: ...


class BasicEngine(Protocol):
    """
    What the basic services need of the engine: the settings, who is
    online, the relay (a PingByServer to a user), the application's
    handler (who may kick), the logon record and the kick itself.
    """

    @property
    def config(self) -> ServerConfig: ...

    @property
    def presence(self) -> IPresence: ...

    @property
    def relay(self) -> _Relay: ...

    @property
    def handler(self) -> IBasicHandler: ...

    @property
    def logons(self) -> _Logons: ...

    def kick_out(
        self,
        user_id: str,
        reason: str = "",
        client_type: int | None = None,
        *,
        operator: str = SERVER_ID,
        origin: str = "server_api",
    ) -> int: ...


class ApplicationEngine(EngineBasics, Protocol):
    """
    What the application services need of the engine: the settings, the
    clock, the counters and memory budget, the application's handler, the
    server's pending queries and who is online.
    """

    @property
    def budget(self) -> MemoryBudget: ...

    @property
    def customize_handler(self) -> ICustomizeHandler | None: ...

    @property
    def pending(self) -> PendingRequests: ...

    @property
    def presence(self) -> IPresence: ...


class BasicServices:
    """
    The framework messages of ESF v1 (ESFramework's basic service).
    """

    def __init__(self, engine: BasicEngine):
        self.engine = engine
        self.handlers: dict[int, Handler] = {
            MessageType.LOGON: self.second_logon,
            MessageType.HEARTBEAT: self.heartbeat,
            MessageType.GET_MY_IPE: self.get_my_ipe,
            MessageType.PING_BY_SERVER: self.ping,
            MessageType.LOGOFF: self.logoff,
            MessageType.GET_ALL_ONLINE_USERS: self.get_all_online_users,
            MessageType.QUERY_ONLINE: self.query_online,
            MessageType.QUERY_ONLINES: self.query_onlines,
            MessageType.GET_MY_DEVICES: self.get_my_devices,
            MessageType.KICK_OUT: self.kick_out,
        }

    def second_logon(self, session: Session, frame: Frame) -> None:
        session.error(frame, ErrorCode.BAD_REQUEST, "already logged on")

    def heartbeat(self, session: Session, frame: Frame) -> None:
        # Made each time (a few microseconds every heartbeat interval) rather
        # than kept: an idle session holds nothing it does not need.
        session.queue(
            encode_frame(
                self.engine.config.wire,
                MessageType.HEARTBEAT,
                user_id=SERVER_ID,
                dest_user_id=session.user_id or "",
            )
        )

    def get_my_ipe(self, session: Session, frame: Frame) -> None:
        m.Empty.decode(frame.body)
        session.reply(frame, m.GetMyIPEReply(session.address).encode())

    def ping(self, session: Session, frame: Frame) -> None:
        m.Empty.decode(frame.body)
        if frame.dest_user_id in TO_SERVER:
            session.reply(frame, b"", MessageType.PING_ACK)
        else:
            self.engine.relay.frame(session, frame)

    def logoff(self, session: Session, frame: Frame) -> None:
        session.end(DisconnectedType.LOGGED_OFF, "logged off")

    def get_all_online_users(self, session: Session, frame: Frame) -> None:
        request = m.GetAllOnlineUsers.decode(frame.body)
        wire = self.engine.config.wire
        presence = self.engine.presence
        room = wire.max_message_size - wire.header_length - 8
        # No more IDs than could fit the reply (each takes at least 2 bytes):
        # the cost is in proportion to the answer, not to who is online.
        limit = min(request.limit or room, room // 2)
        page = []
        for user_id in presence.user_ids(request.offset, limit):
            room -= 2 + len(user_id.encode("utf-8"))
            if room < 0:
                break
            page.append(user_id)
        reply = m.GetAllOnlineUsersReply(presence.user_count(), page)
        session.charge(len(page) / IDS_PER_UNIT)  # the answer's size; the next ones wait
        session.reply(frame, reply.encode())

    def query_online(self, session: Session, frame: Frame) -> None:
        m.Empty.decode(frame.body)
        online = bool(self.engine.presence.devices(frame.dest_user_id))
        session.reply(frame, m.QueryOnlineReply(online).encode())

    def query_onlines(self, session: Session, frame: Frame) -> None:
        body = frame.body
        limit = self.engine.config.max_query_ids
        # The count comes first: refuse a long query before decoding it.
        if len(body) >= 4 and int.from_bytes(body[:4], "little") > limit:
            session.error(
                frame,
                ErrorCode.TOO_LARGE,
                f"a QueryOnlines may name at most {limit} user IDs; split the query",
            )
            return
        request = m.QueryOnlines.decode(body)
        session.charge(len(request.user_ids) / IDS_PER_UNIT)
        devices = self.engine.presence.devices
        online = [bool(devices(u)) for u in request.user_ids]
        session.reply(frame, m.QueryOnlinesReply(online).encode())

    def get_my_devices(self, session: Session, frame: Frame) -> None:
        m.Empty.decode(frame.body)
        assert session.user_id is not None  # logged on
        kinds = [h.client_type for h in self.engine.presence.devices(session.user_id)]
        session.reply(frame, m.GetMyDevicesReply(kinds).encode())

    def kick_out(self, session: Session, frame: Frame) -> None:
        request = m.KickOut.decode(frame.body)
        operator, target = session.user_id, frame.dest_user_id
        engine = self.engine
        if operator in engine.config.admins:
            allowed: Deferred[Any] = succeed(True)
        else:
            allowed = call(engine.handler.can_kick_out, operator, target, None)
        allowed.addBoth(self._kick_authorised, session, frame, target, request.reason)

    def _kick_authorised(
        self, allowed: Any, session: Session, frame: Frame, target: str, reason: str
    ) -> None:
        if isinstance(allowed, Failure):
            if session.may_log():
                log.failure("can_kick_out raised", allowed)
            allowed = False
        if not session.logged_on:
            return
        if not allowed:
            if session.may_log():
                self.engine.logons.record.flush_for(session.user_id, target)
                log.info(
                    "kick of {target} by {operator} refused",
                    esf_event="kick_refused",
                    origin="client",
                    operator=session.user_id,
                    target=target,
                    reason=reason,
                )
            session.reply(frame, m.KickOutReply(False, "not authorised to kick").encode())
            return
        if not self.engine.presence.devices(target):
            session.reply(frame, m.KickOutReply(False, f"{target} is not online").encode())
            return
        session.reply(frame, m.KickOutReply(True, "").encode())
        assert session.user_id is not None  # logged on
        self.engine.kick_out(target, reason, operator=session.user_id, origin="client")


class ApplicationServices:
    """
    Application messages addressed to the server, handed to the
    application's L{ICustomizeHandler} and L{IGroupManager}.
    """

    def __init__(self, engine: ApplicationEngine):
        self.engine = engine
        self.handlers: dict[int, Handler] = {
            MessageType.SEND: self.send,
            MessageType.SEND_CERTAINLY: self.send,
            MessageType.REQUEST: self.request,
            MessageType.RESPONSE: self.answer,
            MessageType.ERROR: self.answer,
            MessageType.ACK: self.ack,
            MessageType.PING_ACK: self.ack,
            MessageType.BLOB: self.blob,
        }

    def send(self, session: Session, frame: Frame) -> None:
        """
        Send (202) and SendCertainly (205) to the server: to the handler;
        SendCertainly is acknowledged once the handler has run.
        """
        info = m.Information.decode(frame.body)
        ack = frame.message_type == MessageType.SEND_CERTAINLY
        if ack and not frame.message_id:
            raise m.BadRequest("a SendCertainly needs a non-zero MessageID")
        self._handle_information(session, frame, info.information_type, info.payload, ack)

    def _handle_information(
        self, session: Session, frame: Frame, information_type: int, payload: bytes, ack: bool
    ) -> None:
        engine = self.engine
        if engine.customize_handler is None:
            engine.counters[Count.UNHANDLED] += 1
            session.error(frame, ErrorCode.HANDLER_ERROR, "this server has no customize handler")
            return
        assert session.client_type is not None  # logged on
        d = call(
            engine.customize_handler.handle_information,
            session.user_id,
            as_client_type(session.client_type),
            information_type,
            payload,
        )
        if ack:
            body = m.Ack(information_type).encode()
            d.addCallback(lambda _: session.reply(frame, body, MessageType.ACK))
        d.addErrback(self._handler_failed, session, frame, "handle_information")

    def request(self, session: Session, frame: Frame) -> None:
        if not frame.message_id:
            raise m.BadRequest("a Request needs a non-zero MessageID")
        info = m.Information.decode(frame.body)
        engine = self.engine
        if engine.customize_handler is None:
            session.error(frame, ErrorCode.HANDLER_ERROR, "this server has no customize handler")
            return
        assert session.client_type is not None  # logged on
        d = call(
            engine.customize_handler.handle_query,
            session.user_id,
            as_client_type(session.client_type),
            info.information_type,
            info.payload,
        )
        d.addCallback(self._answer_request, session, frame, info.information_type)
        d.addErrback(self._handler_failed, session, frame, "handle_query")

    def _answer_request(
        self, result: Any, session: Session, frame: Frame, information_type: int
    ) -> None:
        if result is None:
            result = b""
        if not isinstance(result, (bytes, bytearray, memoryview)):
            raise TypeError(f"handle_query returned {type(result).__name__}, not bytes")
        payload = bytes(result)
        wire = self.engine.config.wire
        if wire.header_length + 4 + len(payload) > wire.max_message_size:
            session.error(
                frame,
                ErrorCode.TOO_LARGE,
                f"the handler's {len(payload)}-byte answer does not fit one message",
            )
            return
        body = m.Information(information_type, payload).encode()
        session.reply(frame, body, MessageType.RESPONSE)

    def _handler_failed(self, failure: Failure, session: Session, frame: Frame, what: str) -> None:
        handler_failed(self.engine.counters, failure, session, (frame,), what)

    def answer(self, session: Session, frame: Frame) -> None:
        """
        A Response (204) or Error (120) to the server: the answer to one of
        the server's own queries, from the session that was asked.
        """
        try:
            if frame.message_type == MessageType.ERROR:
                error = m.Error.decode(frame.body)
                result: Any = m.RequestError(error.code, error.text)
            else:
                result = m.Information.decode(frame.body).payload
        except m.BadRequest as e:
            result = m.RequestError(ErrorCode.BAD_REQUEST, f"malformed answer: {e}")
        if not self.engine.pending.answer(frame.message_id, session, result):
            # Perhaps another node asked it (a cluster's presence forwards it).
            if self.engine.presence.forward_answer(session, frame):
                return
            self.engine.counters[Count.UNEXPECTED_ANSWERS] += 1
            log.debug(
                "dropped an answer nobody waits for: {message_type} #{message_id} "
                "from {session!r}",
                message_type=frame.message_type,
                message_id=frame.message_id,
                session=session,
            )

    def ack(self, session: Session, frame: Frame) -> None:
        """
        An Ack or PingAck to the server: the server sends nothing that asks
        for one, so there is nothing to do.
        """

    def blob(self, session: Session, frame: Frame) -> None:
        """
        A Blob fragment to the server: reassembled only when a handler will
        read it, within the session's bounds, the user's
        (C{max_blob_bytes_per_user}, over all their devices) and the
        server's memory budget.
        """
        fragment = m.BlobFragment.decode(frame.body)
        engine = self.engine
        if engine.customize_handler is None:
            engine.counters[Count.UNHANDLED] += 1
            session.error(frame, ErrorCode.HANDLER_ERROR, "this server has no customize handler")
            return
        config = engine.config
        blobs = session.blobs
        if blobs is None:
            blobs = session.blobs = m.BlobAssembler(
                config.max_blob_size, config.max_concurrent_blobs, config.blob_idle_timeout
            )
        budget = engine.budget
        user_id = session.user_id
        assert user_id is not None  # logged on
        size = len(fragment.payload)
        before = blobs.buffered
        try:
            if not (fragment.is_last and fragment.fragment_index == 0):
                # Held until the blob is complete: within the bounds?
                if budget.blob_bytes(user_id) + size > config.max_blob_bytes_per_user:
                    blobs.discard(fragment.blob_id)
                    raise m.BlobError(
                        ErrorCode.TOO_LARGE,
                        f"{user_id}'s blobs in progress would pass "
                        f"{config.max_blob_bytes_per_user} bytes; blob {fragment.blob_id} "
                        "dropped",
                    )
                if not budget.fits(size):
                    blobs.discard(fragment.blob_id)
                    raise m.BlobError(
                        ErrorCode.RATE_LIMITED,
                        f"the server's memory budget is spent; blob {fragment.blob_id} "
                        "dropped, try later",
                    )
            payload = blobs.add(fragment, engine.clock.seconds())
        except m.BlobError as e:
            engine.counters[Count.BLOB_ERRORS] += 1
            session.error(frame, e.code, e.text)
            return
        finally:
            budget.add_blob_bytes(user_id, blobs.buffered - before)
        if payload is not None:
            self._handle_information(
                session, frame, fragment.information_type, payload, bool(frame.message_id)
            )
