"""
The public surface: what applications import.  A name added or removed here
is a change to the API and should be deliberate.
"""

import esf
import esf.interfaces
import esf.wire

PUBLIC = {
    "AcceptAll",
    "ClientEngine",
    "ClientType",
    "DisconnectedType",
    "ErrorCode",
    "LogonFailed",
    "LogonRefused",
    "LogonResponse",
    "LogonResult",
    "MessageType",
    "NotConnected",
    "RelogonMode",
    "RequestError",
    "ServerConfig",
    "ServerEngine",
    "ServerFactory",
    "ServerProtocol",
    "ServerService",
    "UserData",
    "WebSocketFactory",
    "WebSocketProtocol",
    "WireConfig",
}

INTERFACES = {
    "IBasicHandler",
    "IChannel",
    "ICustomizeHandler",
    "IEngineAware",
    "IEvent",
    "IGroupManager",
    "IPresence",
    "IDeviceHandle",
    "IUserManager",
}


def test_esf_exports():
    assert set(esf.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(esf, name).__module__.startswith("esf")


def test_interfaces_exports():
    assert set(esf.interfaces.__all__) == INTERFACES
    for name in INTERFACES:
        assert getattr(esf.interfaces, name).__doc__


def test_wire_exports_resolve():
    """
    Every name esf.wire promises exists, and the codec's essentials are
    among them.
    """
    for name in esf.wire.__all__:
        assert hasattr(esf.wire, name), name
    assert {"FrameDecoder", "encode_frame", "Frame", "FrameError", "BadRequest"} <= set(
        esf.wire.__all__
    )


def test_public_classes_are_documented():
    for name in PUBLIC:
        assert getattr(esf, name).__doc__, name
