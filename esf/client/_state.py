"""
The client session's vocabulary: its states, how a connection or the whole
session ended, and the values and errors its calls report.
"""

from __future__ import annotations

from enum import Enum

import attrs

from esf.wire._compat import StrEnum
from esf.wire._frames import DisconnectedType, LogonResult

__all__ = [
    "Ending",
    "EndingKind",
    "LogonFailed",
    "LogonResponse",
    "NotConnected",
    "SessionState",
]


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
        super().__init__(
            f"{getattr(response.result, 'name', response.result)}: {response.failure_cause}"
        )
        self.response = response
        self.result = response.result
        self.cause = response.failure_cause


class NotConnected(Exception):
    """
    The call needs a logged-on session and there is none, or the
    connection dropped while the call waited for its answer.
    """


class SessionState(Enum):
    """
    Where a client's session is in its life.
    """

    #: C{logon()} has not been called.
    IDLE = "idle"
    #: The first connection is being made.
    CONNECTING = "connecting"
    #: Connected; the Logon is on its way or its answer awaited.
    LOGGING_ON = "logging_on"
    LOGGED_ON = "logged_on"
    #: The connection was lost; the next attempt is awaited or under way.
    RECONNECTING = "reconnecting"
    #: Over for good (C{client.ending} says why when a session had begun).
    ENDED = "ended"


class EndingKind(StrEnum):
    """
    How a connection ended.  The first five end the session for good; the
    client reconnects after the last two.
    """

    #: The same user logged on with the same device kind elsewhere.
    PUSHED_OUT = "pushed_out"
    #: Kicked out by the server or an authorised user (C{operator}).
    KICKED = "kicked"
    #: The server refused the logon or re-logon (C{response} says how).
    REFUSED = "refused"
    #: This client logged off.
    LOGGED_OFF = "logged_off"
    #: This client's application closed it.
    CLOSED = "closed"
    #: A re-logon was answered Busy ("try later").
    BUSY = "busy"
    #: The server closed the connection with a reason (C{reason}), or it
    #: was lost without one (C{reason} is C{None}).
    DISCONNECTED = "disconnected"


_FINAL = frozenset(
    {
        EndingKind.PUSHED_OUT,
        EndingKind.KICKED,
        EndingKind.REFUSED,
        EndingKind.LOGGED_OFF,
        EndingKind.CLOSED,
    }
)


@attrs.frozen
class Ending:
    """
    How a connection, or the whole session, ended.

    @ivar kind: an L{EndingKind}.
    @ivar reason: the server's L{DisconnectedType} when it gave one.
    @ivar text: the reason in words (the push-out cause, the kick reason,
        the refusal's cause, the server's notice).
    @ivar operator: who kicked (C{"_0"}: the server), for C{KICKED}.
    @ivar response: the refused L{LogonResponse}, for C{REFUSED} and
        C{BUSY} when the server answered the logon.
    """

    kind: EndingKind
    reason: DisconnectedType | int | None = None
    text: str = ""
    operator: str | None = None
    response: LogonResponse | None = None

    @property
    def final(self) -> bool:
        """
        Whether this ends the session for good (no reconnect follows).
        """
        return self.kind in _FINAL

    @classmethod
    def refusal(cls, response: LogonResponse, relogon: bool) -> Ending:
        """
        How a logon the server refused ends its connection: a re-logon
        answered Busy ("try later") is a failed attempt, after which the
        client tries again; any other refusal ends the session.
        """
        if relogon and response.result == LogonResult.BUSY:
            return cls(EndingKind.BUSY, None, response.failure_cause, response=response)
        return cls(
            EndingKind.REFUSED,
            DisconnectedType.LOGON_FAILED,
            response.failure_cause,
            response=response,
        )


class ClientCount(StrEnum):
    """
    The names of a client's counters (C{client.counters}).
    """

    #: An answer whose MessageID nobody waits for (late, after a timeout).
    UNEXPECTED_ANSWERS = "unexpected_answers"
    #: An answer from someone else than the party asked: dropped.
    FORGED_ANSWERS = "forged_answers"
    #: A Blob fragment refused (too big, too many at once, out of order).
    BLOB_ERRORS = "blob_errors"
    #: A message from the server's offline store delivered again (after a
    #: lost connection) that was already handled: acknowledged, not handled.
    OFFLINE_DUPLICATES = "offline_duplicates"
    #: A message from the offline store that could not be handled (a body
    #: that does not parse, a blob out of bounds): acknowledged and dropped.
    OFFLINE_DROPPED = "offline_dropped"
    #: A ping from another user left unanswered because the channel was
    #: busy (the server was not reading this client's output).
    PINGS_UNANSWERED = "pings_unanswered"
    #: A connection this client closed because the server read nothing
    #: while the client answered it with more than C{max_output_buffer}
    #: bytes.
    OUTPUT_OVERFLOWS = "output_overflows"
