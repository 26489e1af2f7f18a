"""
The public surface: what applications import.  A name added or removed here
is a change to the API and should be deliberate.
"""

import esf
import esf.interfaces
import esf.operations
import esf.pytest_plugin
import esf.testing
import esf.wire

PUBLIC = {
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
    "IOfflineStore",
    "IOfflinePolicy",
    "IRelogonPolicy",
    "IRelayPolicy",
}


def test_esf_exports():
    assert set(esf.__all__) == PUBLIC
    for name in PUBLIC - {"STORED"}:
        assert getattr(esf, name).__module__.startswith("esf")
    assert esf.STORED == "stored"


def test_interfaces_exports():
    assert set(esf.interfaces.__all__) == INTERFACES
    for name in INTERFACES:
        assert getattr(esf.interfaces, name).__doc__


OFFLINE = {
    "KEPT_TYPES",
    "KeepAll",
    "MemoryOfflineStore",
    "OfflineBounds",
    "OfflineSenderFull",
    "OfflineServerFull",
    "OfflineStoreError",
    "OfflineStoreFull",
    "RedisOfflineStore",
    "SCHEMA_VERSION",
    "SQLiteOfflineStore",
    "StoredMessage",
    "check_database",
}


def test_offline_exports():
    import esf.offline

    assert set(esf.offline.__all__) == OFFLINE
    for name in OFFLINE - {"KEPT_TYPES", "SCHEMA_VERSION"}:
        assert getattr(esf.offline, name).__doc__, name


OPERATIONS = {
    "AdminService",
    "AuditLog",
    "AuditService",
    "GCTuning",
    "HTTPLimits",
    "MemoryTrimmer",
    "MetricsService",
    "Retention",
    "ServerMetrics",
}


def test_operations_exports():
    assert set(esf.operations.__all__) == OPERATIONS
    for name in OPERATIONS:
        assert getattr(esf.operations, name).__doc__, name


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


TESTING = {
    "MemoryServer",
    "MemoryEndpoint",
    "Connection",
    "MemoryTransport",
    "EventRecorder",
    "record_events",
    "LogCapture",
    "LoggedErrors",
    "TwistdServer",
    "TwistdFailed",
    "doubling_retry_policy",
}


def test_testing_exports():
    assert set(esf.testing.__all__) == TESTING
    for name in TESTING:
        assert getattr(esf.testing, name).__doc__, name


def test_pytest_plugin_fixtures():
    assert set(esf.pytest_plugin.__all__) == {
        "esf_applications",
        "esf_config",
        "esf_offline_store",
        "esf_server",
        "esf_twistd",
        "esf_logs",
        "esf_logged_errors",
    }


def test_version():
    assert isinstance(esf.__version__, str) and esf.__version__.count(".") == 2


CLUSTER = {
    "DEFAULT_LEASE",
    "ClusterPresence",
    "ClusterService",
    "RedisUnavailable",
    "RedisURL",
    "RemoteHandle",
    "default_node_id",
}


def test_cluster_exports():
    import esf.cluster

    assert set(esf.cluster.__all__) == CLUSTER
    for name in CLUSTER - {"DEFAULT_LEASE"}:
        assert getattr(esf.cluster, name).__doc__, name


def test_wire_exports_everything():
    """
    esf.wire lists every public name of the codec and the message bodies
    (it names them one by one, for the API reference).
    """
    from esf.wire import _decoder, _frames, _messages

    modules = (_frames, _decoder, _messages)
    assert sorted(esf.wire.__all__) == sorted(set().union(*(m.__all__ for m in modules)))
