"""
What peers may make the server hold and do.

L{MemoryBudget} is the server-wide memory budget: every byte the server
holds for a peer and has not yet handed on (output waiting for a peer that
does not read, frames half received, blobs being reassembled) counts
against one bound, so that new work is refused before the bound is passed,
whatever mix of peers asks for it.

L{FrameMeter} charges a WebSocket peer for the frames of its own that carry
no whole ESF frame (pings, pongs, fragments), which would otherwise cost the
server work that no budget sees.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

from ._config import SessionPhase

if TYPE_CHECKING:
    from ._session import Session

__all__ = ["MemoryBudget", "FrameMeter", "FrameCost", "PRE_LOGON_FRAMES", "CLOSING_FRAMES"]

#: WebSocket frames other than whole one-frame messages (pings, pongs,
#: fragments) a peer may send before it has logged on.  A logon needs one
#: message; this leaves room for one sent in a few fragments, and a ping.
PRE_LOGON_FRAMES = 16

#: Frames a peer may still send once the server has begun to close its
#: connection (those already on their way, and its close frame).
CLOSING_FRAMES = 64


class MemoryBudget:
    """
    Bytes in use against C{limit}; blob bytes also by user.

    Counted by whoever holds the bytes, in deltas: a session for its
    output backlog and its partial frame, the application services for
    blobs.  Only the output backlog of a paused peer counts (what a reading
    peer's transport holds is passed on at once).
    """

    __slots__ = ("limit", "used", "blobs_by_user")

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.blobs_by_user: dict[str, int] = {}

    def fits(self, size: int) -> bool:
        """
        Whether C{size} more bytes stay within the budget.
        """
        return self.used + size <= self.limit

    def blob_bytes(self, user_id: str) -> int:
        return self.blobs_by_user.get(user_id, 0)

    def add_blob_bytes(self, user_id: str, delta: int) -> None:
        if not delta:
            return
        self.used += delta
        left = self.blobs_by_user.get(user_id, 0) + delta
        if left > 0:
            self.blobs_by_user[user_id] = left
        else:
            self.blobs_by_user.pop(user_id, None)


class FrameCost(Enum):
    """
    What L{FrameMeter.pay} says of the next frame.
    """

    #: Paid: parse it.
    PAID = "paid"
    #: The session's work budget is spent: read nothing more until it
    #: refills (the rest of the read waits, the transport is paused).
    HELD = "held"
    #: The session's work budget has been spent for too long: the engine
    #: ended it (C{BeingKickedOut}), as it ends a TCP session.
    ENDED = "ended"
    #: More frames before logon than L{PRE_LOGON_FRAMES}: the session is to
    #: end with C{NotLoggedOn}.
    NOT_LOGGED_ON = "not logged on"
    #: More frames after the close began than L{CLOSING_FRAMES}: read no
    #: more and close the connection.
    CLOSED = "closed"


class FrameMeter:
    """
    Charges one WebSocket channel's frames to its session, each before it
    is parsed, as a TCP frame costs its sender.

    A whole message the channel takes itself (one final binary frame of
    less than 64 KiB holding one ESF frame, as browsers send) costs what
    that ESF frame costs over TCP: the engine charges it (a request 1 unit
    of work, a relay nothing but push back).  Every frame autobahn parses
    (a fragment, a ping, a pong, a close, a larger message) costs the
    server that parsing and, for a ping, a pong, though most carry no
    request the engine could charge: this meter charges it, 1 unit of the
    session's work budget (L{Session.charge}), as much as the cheapest
    request.  Before logon, when a TCP peer may send nothing but
    its Logon, a peer may send L{PRE_LOGON_FRAMES} of them; once the close
    has begun, L{CLOSING_FRAMES}.
    """

    __slots__ = ("before_logon", "after_close")

    def __init__(self) -> None:
        #: Frames paid for before logon, and since the close began.
        self.before_logon = 0
        self.after_close = 0

    def pay(self, session: Session, closing: bool) -> FrameCost:
        """
        Pay for one frame of C{session}'s peer; C{closing}: the channel has
        begun to close.
        """
        state = session.state
        if closing or state is SessionPhase.ENDED:
            self.after_close += 1
            return FrameCost.PAID if self.after_close <= CLOSING_FRAMES else FrameCost.CLOSED
        if state is not SessionPhase.LOGGED_ON:
            self.before_logon += 1
            if self.before_logon <= PRE_LOGON_FRAMES:
                return FrameCost.PAID
            return FrameCost.NOT_LOGGED_ON
        if session.charge(1):
            return FrameCost.PAID
        if session.over_budget():
            return FrameCost.ENDED
        return FrameCost.HELD
