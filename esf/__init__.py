"""
esf: long-lived, authenticated binary TCP sessions on Twisted.

The wire codec lives in L{esf.wire}; the server engine, its interfaces and
the client are exported from here.
"""

from ._wire import (
    ClientType,
    DisconnectedType,
    ErrorCode,
    LogonResult,
    MessageType,
)

__all__ = [
    "ClientType",
    "DisconnectedType",
    "ErrorCode",
    "LogonResult",
    "MessageType",
]
