"""
A logged-on session as the device presence hands the router
(L{esf.interfaces.IDeviceHandle}): what the server and other users send it,
and how it is told to go (L{Device}, a base of
L{esf.server._session.Session}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from twisted.logger import Logger

from esf.wire import _messages as m
from esf.wire._decoder import FrameDecoder
from esf.wire._frames import (
    _FIXED_HEADER,
    SERVER_ID,
    DisconnectedType,
    ErrorCode,
    Frame,
    MessageType,
    encode_frame,
)

from ._counters import Count
from ._output import DROPPED, PUSH_BACK, REFUSED, Output, OutputOwner
from ._router import ANSWERS

if TYPE_CHECKING:
    from ._config import UserData
    from ._presence import UserManager

__all__ = ["Device", "DeviceOwner"]

log = Logger(namespace="esf.server")


class _Answers(Protocol):
    def accept(self, session: Device, frame: Frame) -> bool: ...

    def forget(self, session: Device, frame: Frame) -> bool: ...


class DeviceOwner(OutputOwner, Protocol):
    """
    What a device needs of the engine beyond what its output needs
    (L{OutputOwner}): the answers it may accept from other nodes and the
    user manager's events.
    """

    @property
    def answers(self) -> _Answers: ...

    @property
    def user_manager(self) -> UserManager: ...


class Device(Output):
    """
    The messages a session's device is sent, besides what is relayed to
    it (L{Output.send}).  The session provides C{owner}, C{user_id},
    C{user_data} and C{end}.
    """

    __slots__ = ()

    owner: DeviceOwner
    user_id: str | None
    user_data: UserData | None

    def send_from_node(self, data: bytes) -> bool:
        """
        Write a frame relayed to this device by another node of a cluster.
        An answer goes through only if this session asked for it
        (L{esf.server._router.AnswerRouter.accept}): the answering node cannot
        know.

        @return: whether the device refused the frame for being backed up
            (counted here, or as dropped past its hard bound; the caller
            tells its sender and its sender's node).  Past half its bound
            the push back's time runs, as for a sender of this node (there
            is none here to hold back), and then the device is stalled:
            what comes for it past its bound is refused.
        """
        if _FIXED_HEADER.unpack_from(data)[2] in ANSWERS:
            (frame,) = FrameDecoder(self.owner.config.wire).feed(data)
            if not self.owner.answers.accept(self, frame):
                self.owner.counters[Count.UNSOLICITED_ANSWERS] += 1
                log.debug(
                    "dropped {message_type} #{message_id} from {user_id} (another node): "
                    "it answers no request of {session!r}",
                    message_type=frame.message_type,
                    message_id=frame.message_id,
                    user_id=frame.user_id,
                    session=self,
                )
                return False
        status = self.send(data)
        if status == PUSH_BACK:
            self.push_back(None)
            return False
        if status == REFUSED:
            self.owner.counters[Count.RECEIVER_BEHIND] += 1
            return True
        return status == DROPPED

    def not_delivered(self, frame: Frame, code: ErrorCode, text: str) -> None:
        """
        C{frame}, which this device relayed to a user on another node, was
        not delivered (that node or Redis says so): no answer can come, so
        its request slot is freed and it is answered C{Error} now (a
        one-way frame is counted, L{error}).  A request that no longer
        waits (answered, told already, or timed out) is not answered again:
        two nodes may each find it failed (the sending node's call to Redis
        timed out, and the receiving node read it too late).
        """
        if (
            frame.message_id
            and frame.message_type != MessageType.SEND
            and not self.owner.answers.forget(self, frame)
        ):
            return
        self.error(frame, code, text)

    def notify(self, message_type: int, body: bytes = b"", client_type: int = 0) -> None:
        """
        Send the peer a server-initiated message (MessageID 0).
        """
        self.queue(
            encode_frame(
                self.owner.config.wire,
                message_type,
                body,
                client_type=client_type,
                user_id=SERVER_ID,
                dest_user_id=self.user_id or "",
            )
        )

    def kick(self, reason: DisconnectedType, text: str) -> None:
        self.end(reason, text)

    def push_out(self, new_address: str, cause: str) -> None:
        """
        The device logged on again from C{new_address}: tell the user
        manager, send C{BeingPushedOutNotify} and end with C{BeingPushedOut}.
        """
        self.owner.user_manager.device_being_pushed_out.fire(self.user_data, new_address)
        self.notify(MessageType.BEING_PUSHED_OUT_NOTIFY, m.BeingPushedOutNotify(cause).encode())
        self.kick(DisconnectedType.BEING_PUSHED_OUT, cause)

    def kick_out(self, operator: str, reason: str, text: str) -> None:
        """
        C{operator} kicks the device: tell the user manager, send
        C{BeingKickedOutNotify} and end with C{BeingKickedOut}.
        """
        self.owner.user_manager.device_kicked_out.fire(self.user_data, operator, reason)
        self.notify(
            MessageType.BEING_KICKED_OUT_NOTIFY,
            m.BeingKickedOutNotify(operator, reason[:1000]).encode(),
        )
        self.kick(DisconnectedType.BEING_KICKED_OUT, text)

    def ask(self, message_id: int, body: bytes, timeout: float) -> None:
        """
        Send the server's query C{message_id} (an Information C{body}) as a
        Request; the answer comes back through the engine's pending table.
        """
        self.send(
            encode_frame(
                self.owner.config.wire,
                MessageType.REQUEST,
                body,
                message_id=message_id,
                user_id=SERVER_ID,
                dest_user_id=self.user_id or "",
            )
        )

    def reply(self, frame: Frame, body: bytes, message_type: int | None = None) -> None:
        """
        Answer C{frame}: same MessageType (unless given) and MessageID, from
        the server to this session's user.
        """
        self.queue(
            encode_frame(
                self.owner.config.wire,
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
        counted and logged at debug level instead, since nothing waits for
        an answer (and a peer must not be able to fill the log).
        """
        if frame.message_id:
            body = m.Error(frame.message_type, code, text[:1000]).encode()
            self.reply(frame, body, MessageType.ERROR)
            return
        self.owner.counters[Count.DROPPED] += 1
        log.debug(
            "dropped {message_type} from {session!r}: {code.name}: {text}",
            message_type=frame.message_type,
            session=self,
            code=code,
            text=text,
        )
