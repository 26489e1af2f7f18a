"""
The names of the server's counters, in one place.

C{engine.counters} is a L{collections.Counter} keyed by these names (each
is a L{str}, so C{engine.counters["transmit_failed"]} reads the same
count).  They count what did not go as asked; metrics read them.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Count"]


class Count(StrEnum):
    #: A one-way message (MessageID 0) the server could not act on.
    DROPPED = "dropped"
    #: A logon answered Busy by the per-host logon rate limit.
    LOGONS_RATE_LIMITED = "logons_rate_limited"
    #: A takeover refused by the flapping guard.
    TAKEOVERS_REFUSED = "takeovers_refused"
    #: A message to a user with no online device.
    TRANSMIT_FAILED = "transmit_failed"
    #: An application message to a server with no customize handler.
    UNHANDLED = "unhandled"
    #: An application handler that raised something else than RequestError.
    HANDLER_ERRORS = "handler_errors"
    #: A Blob fragment refused (too big, too many at once, out of order).
    BLOB_ERRORS = "blob_errors"
    #: An answer (Response, Error) addressed to the server that nobody waits for.
    UNEXPECTED_ANSWERS = "unexpected_answers"
