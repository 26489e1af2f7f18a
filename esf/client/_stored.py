"""
Messages the server's offline store kept for this user while it was
offline: each handled once, and acknowledged to the server once handled.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from esf.wire import _messages as m
from esf.wire._frames import SERVER_ID, Frame, MessageType

from ._state import ClientCount, NotConnected

__all__ = ["STORED_TYPES", "StoredDelivery", "StoredHost", "log_failure"]

log = Logger(namespace="esf.client")

#: Message types the server's offline store delivers.
STORED_TYPES = frozenset({MessageType.SEND, MessageType.SEND_CERTAINLY, MessageType.BLOB})


class StoredHost(Protocol):
    """
    What L{StoredDelivery} needs of its engine (L{esf.ClientEngine} is
    one).
    """

    #: The highest ID of a stored message handled (see the engine's).
    offline_mark: int

    @property
    def clock(self) -> IReactorTime: ...

    @property
    def counters(self) -> collections.Counter[str]: ...

    def write_message(
        self,
        message_type: int,
        body: bytes = b"",
        *,
        message_id: int = 0,
        dest: str = SERVER_ID,
        answer: bool = False,
    ) -> None: ...


class StoredDelivery:
    """
    The messages from the offline store, reassembled (blobs) per
    connection, handed to C{handle} once each (their IDs rise; one at or
    below C{host.offline_mark} was handled before) and acknowledged
    cumulatively (an Ack of ID n covers every stored message up to n).

    @param handle: called with the frame, the information type and the
        payload; returns a Deferred that fires once the handler has run.
    """

    def __init__(
        self,
        host: StoredHost,
        handle: Callable[[Frame, int, bytes], Deferred[Any]],
        max_blob_size: int,
        idle_timeout: float,
    ):
        self.host = host
        self.handle = handle
        self.max_blob_size = max_blob_size
        self.idle_timeout = idle_timeout
        self.blobs = self._assembler()
        #: The highest stored message to acknowledge, and its information
        #: type (acknowledgements are cumulative and sent once per turn).
        self._ack_id = 0
        self._ack_type = 0
        self._ack_call: IDelayedCall | None = None

    def _assembler(self) -> m.BlobAssembler:
        return m.BlobAssembler(
            self.max_blob_size, max_concurrent=1, idle_timeout=self.idle_timeout
        )

    def logged_on(self) -> None:
        """
        A new connection logged on: stored messages come again from the
        first one not acknowledged.
        """
        self.blobs = self._assembler()
        self._ack_id = 0

    def received(self, frame: Frame) -> None:
        """
        A message from the store arrived: handle it unless it was handled
        before, then acknowledge it.
        """
        host = self.host
        message_id = frame.message_id
        if message_id <= host.offline_mark:
            host.counters[ClientCount.OFFLINE_DUPLICATES] += 1
            self.acknowledge(message_id, 0)
            return
        try:
            if frame.message_type == MessageType.BLOB:
                fragment = m.BlobFragment.decode(frame.body)
                key = (frame.user_id, frame.client_type, fragment.blob_id)
                payload = self.blobs.add(fragment, host.clock.seconds(), key=key)
                if payload is None:
                    return  # the rest of the blob follows
                information_type = fragment.information_type
            else:
                info = m.Information.decode(frame.body)
                information_type, payload = info.information_type, info.payload
        except (m.BadRequest, m.BlobError) as e:
            host.counters[ClientCount.OFFLINE_DROPPED] += 1
            log.warn(
                "dropped stored message {message_id} from {sender}: {error}",
                message_id=message_id,
                sender=frame.user_id,
                error=str(e),
            )
            self.blobs = self._assembler()
            host.offline_mark = message_id
            self.acknowledge(message_id, 0)
            return
        host.offline_mark = message_id
        d = self.handle(frame, information_type, payload)

        def failed(failure: Failure) -> None:
            log_failure(
                "the client handler raised for stored message {message_id} from {sender}",
                failure,
                message_id=message_id,
                sender=frame.user_id,
            )

        d.addErrback(failed)
        d.addCallback(lambda _: self.acknowledge(message_id, information_type))

    def acknowledge(self, message_id: int, information_type: int) -> None:
        """
        Acknowledge the stored messages up to C{message_id}, at the end of
        this turn (with those that follow in it).
        """
        if message_id > self._ack_id:
            self._ack_id, self._ack_type = message_id, information_type
        if self._ack_call is None:
            self._ack_call = self.host.clock.callLater(0, self._send_ack)

    def _send_ack(self) -> None:
        self._ack_call = None
        if not self._ack_id:
            return
        try:
            self.host.write_message(
                MessageType.ACK,
                m.Ack(self._ack_type).encode(),
                message_id=self._ack_id,
                dest=SERVER_ID,
            )
        except NotConnected:
            pass  # delivered again after the next logon, and then dropped


def log_failure(format: str, failure: Failure, **fields: Any) -> None:
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
