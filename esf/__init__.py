"""
esf: long-lived, authenticated binary sessions on Twisted, over TCP and WebSocket.

The server engine, its settings and values are exported from here; the
interfaces applications implement or subscribe to are in L{esf.interfaces};
the wire format is in L{esf.wire}; helpers for testing applications are in
L{esf.testing}.
"""

__version__ = "0.1.0"

from ._application import engine_for
from ._client_calls import STORED
from ._client import ClientEngine, Ending, EndingKind, LogonFailed, LogonResponse, NotConnected
from ._engine import (
    AcceptAll,
    LogonRefused,
    RelogonMode,
    ServerConfig,
    ServerEngine,
    UserData,
)
from ._messages import RequestError
from ._protocol import ServerFactory, ServerProtocol, ServerService
from ._websocket import WebSocketFactory, WebSocketProtocol
from ._wire import (
    ClientType,
    DisconnectedType,
    ErrorCode,
    LogonResult,
    MessageType,
    WireConfig,
)

__all__ = [
    "AcceptAll",
    "ClientEngine",
    "ClientType",
    "DisconnectedType",
    "Ending",
    "EndingKind",
    "ErrorCode",
    "LogonFailed",
    "LogonRefused",
    "LogonResponse",
    "LogonResult",
    "MessageType",
    "NotConnected",
    "RelogonMode",
    "RequestError",
    "STORED",
    "ServerConfig",
    "ServerEngine",
    "ServerFactory",
    "ServerProtocol",
    "ServerService",
    "UserData",
    "WebSocketFactory",
    "WebSocketProtocol",
    "WireConfig",
    "engine_for",
]
