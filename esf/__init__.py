"""
esf: long-lived, authenticated binary sessions on Twisted, over TCP and WebSocket.

The server engine, its settings and values are exported from here; the
interfaces applications implement or subscribe to are in L{esf.interfaces};
the wire format is in L{esf.wire}; helpers for testing applications are in
L{esf.testing}.
"""

__version__ = "0.1.0"

from esf.client._calls import STORED
from esf.client._engine import (
    ClientEngine,
    Ending,
    EndingKind,
    LogonFailed,
    LogonResponse,
    NotConnected,
)
from esf.server._application import engine_for
from esf.server._engine import (
    AcceptAll,
    LogonRefused,
    RelogonMode,
    ServerConfig,
    ServerEngine,
    UserData,
)
from esf.server._protocol import ServerFactory, ServerProtocol, ServerService
from esf.server._relay_policy import RelayRefused
from esf.server._websocket import WebSocketFactory, WebSocketProtocol
from esf.wire._frames import (
    ClientType,
    DisconnectedType,
    ErrorCode,
    LogonResult,
    MessageType,
    WireConfig,
)
from esf.wire._messages import RequestError

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
    "RelayRefused",
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
