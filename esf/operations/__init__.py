"""
Operating a server: Prometheus metrics, the admin HTTP API and dashboard,
the audit log, giving freed memory back to the system and the GC settings
of a long-running server (what C{twistd esf --metrics}, C{--admin-api},
C{--audit-log}, C{--malloc-trim} and C{--gc-threshold} run), for programs
that build their own service::

    service = ServerService(engine, endpoint)
    MetricsService(engine, serverFromString(reactor, "tcp:9464:interface=127.0.0.1")).setServiceParent(service)
    AdminService(engine, serverFromString(reactor, "tcp:8530:interface=127.0.0.1"), token).setServiceParent(service)
    AuditService(engine, "/var/log/esf/audit.jsonl", retention=Retention(keep_days=365)).setServiceParent(service)
    MemoryTrimmer(reactor).setServiceParent(service)
    GCTuning().setServiceParent(service)

The admin API and the metrics site each hold at most 64 connections and
give a request 10 s for its head and body unless given other
C{limits=HTTPLimits(max_connections, request_timeout)}.

docs/operations.md describes every endpoint, metric and audit record.
"""

from esf.server._http import HTTPLimits

from ._admin import AdminService
from ._audit import AuditLog, AuditService, Retention
from ._memory import GCTuning, MemoryTrimmer
from ._metrics import MetricsService, ServerMetrics

__all__ = [
    "AdminService",
    "AuditLog",
    "AuditService",
    "Retention",
    "GCTuning",
    "HTTPLimits",
    "MemoryTrimmer",
    "MetricsService",
    "ServerMetrics",
]
