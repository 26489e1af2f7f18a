"""
What reaches a client unasked: the server's notices (pushed out, kicked,
disconnected, my other devices), other users' and the server's messages,
queries and blobs, handed to the application's handler and events.

Answers to the client's own requests go to the engine's request table
(L{esf.client._requests}); a notice that ends the session goes to the
engine, which owns the session's life; messages from the offline store go
to L{esf.client._stored}.  The inbox knows the engine only as an
L{InboxHost}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from esf.interfaces import ICustomizeHandler
from esf.wire import _messages as m
from esf.wire._events import Event, call
from esf.wire._frames import (
    SERVER_ID,
    DisconnectedType,
    ErrorCode,
    Frame,
    MessageType,
    WireConfig,
    as_client_type,
    device_address,
)

from ._requests import ANSWER_TYPES
from ._state import ClientCount, Ending, EndingKind, NotConnected
from ._stored import STORED_TYPES, StoredDelivery, StoredHost, log_failure

__all__ = ["ClientBlobs", "Connection", "Inbox", "InboxHost"]

log = Logger(namespace="esf.client")

MiB = 1024 * 1024


class Connection(Protocol):
    """
    What the inbox needs of the connection a frame came on: how it is
    ending, once known.
    """

    ending: Ending | None


class InboxHost(StoredHost, Protocol):
    """
    What the L{Inbox} needs of its engine (L{esf.ClientEngine} is one):
    exactly what it reads, fires and calls.
    """

    @property
    def wire(self) -> WireConfig: ...

    @property
    def handler(self) -> ICustomizeHandler | None: ...

    @property
    def connection(self) -> Connection | None:
        """
        The current connection, or C{None}.
        """

    @property
    def channel_is_busy(self) -> bool:
        """
        Whether the server is not reading this client's output now.
        """

    @property
    def being_pushed_out(self) -> Event: ...

    @property
    def being_kicked_out(self) -> Event: ...

    @property
    def my_device_online(self) -> Event: ...

    @property
    def my_device_offline(self) -> Event: ...

    @property
    def information_received(self) -> Event: ...

    @property
    def broadcast_received(self) -> Event: ...

    def take_answer(self, frame: Frame) -> None:
        """
        An answer to one of the client's own requests.
        """

    def end_for_good(self, connection: Connection, ending: Ending) -> None:
        """
        The server ended the session: no reconnect follows.
        """


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
                self.max_blob_size,
                max_concurrent=self.max_per_sender,
                idle_timeout=self.idle_timeout,
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

    def __init__(self, host: InboxHost, blobs: ClientBlobs):
        self.host = host
        self.blobs = blobs
        #: The messages from the offline store.
        self.stored = StoredDelivery(
            host, self._handle_information, blobs.max_blob_size, blobs.idle_timeout
        )

    def logged_on(self) -> None:
        """
        A new connection logged on.
        """
        self.stored.logged_on()

    def frame_received(self, connection: Connection, frame: Frame) -> None:
        message_type = frame.message_type
        if frame.message_id and message_type in ANSWER_TYPES:
            self.host.take_answer(frame)
            return
        if (
            frame.dest_user_id == SERVER_ID
            and message_type in STORED_TYPES
            and frame.message_id > 0
        ):
            # Only a delivery from the offline store is addressed to _0.
            self.stored.received(frame)
            return
        handler = self._handlers.get(message_type)
        if handler is None:
            log.info("ignored message type {message_type}", message_type=message_type)
            return
        try:
            handler(self, connection, frame)
        except m.BadRequest as e:
            log.warn(
                "malformed {message_type} from {sender}: {error}",
                message_type=message_type,
                sender=frame.user_id,
                error=str(e),
            )
            self._answer_error(connection, frame, ErrorCode.BAD_REQUEST, str(e))

    # -- the server's notices ----------------------------------------------------

    def _on_heartbeat(self, connection: Connection, frame: Frame) -> None:
        pass  # the echo's arrival already counted as activity

    def _on_pushed_out(self, connection: Connection, frame: Frame) -> None:
        cause = m.BeingPushedOutNotify.decode(frame.body).cause
        ending = Ending(EndingKind.PUSHED_OUT, DisconnectedType.BEING_PUSHED_OUT, cause)
        self.host.end_for_good(connection, ending)
        self.host.being_pushed_out.fire(cause)

    def _on_kicked(self, connection: Connection, frame: Frame) -> None:
        notice = m.BeingKickedOutNotify.decode(frame.body)
        ending = Ending(
            EndingKind.KICKED, DisconnectedType.BEING_KICKED_OUT, notice.reason, notice.operator
        )
        self.host.end_for_good(connection, ending)
        self.host.being_kicked_out.fire(notice.operator, notice.reason)

    def _on_disconnect_notice(self, connection: Connection, frame: Frame) -> None:
        notice = m.DisconnectNotice.decode(frame.body)
        if connection.ending is not None:
            return  # the pushed-out / kicked notice or the logon reply came first
        kind = _FINAL_NOTICES.get(notice.reason)
        if kind is not None:
            self.host.end_for_good(connection, Ending(kind, notice.reason, notice.text))
        else:
            connection.ending = Ending(EndingKind.DISCONNECTED, notice.reason, notice.text)

    def _on_device_online(self, connection: Connection, frame: Frame) -> None:
        self.host.my_device_online.fire(as_client_type(frame.client_type))

    def _on_device_offline(self, connection: Connection, frame: Frame) -> None:
        self.host.my_device_offline.fire(as_client_type(frame.client_type))

    # -- messages from other users and the server --------------------------------------

    def _on_ping(self, connection: Connection, frame: Frame) -> None:
        # Another user pings us through the server: answer it, unless the
        # server is not reading (as the server sends no pong to a peer that
        # does not read): a PingAck then would only pile up unsent, and a
        # ping is for measuring, which an unanswered one does as well.
        if self.host.channel_is_busy:
            self.host.counters[ClientCount.PINGS_UNANSWERED] += 1
            return
        self._answer(frame, MessageType.PING_ACK, b"")

    def _on_information(self, connection: Connection, frame: Frame) -> None:
        info = m.Information.decode(frame.body)
        self._deliver(
            frame,
            info.information_type,
            info.payload,
            ack=frame.message_type == MessageType.SEND_CERTAINLY and frame.message_id != 0,
        )

    def _on_blob(self, connection: Connection, frame: Frame) -> None:
        fragment = m.BlobFragment.decode(frame.body)
        try:
            payload = self.blobs.add(
                frame.user_id,
                fragment,
                self.host.clock.seconds(),
                key=(frame.client_type, fragment.blob_id),
            )
        except m.BlobError as e:
            self.host.counters[ClientCount.BLOB_ERRORS] += 1
            # The error's text, not the error: its traceback holds this
            # frame and the dropped blob, and a log event may be kept.
            log.debug(
                "refused a blob fragment from {sender}: {error}",
                sender=frame.user_id,
                error=str(e),
            )
            self._answer_error(connection, frame, e.code, e.text)
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
        host = self.host
        sender, kind = frame.user_id, as_client_type(frame.client_type)
        host.information_received.fire(sender, kind, information_type, payload)
        if host.handler is None:
            return succeed(None)
        return call(host.handler.handle_information, sender, kind, information_type, payload)

    def _deliver(self, frame: Frame, information_type: int, payload: bytes, ack: bool) -> None:
        d = self._handle_information(frame, information_type, payload)
        if ack:
            body = m.Ack(information_type).encode()
            d.addCallback(lambda _: self._answer(frame, MessageType.ACK, body))
        d.addErrback(self._handler_failed, frame)

    def _on_request(self, connection: Connection, frame: Frame) -> None:
        info = m.Information.decode(frame.body)
        handler = self.host.handler
        if handler is None:
            self._answer_error(
                connection, frame, ErrorCode.HANDLER_ERROR, "this client answers no queries"
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

    def _on_broadcast(self, connection: Connection, frame: Frame) -> None:
        info = m.Information.decode(frame.body)
        self.host.broadcast_received.fire(
            frame.user_id, frame.dest_user_id, info.information_type, info.payload
        )

    # -- answers ------------------------------------------------------------------------

    def _answer(self, frame: Frame, message_type: int, body: bytes) -> None:
        """
        Answer C{frame} to the device that sent it (not to every device of
        its user: another of them may wait on the same MessageID).  A
        client no longer logged on (logged off, pushed out, not yet logged
        on) answers nothing: the asker's call fails or times out there.
        """
        try:
            self.host.write_message(
                message_type,
                body,
                message_id=frame.message_id,
                dest=_asker(frame, self.host.wire),
                answer=True,
            )
        except NotConnected:
            pass

    def _handler_failed(self, failure: Failure, frame: Frame) -> None:
        if failure.check(NotConnected):
            return
        error = failure.value
        if isinstance(error, m.RequestError):
            # The handler's chosen answer, as on the server: no error logged.
            self._answer_error(self.host.connection, frame, error.code, error.text[:200])
            return
        log_failure(
            "the client handler raised for message type {message_type} from {sender}",
            failure,
            message_type=frame.message_type,
            sender=frame.user_id,
        )
        self._answer_error(
            self.host.connection,
            frame,
            ErrorCode.HANDLER_ERROR,
            f"{type(error).__name__}: {error}"[:200],
        )

    def _answer_error(
        self, connection: Connection | None, frame: Frame, code: ErrorCode, text: str
    ) -> None:
        if frame.message_id and connection is not None and connection is self.host.connection:
            body = m.Error(frame.message_type, code, text).encode()
            self._answer(frame, MessageType.ERROR, body)

    _handlers: ClassVar[dict[int, Callable[[Inbox, Connection, Frame], None]]] = {
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


def _asker(frame: Frame, wire: WireConfig) -> str:
    """
    The address of the device that sent C{frame}: the server is C{"_0"},
    a user's client C{"user#kind"}, or C{"user"} when the device mark does
    not fit the DestUserID slot (a user ID of 10 or 11 bytes in the
    default 11-byte slot): the server then hands the answer to that
    user's device that waits for it.
    """
    if frame.user_id == SERVER_ID:
        return SERVER_ID
    device = device_address(frame.user_id, frame.client_type)
    if len(device.encode("utf-8")) > wire.id_slot:
        return frame.user_id
    return device
