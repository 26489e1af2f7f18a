"""
Offline messages: the stores that keep what is relayed to a user who is
offline until that user logs on again (docs/messages.md, section 5)::

    SQLiteOfflineStore  one SQLite file (C{twistd esf --offline sqlite:PATH})
    RedisOfflineStore   Redis, for a cluster (C{--offline redis})
    MemoryOfflineStore  in memory, for tests and development

Each takes what it keeps at most as one L{OfflineBounds}.  An application
may bring its own L{esf.interfaces.IOfflineStore}, and decide what is kept
with an L{esf.interfaces.IOfflinePolicy}.
"""

from ._redis import RedisOfflineStore
from ._sqlite import SCHEMA_VERSION, SQLiteOfflineStore, check_database
from ._store import (
    KEPT_TYPES,
    KeepAll,
    MemoryOfflineStore,
    OfflineBounds,
    OfflineSenderFull,
    OfflineServerFull,
    OfflineStoreError,
    OfflineStoreFull,
    StoredMessage,
)

__all__ = [
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
]
