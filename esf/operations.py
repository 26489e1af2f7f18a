"""
Operating a server: Prometheus metrics, the admin HTTP API and dashboard,
the audit log, and giving freed memory back to the system (what C{twistd
esf --metrics}, C{--admin-api}, C{--audit-log} and C{--malloc-trim} run),
for programs that build their own service.

    service = ServerService(engine, endpoint)
    MetricsService(engine, serverFromString(reactor, "tcp:9464:interface=127.0.0.1")).setServiceParent(service)
    AdminService(engine, serverFromString(reactor, "tcp:8530:interface=127.0.0.1"), token).setServiceParent(service)
    AuditService(engine, "/var/log/esf/audit.jsonl").setServiceParent(service)
    MemoryTrimmer(reactor).setServiceParent(service)

docs/operations.md describes every endpoint, metric and audit record.
"""

from ._admin import AdminService
from ._audit import AuditLog, AuditService
from ._memory import MemoryTrimmer
from ._metrics import MetricsService, ServerMetrics

__all__ = [
    "AdminService",
    "AuditLog",
    "AuditService",
    "MemoryTrimmer",
    "MetricsService",
    "ServerMetrics",
]
