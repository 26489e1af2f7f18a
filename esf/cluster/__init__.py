"""
Several esf nodes acting as one server, through Redis (docs/cluster.md).

C{twistd esf --cluster redis://HOST:PORT/DB} (or
C{redis+sentinel://HOST:PORT,.../SERVICE/DB}) does the wiring; an
application that builds its own engine passes a L{ClusterPresence} as the
engine's C{presence}, with the same C{node_id}, and runs a
L{ClusterService} before the engine's service.
"""

from ._presence import (
    DEFAULT_LEASE,
    ClusterPresence,
    ClusterService,
    RedisUnavailable,
    RedisURL,
    RemoteHandle,
    default_node_id,
)

__all__ = [
    "DEFAULT_LEASE",
    "ClusterPresence",
    "ClusterService",
    "RedisUnavailable",
    "RedisURL",
    "RemoteHandle",
    "default_node_id",
]
