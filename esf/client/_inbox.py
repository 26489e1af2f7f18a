"""
What reaches a client unasked: the server's notices (pushed out, kicked,
disconnected, my other devices), other users' and the server's messages,
queries and blobs, handed to the application's handler and events.

Answers to the client's own requests go to L{esf.client._calls}; a notice
that ends the session goes to the engine, which owns the session's life.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from esf.wire import _messages as m
from ._calls import ANSWER_TYPES
from ._state import ClientCount
from ._state import Ending, EndingKind, NotConnected
from esf.wire._events import call
from esf.wire._frames import (
    SERVER_ID,
    DisconnectedType,
    ErrorCode,
    Frame,
    MessageType,
    as_client_type,
    device_address,
)

if TYPE_CHECKING:
    from ._engine import ClientEngine, ClientProtocol

__all__ = ["ClientBlobs", "Inbox"]

log = Logger(namespace="esf.client")

MiB = 1024 * 1024

#: Message types the server's offline store delivers.
_STORED_TYPES = frozenset({MessageType.SEND, MessageType.SEND_CERTAINLY, MessageType.BLOB})


class ClientBlobs:
    """
    Blobs from other users (and the server) being reassembled, bounded per
    sender and for the whole client: a sender may have at most
    C{max_per_sender} blobs in progress, each at most C{max_blob_size}
    bytes; all senders together at most C{max_blobs} blobs and
    C{max_bytes} buffered bytes.  Blobs idle for C{idle_timeout} seconds
    are dropped.

    One L{esf.wire._messages.BlobAssembler} per sender does the reassembly; this
    adds the bounds across senders, which it cannot see.
    """

    def __init__(
        self,
        max_blob_size: int = 16 * MiB,
        max_per_sender: int = 2,
        max_bytes: int = 64 * MiB,
        max_blobs: int = 16,
        idle_timeout: float = 60.0,
    ):
        self.max_blob_size = max_blob_size
        self.max_per_sender = max_per_sender
        self.max_bytes = max_bytes
        self.max_blobs = max_blobs
        self.idle_timeout = idle_timeout
        self._senders: dict[str, m.BlobAssembler] = {}

    @property
    def pending(self) -> int:
        """
        How many blobs are in progress, from every sender.
        """
        return sum(a.pending for a in self._senders.values())

    @property
    def buffered(self) -> int:
        """
        How many payload bytes wait for the rest of their blob.
        """
        return sum(a.buffered for a in self._senders.values())

    def add(
        self, sender: str, fragment: m.BlobFragment, now: float, key: Any = None
    ) -> bytes | None:
        """
        Add a fragment from C{sender}; return the whole payload when it was
        the last one.

        @raise BlobError: a bound is passed or the fragment is out of order.
        """
        assembler = self._senders.get(sender)
        buffered = not (fragment.fragment_index == 0 and fragment.is_last)
        if buffered:
            starts = fragment.fragment_index == 0
            if starts and self.pending >= self.max_blobs:
                raise m.BlobError(
                    ErrorCode.RATE_LIMITED,
                    f"this client reassembles at most {self.max_blobs} blobs at once",
                )
            if self.buffered + len(fragment.payload) > self.max_bytes:
                self._senders.pop(sender, None)  # its blobs cannot finish now
                raise m.BlobError(
                    ErrorCode.RATE_LIMITED,
                    f"this client buffers at most {self.max_bytes} bytes of blobs",
                )
        if assembler is None:
            assembler = m.BlobAssembler(
                self.max_blob_size, max_concurrent=self.max_per_sender, idle_timeout=self.idle_timeout
            )
            self._senders[sender] = assembler
        try:
            return assembler.add(fragment, now, key=key)
        finally:
            if not assembler.pending:
                del self._senders[sender]

    def expire(self, now: float) -> None:
        """
        Drop the blobs idle for longer than the idle timeout.
        """
        for sender, assembler in list(self._senders.items()):
            assembler.expire(now)
            if not assembler.pending:
                del self._senders[sender]

    def clear(self) -> None:
        self._senders.clear()


#: A DisconnectNotice that ends the session for good, by its reason.
_FINAL_NOTICES = {
    DisconnectedType.BEING_PUSHED_OUT: EndingKind.PUSHED_OUT,
    DisconnectedType.BEING_KICKED_OUT: EndingKind.KICKED,
    DisconnectedType.NEW_CONNECTION_IGNORED: EndingKind.REFUSED,
    DisconnectedType.LOGON_FAILED: EndingKind.REFUSED,
}


class Inbox:
    """
    Dispatches the frames a client receives: answers to the calls, every
    other message type to one handler each.
    """

    def __init__(self, engine: ClientEngine, blobs: ClientBlobs):
        self.engine = engine
        self.blobs = blobs
        #: Blobs from the offline store, reassembled per connection.
        self.stored_blobs = self._stored_assembler()
        #: The highest stored message to acknowledge, and its information
        #: type (acknowledgements are cumulative and sent once per turn).
        self._ack_id = 0
        self._ack_type = 0
        self._ack_call: Any = None

    def _stored_assembler(self) -> m.BlobAssembler:
        return m.BlobAssembler(
            self.blobs.max_blob_size, max_concurrent=1, idle_timeout=self.blobs.idle_timeout
        )

    def logged_on(self) -> None:
        """
        A new connection logged on: stored messages come again from the
        first one not acknowledged.
        """
        self.stored_blobs = self._stored_assembler()
        self._ack_id = 0

    def frame_received(self, protocol: ClientProtocol, frame: Frame) -> None:
        message_type = frame.message_type
        if frame.message_id and message_type in ANSWER_TYPES:
            self.engine._take_answer(frame)
            return
        if (
            frame.dest_user_id == SERVER_ID
            and message_type in _STORED_TYPES
            and frame.message_id > 0
        ):
            # Only a delivery from the offline store is addressed to _0.
            self._on_stored(protocol, frame)
            return
        handler = self._handlers.get(message_type)
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
                error=str(e),
            )
            self._answer_error(protocol, frame, ErrorCode.BAD_REQUEST, str(e))

    # -- the server's notices ----------------------------------------------------

    def _on_heartbeat(self, protocol: ClientProtocol, frame: Frame) -> None:
        pass  # the echo's arrival already counted as activity

    def _on_pushed_out(self, protocol: ClientProtocol, frame: Frame) -> None:
        cause = m.BeingPushedOutNotify.decode(frame.body).cause
        ending = Ending(EndingKind.PUSHED_OUT, DisconnectedType.BEING_PUSHED_OUT, cause)
        self.engine._end_for_good(protocol, ending)
        self.engine.being_pushed_out.fire(cause)

    def _on_kicked(self, protocol: ClientProtocol, frame: Frame) -> None:
        notice = m.BeingKickedOutNotify.decode(frame.body)
        ending = Ending(
            EndingKind.KICKED, DisconnectedType.BEING_KICKED_OUT, notice.reason, notice.operator
        )
        self.engine._end_for_good(protocol, ending)
        self.engine.being_kicked_out.fire(notice.operator, notice.reason)

    def _on_disconnect_notice(self, protocol: ClientProtocol, frame: Frame) -> None:
        notice = m.DisconnectNotice.decode(frame.body)
        if protocol.ending is not None:
            return  # the pushed-out / kicked notice or the logon reply came first
        kind = _FINAL_NOTICES.get(notice.reason)
        if kind is not None:
            self.engine._end_for_good(protocol, Ending(kind, notice.reason, notice.text))
        else:
            protocol.ending = Ending(EndingKind.DISCONNECTED, notice.reason, notice.text)

    def _on_device_online(self, protocol: ClientProtocol, frame: Frame) -> None:
        self.engine.my_device_online.fire(as_client_type(frame.client_type))

    def _on_device_offline(self, protocol: ClientProtocol, frame: Frame) -> None:
        self.engine.my_device_offline.fire(as_client_type(frame.client_type))

    # -- messages from other users and the server --------------------------------------

    def _on_ping(self, protocol: ClientProtocol, frame: Frame) -> None:
        # Another user pings us through the server: answer it.
        self._answer(frame, MessageType.PING_ACK, b"")

    def _on_information(self, protocol: ClientProtocol, frame: Frame) -> None:
        info = m.Information.decode(frame.body)
        self._deliver(
            frame,
            info.information_type,
            info.payload,
            ack=frame.message_type == MessageType.SEND_CERTAINLY and frame.message_id != 0,
        )

    def _on_blob(self, protocol: ClientProtocol, frame: Frame) -> None:
        fragment = m.BlobFragment.decode(frame.body)
        try:
            payload = self.blobs.add(
                frame.user_id,
                fragment,
                self.engine.clock.seconds(),
                key=(frame.client_type, fragment.blob_id),
            )
        except m.BlobError as e:
            self.engine.counters[ClientCount.BLOB_ERRORS] += 1
            # The error's text, not the error: its traceback holds this
            # frame and the dropped blob, and a log event may be kept.
            log.debug(
                "refused a blob fragment from {sender}: {error}",
                sender=frame.user_id,
                error=str(e),
            )
            self._answer_error(protocol, frame, e.code, e.text)
            return
        if payload is not None:
            self._deliver(frame, fragment.information_type, payload, ack=frame.message_id != 0)

    def _handle_information(
        self, frame: Frame, information_type: int, payload: bytes
    ) -> Deferred[Any]:
        """
        Tell the subscribers and the handler of a one-way message; the
        Deferred fires once the handler has run.
        """
        engine = self.engine
        sender, kind = frame.user_id, as_client_type(frame.client_type)
        engine.information_received.fire(sender, kind, information_type, payload)
        if engine.handler is None:
            return succeed(None)
        return call(engine.handler.handle_information, sender, kind, information_type, payload)

    def _deliver(self, frame: Frame, information_type: int, payload: bytes, ack: bool) -> None:
        d = self._handle_information(frame, information_type, payload)
        if ack:
            body = m.Ack(information_type).encode()
            d.addCallback(lambda _: self._answer(frame, MessageType.ACK, body))
        d.addErrback(self._handler_failed, frame)

    def _on_request(self, protocol: ClientProtocol, frame: Frame) -> None:
        info = m.Information.decode(frame.body)
        handler = self.engine.handler
        if handler is None:
            self._answer_error(
                protocol, frame, ErrorCode.HANDLER_ERROR, "this client answers no queries"
            )
            return
        d = call(
            handler.handle_query,
            frame.user_id,
            as_client_type(frame.client_type),
            info.information_type,
            info.payload,
        )

        def answer(result: Any) -> None:
            body = m.Information(info.information_type, b"" if result is None else bytes(result))
            self._answer(frame, MessageType.RESPONSE, body.encode())

        d.addCallback(answer).addErrback(self._handler_failed, frame)

    def _on_broadcast(self, protocol: ClientProtocol, frame: Frame) -> None:
        info = m.Information.decode(frame.body)
        self.engine.broadcast_received.fire(
            frame.user_id, frame.dest_user_id, info.information_type, info.payload
        )

    # -- from the offline store ------------------------------------------------------------

    def _on_stored(self, protocol: ClientProtocol, frame: Frame) -> None:
        """
        A message kept for this user while it was offline: handled once
        (its ID is above every one handled before), acknowledged to the
        server once handled (cumulatively: an Ack of ID n covers every
        stored message up to n).
        """
        engine = self.engine
        message_id = frame.message_id
        if message_id <= engine.offline_mark:
            engine.counters[ClientCount.OFFLINE_DUPLICATES] += 1
            self._ack_stored(message_id, 0)
            return
        try:
            if frame.message_type == MessageType.BLOB:
                fragment = m.BlobFragment.decode(frame.body)
                key = (frame.user_id, frame.client_type, fragment.blob_id)
                payload = self.stored_blobs.add(fragment, engine.clock.seconds(), key=key)
                if payload is None:
                    return  # the rest of the blob follows
                information_type = fragment.information_type
            else:
                info = m.Information.decode(frame.body)
                information_type, payload = info.information_type, info.payload
        except (m.BadRequest, m.BlobError) as e:
            engine.counters[ClientCount.OFFLINE_DROPPED] += 1
            log.warn(
                "dropped stored message {message_id} from {sender}: {error}",
                message_id=message_id,
                sender=frame.user_id,
                error=str(e),
            )
            self.stored_blobs = self._stored_assembler()
            engine.offline_mark = message_id
            self._ack_stored(message_id, 0)
            return
        engine.offline_mark = message_id
        d = self._handle_information(frame, information_type, payload)

        def failed(failure: Failure) -> None:
            _log_failure(
                "the client handler raised for stored message {message_id} from {sender}",
                failure,
                message_id=message_id,
                sender=frame.user_id,
            )

        d.addErrback(failed)
        d.addCallback(lambda _: self._ack_stored(message_id, information_type))

    def _ack_stored(self, message_id: int, information_type: int) -> None:
        if message_id > self._ack_id:
            self._ack_id, self._ack_type = message_id, information_type
        if self._ack_call is None:
            self._ack_call = self.engine.clock.callLater(0, self._send_ack)

    def _send_ack(self) -> None:
        self._ack_call = None
        if not self._ack_id:
            return
        try:
            self.engine._write(
                MessageType.ACK,
                m.Ack(self._ack_type).encode(),
                message_id=self._ack_id,
                dest=SERVER_ID,
            )
        except NotConnected:
            pass  # delivered again after the next logon, and then dropped

    # -- answers ------------------------------------------------------------------------

    def _answer(self, frame: Frame, message_type: int, body: bytes) -> None:
        """
        Answer C{frame} to the device that sent it (not to every device of
        its user: another of them may wait on the same MessageID).
        """
        self.engine._write(
            message_type, body, message_id=frame.message_id, dest=_asker(frame)
        )

    def _handler_failed(self, failure: Failure, frame: Frame) -> None:
        if failure.check(NotConnected):
            return
        error = failure.value
        if isinstance(error, m.RequestError):
            # The handler's chosen answer, as on the server: no error logged.
            self._answer_error(self.engine._protocol, frame, error.code, error.text[:200])
            return
        _log_failure(
            "the client handler raised for message type {message_type} from {sender}",
            failure,
            message_type=frame.message_type,
            sender=frame.user_id,
        )
        self._answer_error(
            self.engine._protocol,
            frame,
            ErrorCode.HANDLER_ERROR,
            f"{type(error).__name__}: {error}"[:200],
        )

    def _answer_error(
        self, protocol: ClientProtocol | None, frame: Frame, code: ErrorCode, text: str
    ) -> None:
        if frame.message_id and protocol is not None and protocol is self.engine._protocol:
            body = m.Error(frame.message_type, code, text).encode()
            self._answer(frame, MessageType.ERROR, body)

    _handlers: ClassVar[dict[int, Callable[[Inbox, ClientProtocol, Frame], None]]] = {
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


def _log_failure(format: str, failure: Failure, **fields: Any) -> None:
    """
    Log a handler's failure with its stack as names and line numbers only:
    the live traceback holds the handler's frames, and so the payload it
    was given (up to a whole blob), for as long as the event is kept.
    """
    # What Failure.cleanFailure does, written out: pytest-twisted turns
    # that method off (to keep tracebacks for its own reports).
    failure.frames  # noqa: B018  (computed from the traceback, then kept)
    failure.tb = None
    if failure.value is not None:
        failure.value.__traceback__ = None
    log.failure(format, failure, **fields)


def _asker(frame: Frame) -> str:
    """
    The address of the device that sent C{frame}: the server is C{"_0"},
    a user's client C{"user#kind"}.
    """
    if frame.user_id == SERVER_ID:
        return SERVER_ID
    return device_address(frame.user_id, frame.client_type)

