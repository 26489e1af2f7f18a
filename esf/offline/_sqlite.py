"""
The offline store in SQLite, through L{twisted.enterprise.adbapi} with
exactly one connection (one thread): WAL journal, C{synchronous=FULL}, so
that a message is durable once its sender was told it is stored.

Operations are queued and run in call order; whatever is queued while a
transaction runs goes into the next one (a group commit: one fsync for
many stores); a sender's row in C{senders} is read and written once per
transaction, however many of its messages the transaction stores or
deletes.

Schema version 2 (C{PRAGMA user_version})::

    users     user_id TEXT PRIMARY KEY, next_id, count, bytes
    messages  (user_id, id) PRIMARY KEY, client_type (NULL: any device),
              frame BLOB, sender (the sending user)
    senders   sender_id TEXT PRIMARY KEY, count, bytes: what each sender
              has waiting, for all receivers together

A version 1 database (no sender) is migrated at start: each message's
sender is read from its frame's header.  The store keeps the whole
store's total (messages, bytes) in memory: read once at start, kept by
each store and delete as it runs (there is one writer, this process).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from typing import Any, Callable

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from esf.interfaces import IOfflineStore

from ._store import MAX_ID, OfflineBounds, OfflineStoreError, StoredMessage

__all__ = ["SQLiteOfflineStore", "SCHEMA_VERSION", "check_database"]

log = Logger(namespace="esf.offline")

#: The schema this code reads and writes.
SCHEMA_VERSION = 2

_SENDERS = (
    "CREATE TABLE senders ("
    " sender_id TEXT PRIMARY KEY,"
    " count INTEGER NOT NULL,"
    " bytes INTEGER NOT NULL) WITHOUT ROWID"
)

_SCHEMA = (
    "CREATE TABLE users ("
    " user_id TEXT PRIMARY KEY,"
    " next_id INTEGER NOT NULL,"
    " count INTEGER NOT NULL,"
    " bytes INTEGER NOT NULL)",
    "CREATE TABLE messages ("
    " user_id TEXT NOT NULL,"
    " id INTEGER NOT NULL,"
    " client_type INTEGER,"
    " frame BLOB NOT NULL,"
    " sender TEXT NOT NULL DEFAULT '',"
    " PRIMARY KEY (user_id, id)) WITHOUT ROWID",
    _SENDERS,
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)


def _frame_sender(head: bytes) -> str:
    """
    The sender's UserID in a frame's header (C{head}: the frame from byte
    12 on): a length byte, then the ID.
    """
    return bytes(head[1 : 1 + head[0]]).decode("utf-8", "replace") if head else ""


def _migrate_from_1(connection: sqlite3.Connection) -> None:
    """
    Version 1 to 2: each message gets its sender (from its frame's header),
    and each sender its totals.
    """
    connection.execute("ALTER TABLE messages ADD COLUMN sender TEXT NOT NULL DEFAULT ''")
    rows = connection.execute(
        "SELECT user_id, id, substr(frame, 13, 256), length(frame) FROM messages"
    ).fetchall()
    senders: dict[str, list[int]] = {}
    updates = []
    for user_id, message_id, head, size in rows:
        sender = _frame_sender(head)
        updates.append((sender, user_id, message_id))
        totals = senders.setdefault(sender, [0, 0])
        totals[0] += 1
        totals[1] += size
    connection.executemany("UPDATE messages SET sender = ? WHERE user_id = ? AND id = ?", updates)
    connection.execute(_SENDERS)
    connection.executemany(
        "INSERT INTO senders (sender_id, count, bytes) VALUES (?, ?, ?)",
        [(sender, n, b) for sender, (n, b) in senders.items()],
    )
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _pragmas(connection: sqlite3.Connection) -> None:
    mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise OfflineStoreError(f"cannot switch the database to WAL (it stays {mode!r})")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("PRAGMA busy_timeout=5000")


def check_database(path: str) -> None:
    """
    Make sure C{path} is an offline store this code can use, creating it
    (schema version 2) when it does not exist, migrating it when it has an
    older schema.

    @raise OfflineStoreError: saying what is wrong: the directory is
        missing, the file is not a database or is corrupt, it is not
        writable, it holds something else, or its schema is newer.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise OfflineStoreError(f"{path}: the directory {directory} does not exist")
    try:
        connection = sqlite3.connect(path, isolation_level=None)
    except sqlite3.Error as e:
        raise OfflineStoreError(f"{path}: cannot open: {e}") from None
    try:
        try:
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            tables = {
                row[0]
                for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
        except sqlite3.DatabaseError as e:
            raise OfflineStoreError(f"{path}: not a usable SQLite database: {e}") from None
        if version > SCHEMA_VERSION:
            raise OfflineStoreError(
                f"{path}: schema version {version} is newer than this esf's "
                f"({SCHEMA_VERSION}): upgrade esf, or give another file"
            )
        if version == 0 and tables:
            raise OfflineStoreError(
                f"{path}: holds tables ({', '.join(sorted(tables))}) but no esf offline "
                "store: give another file"
            )
        try:
            _pragmas(connection)
            problems = [row[0] for row in connection.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise OfflineStoreError(
                    f"{path}: the database is corrupt: {'; '.join(problems[:5])}"
                )
            connection.execute("BEGIN IMMEDIATE")
            needed = {"users", "messages"} | ({"senders"} if version >= 2 else set())
            if version == 0:
                for statement in _SCHEMA:
                    connection.execute(statement)
            elif not needed <= tables:
                connection.execute("ROLLBACK")
                raise OfflineStoreError(f"{path}: the offline store's tables are missing")
            elif version == 1:
                _migrate_from_1(connection)
                log.info(
                    "{path}: the offline store's schema was migrated from version 1 to {version}",
                    path=path,
                    version=SCHEMA_VERSION,
                    esf_event="offline_store_migrated",
                )
            connection.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            raise OfflineStoreError(f"{path}: cannot use the database: {e}") from None
    finally:
        connection.close()


class _Op:
    __slots__ = ("run", "deferred")

    def __init__(self, run: Callable[[Any, _Senders], Any]):
        self.run = run
        self.deferred: Deferred[Any] = Deferred()


@implementer(IOfflineStore)
class SQLiteOfflineStore:
    """
    The offline store in one SQLite file.

    @param path: the database file (made on L{start} when missing).
    @param bounds: what it keeps at most (L{esf.offline.OfflineBounds}).
    @param max_batch: most operations in one transaction.
    """

    def __init__(
        self,
        path: str,
        *,
        bounds: OfflineBounds = OfflineBounds(),
        max_batch: int = 1000,
    ):
        self.path = path
        self.bounds = bounds
        self.max_batch = max_batch
        self.pool: adbapi.ConnectionPool | None = None
        self._queue: list[_Op] = []
        self._busy = False
        self._idle: list[Deferred[None]] = []
        #: (messages, bytes) in the whole store: read at start, then kept
        #: by the operations, in the database's thread, as they run.
        self._total = (0, 0)

    def __repr__(self) -> str:
        return f"<SQLiteOfflineStore {self.path}>"

    # -- life -------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """
        Check (or make) the database, then open its one connection.
        """
        if self.pool is not None:
            return succeed(None)
        check_database(self.path)
        self.pool = adbapi.ConnectionPool(
            "sqlite3",
            self.path,
            cp_min=1,
            cp_max=1,
            cp_openfun=_pragmas,
            check_same_thread=False,
            cp_reconnect=False,
        )

        def read_total(cursor: Any, senders: _Senders) -> None:
            cursor.execute("SELECT coalesce(sum(count), 0), coalesce(sum(bytes), 0) FROM users")
            count, size = cursor.fetchone()
            self._total = (int(count), int(size))

        # Run before whatever is called after start.
        return self._call(read_total)

    def stop(self) -> Deferred[None]:
        """
        Close once what was called has finished.
        """
        d: Deferred[None] = Deferred()
        if not self._busy and not self._queue:
            d.callback(None)
        else:
            self._idle.append(d)

        def close(_: Any) -> None:
            pool, self.pool = self.pool, None
            if pool is not None:
                pool.close()

        return d.addCallback(close)

    # -- queue ---------------------------------------------------------------------

    def _call(self, run: Callable[[Any, _Senders], Any]) -> Deferred[Any]:
        if self.pool is None:
            raise OfflineStoreError(f"{self.path}: the offline store is not started")
        op = _Op(run)
        self._queue.append(op)
        self._next()
        return op.deferred

    def _next(self) -> None:
        if self._busy or not self._queue or self.pool is None:
            if not self._busy and not self._queue:
                idle, self._idle = self._idle, []
                for d in idle:
                    d.callback(None)
            return
        batch = self._queue[: self.max_batch]
        del self._queue[: self.max_batch]
        self._busy = True
        d = self.pool.runInteraction(_run_all, batch)
        d.addBoth(self._done, batch, self._total)

    def _done(self, results: Any, batch: list[_Op], total: tuple[int, int]) -> None:
        self._busy = False
        if isinstance(results, Failure):
            # Rolled back: so is the total.
            self._total = total
            error = results.value
            if isinstance(error, sqlite3.Error):
                error = OfflineStoreError(f"{self.path}: {error}")
            for op in batch:
                op.deferred.errback(error)
        else:
            for op, result in zip(batch, results):
                if isinstance(result, Exception):
                    op.deferred.errback(result)
                else:
                    op.deferred.callback(result)
        self._next()

    # -- IOfflineStore -------------------------------------------------------------

    def store(
        self, user_id: str, client_type: int | None, frames: Sequence[bytes], sender_id: str
    ) -> Deferred[list[int]]:
        frames = [bytes(f) for f in frames]

        def run(cursor: Any, senders: _Senders) -> Any:
            cursor.execute("SELECT next_id, count, bytes FROM users WHERE user_id = ?", (user_id,))
            row = cursor.fetchone()
            next_id, count, size = row if row is not None else (1, 0, 0)
            sender = senders.get(sender_id)
            added = sum(len(f) for f in frames)
            total = self._total
            refused = self.bounds.refusal(
                user_id,
                (count, size),
                sender_id,
                (sender[0], sender[1]),
                total,
                len(frames),
                added,
            )
            if refused is not None:
                return refused
            if next_id + len(frames) > MAX_ID:
                return OfflineStoreError(f"{user_id} has used up its message IDs")
            ids = list(range(next_id, next_id + len(frames)))
            cursor.executemany(
                "INSERT INTO messages (user_id, id, client_type, frame, sender) "
                "VALUES (?, ?, ?, ?, ?)",
                [(user_id, i, client_type, f, sender_id) for i, f in zip(ids, frames)],
            )
            cursor.execute(
                "INSERT INTO users (user_id, next_id, count, bytes) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (user_id) DO UPDATE SET next_id = excluded.next_id, "
                "count = excluded.count, bytes = excluded.bytes",
                (user_id, next_id + len(frames), count + len(frames), size + added),
            )
            senders.change(sender_id, len(frames), added)
            self._total = (total[0] + len(frames), total[1] + added)
            return ids

        return self._call(run)

    def fetch(
        self,
        user_id: str,
        client_types: Sequence[int | None],
        after: int,
        max_count: int,
        max_bytes: int,
    ) -> Deferred[list[StoredMessage]]:
        kinds = [k for k in client_types if k is not None]
        any_device = None in client_types

        def run(cursor: Any, senders: _Senders) -> Any:
            condition = (
                " OR ".join(
                    (["client_type IS NULL"] if any_device else [])
                    + ["client_type = ?"] * len(kinds)
                )
                or "0"
            )
            # The sizes first (SQLite reads them from the record header),
            # so that only the frames that fit are read: a window of large
            # blob fragments must not read the next hundred to keep one.
            cursor.execute(
                "SELECT id, length(frame) FROM messages "
                f"WHERE user_id = ? AND id > ? AND ({condition}) ORDER BY id LIMIT ?",
                (user_id, after, *kinds, max_count),
            )
            last = None
            size = 0
            for message_id, length in cursor.fetchall():
                if last is not None and size + length > max_bytes:
                    break
                last = message_id
                size += length
            if last is None:
                return []
            cursor.execute(
                "SELECT id, client_type, frame FROM messages "
                f"WHERE user_id = ? AND id > ? AND id <= ? AND ({condition}) ORDER BY id",
                (user_id, after, last, *kinds),
            )
            return [StoredMessage(i, kind, bytes(frame)) for i, kind, frame in cursor.fetchall()]

        return self._call(run)

    def delete(self, user_id: str, ids: Sequence[int]) -> Deferred[int]:
        ids = list(ids)

        def run(cursor: Any, cache: _Senders) -> Any:
            gone = size = 0
            senders: dict[str, list[int]] = {}
            for i in ids:
                cursor.execute(
                    "DELETE FROM messages WHERE user_id = ? AND id = ? "
                    "RETURNING length(frame), sender",
                    (user_id, i),
                )
                row = cursor.fetchone()
                if row is not None:
                    gone += 1
                    size += row[0]
                    sender = senders.setdefault(row[1], [0, 0])
                    sender[0] += 1
                    sender[1] += row[0]
            if gone:
                cursor.execute(
                    "UPDATE users SET count = count - ?, bytes = bytes - ? WHERE user_id = ?",
                    (gone, size, user_id),
                )
                for sender_id, (n, b) in senders.items():
                    cache.change(sender_id, -n, -b)
                total = self._total
                self._total = (total[0] - gone, total[1] - size)
            return gone

        return self._call(run)

    def counts(self, user_id: str) -> Deferred[tuple[int, int]]:
        def run(cursor: Any, senders: _Senders) -> Any:
            cursor.execute("SELECT count, bytes FROM users WHERE user_id = ?", (user_id,))
            row = cursor.fetchone()
            return (row[0], row[1]) if row is not None else (0, 0)

        return self._call(run)

    def sender_counts(self, sender_id: str) -> Deferred[tuple[int, int]]:
        def run(cursor: Any, senders: _Senders) -> Any:
            row = senders.get(sender_id)
            return (row[0], row[1])

        return self._call(run)

    def total_counts(self) -> Deferred[tuple[int, int]]:
        # In call order, like the rest: after every store called before it.
        return self._call(lambda cursor, senders: self._total)


class _Senders:
    """
    The rows of the C{senders} table one transaction reads and changes:
    each read once, written back once at its end (many stores from one
    sender in a transaction cost one read and one write).
    """

    __slots__ = ("changed", "cursor", "rows")

    def __init__(self, cursor: Any):
        self.cursor = cursor
        self.rows: dict[str, list[int]] = {}
        self.changed: set[str] = set()

    def get(self, sender_id: str) -> list[int]:
        """
        C{[messages, bytes]} C{sender_id} has waiting, as of now.
        """
        row = self.rows.get(sender_id)
        if row is None:
            self.cursor.execute(
                "SELECT count, bytes FROM senders WHERE sender_id = ?", (sender_id,)
            )
            found = self.cursor.fetchone()
            row = self.rows[sender_id] = [found[0], found[1]] if found else [0, 0]
        return row

    def change(self, sender_id: str, count: int, size: int) -> None:
        row = self.get(sender_id)
        row[0] += count
        row[1] += size
        self.changed.add(sender_id)

    def write(self) -> None:
        rows = [(s, self.rows[s][0], self.rows[s][1]) for s in sorted(self.changed)]
        self.cursor.executemany(
            "INSERT INTO senders (sender_id, count, bytes) VALUES (?, ?, ?) "
            "ON CONFLICT (sender_id) DO UPDATE SET count = excluded.count, "
            "bytes = excluded.bytes",
            [row for row in rows if row[1] > 0],
        )
        self.cursor.executemany(
            "DELETE FROM senders WHERE sender_id = ?", [(row[0],) for row in rows if row[1] <= 0]
        )


def _run_all(cursor: Any, batch: list[_Op]) -> list[Any]:
    """
    Run a batch of operations in one transaction (adbapi commits it).  An
    operation's refusal is its result; a database error fails the batch.
    """
    senders = _Senders(cursor)
    results = [op.run(cursor, senders) for op in batch]
    senders.write()
    return results
