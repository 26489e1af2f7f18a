"""
The offline stores on their own, against the real thing: SQLite through
adbapi (a thread, on the reactor) and a redis-server of the test's own;
a database that cannot be used is a clear error at start.
"""

from __future__ import annotations

import os
import sqlite3
import stat

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from esf.offline import (
    OfflineStoreError,
    OfflineStoreFull,
    RedisOfflineStore,
    SQLiteOfflineStore,
    check_database,
)


async def exercise(store) -> None:
    """The contract every store keeps."""
    assert await store.store("bob", None, [b"a" * 10, b"b" * 10], "alice") == [1, 2]
    assert await store.store("bob", 5, [b"c" * 10], "alice") == [3]
    assert await store.store("bob", None, [b"d" * 10], "alice") == [4]
    assert await store.counts("bob") == (4, 40)
    assert await store.counts("nobody") == (0, 0)
    every = await store.fetch("bob", [None, 5], 0, 100, 1 << 20)
    assert [(m.id, m.client_type, m.raw[:1]) for m in every] == [
        (1, None, b"a"), (2, None, b"b"), (3, 5, b"c"), (4, None, b"d")
    ]
    only_device = await store.fetch("bob", [5], 0, 100, 1 << 20)
    assert [m.id for m in only_device] == [3]
    assert [m.id for m in await store.fetch("bob", [None], 1, 2, 1 << 20)] == [2, 4]
    # Bytes bound: at least one, then no more than max_bytes.
    assert [m.id for m in await store.fetch("bob", [None, 5], 0, 100, 15)] == [1]
    assert [m.id for m in await store.fetch("bob", [None, 5], 0, 100, 5)] == [1]
    # Bounds: all or none (limit 5 messages, 60 bytes).
    with pytest.raises(OfflineStoreFull):
        await store.store("bob", None, [b"e" * 5, b"f" * 5], "alice")
    with pytest.raises(OfflineStoreFull):
        await store.store("bob", None, [b"g" * 30], "alice")
    assert await store.counts("bob") == (4, 40)
    assert await store.delete("bob", [1, 3, 99]) == 2
    assert await store.counts("bob") == (2, 20)
    # IDs are never reused.
    assert await store.store("bob", None, [b"h"], "alice") == [5]
    assert [m.id for m in await store.fetch("bob", [None, 5], 0, 100, 1 << 20)] == [2, 4, 5]
    assert await store.delete("bob", [2, 4, 5]) == 3
    assert await store.counts("bob") == (0, 0)
    assert await store.fetch("bob", [None, 5], 0, 100, 1 << 20) == []


@pytest_twisted.ensureDeferred
async def test_sqlite_store(tmp_path):
    store = SQLiteOfflineStore(str(tmp_path / "offline.db"), max_messages=5, max_bytes=60)
    await store.start()
    try:
        await exercise(store)
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_sqlite_store_survives_reopening_and_runs_calls_in_order(tmp_path):
    path = str(tmp_path / "offline.db")
    store = SQLiteOfflineStore(path)
    await store.start()
    # Called without waiting: one transaction (or a few), in call order.
    stores = [store.store("bob", None, [b"%d" % n], "alice") for n in range(50)]
    fetched = store.fetch("bob", [None], 0, 1000, 1 << 20)
    ids = [await d for d in stores]
    assert ids == [[n + 1] for n in range(50)]
    assert [m.raw for m in await fetched] == [b"%d" % n for n in range(50)]
    await store.stop()
    again = SQLiteOfflineStore(path)
    await again.start()
    try:
        assert await again.counts("bob") == (50, sum(len(b"%d" % n) for n in range(50)))
        assert await again.store("bob", None, [b"next"], "alice") == [51]
    finally:
        await again.stop()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2


def test_a_corrupt_database_is_a_clear_error(tmp_path):
    path = tmp_path / "offline.db"
    path.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(OfflineStoreError, match="not a usable SQLite database"):
        check_database(str(path))


def test_a_damaged_database_is_a_clear_error(tmp_path):
    path = tmp_path / "offline.db"
    check_database(str(path))
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=DELETE")
        db.executemany(
            "INSERT INTO messages VALUES ('bob', ?, NULL, ?, 'alice')", [(i, b"x" * 3000) for i in range(200)]
        )
    data = bytearray(path.read_bytes())
    for offset in range(4096 * 3, len(data) - 4096, 4096):
        data[offset : offset + 64] = b"\xa5" * 64  # trash the start of every page
    path.write_bytes(bytes(data))
    with pytest.raises(OfflineStoreError, match="corrupt|not a usable|cannot use"):
        check_database(str(path))


def test_a_newer_schema_is_a_clear_error(tmp_path):
    path = tmp_path / "offline.db"
    check_database(str(path))
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 3")
    with pytest.raises(OfflineStoreError, match="schema version 3 is newer"):
        check_database(str(path))


def test_a_database_of_something_else_is_refused(tmp_path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE accounts (id INTEGER)")
    with pytest.raises(OfflineStoreError, match="no esf offline store"):
        check_database(str(path))


def test_an_unwritable_database_is_a_clear_error(tmp_path):
    """
    A database this process may read but not write is refused at start.
    Root may write anywhere, so as root the check runs as user nobody
    (effective user ID) on a database nobody can only read.
    """
    import shutil
    import tempfile

    if os.geteuid() != 0:
        directory = tmp_path / "ro"
        directory.mkdir()
        path = directory / "offline.db"
        check_database(str(path))
        path.chmod(stat.S_IRUSR)
        directory.chmod(stat.S_IRUSR | stat.S_IXUSR)
        try:
            with pytest.raises(OfflineStoreError, match="cannot use|WAL|readonly|read-only"):
                check_database(str(path))
        finally:
            directory.chmod(stat.S_IRWXU)
            path.chmod(stat.S_IRUSR | stat.S_IWUSR)
        return
    directory = tempfile.mkdtemp(prefix="esf-ro-")  # not under root's private tmp
    try:
        os.chmod(directory, 0o755)
        path = os.path.join(directory, "offline.db")
        check_database(path)
        os.chmod(path, 0o644)  # others may read it, not write it
        os.seteuid(65534)  # nobody, for the check only (root stays the saved ID)
        try:
            with pytest.raises(OfflineStoreError, match="cannot use|WAL|readonly|read-only"):
                check_database(path)
        finally:
            os.seteuid(0)
    finally:
        shutil.rmtree(directory)


def test_a_path_that_is_no_file_is_a_clear_error(tmp_path):
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(OfflineStoreError, match="cannot open|not a usable|cannot use"):
        check_database(str(tmp_path / "dir.db"))


def test_a_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(OfflineStoreError, match="does not exist"):
        check_database(str(tmp_path / "nowhere" / "offline.db"))


@pytest_twisted.ensureDeferred
async def test_redis_store(redis_server):
    from twisted.internet import reactor

    from esf._cluster import RedisLink, RedisURL

    link = RedisLink(reactor, RedisURL.parse(redis_server.url))
    connected: Deferred[None] = Deferred()
    link.start(lambda: connected.called or connected.callback(None), lambda: None)
    await connected
    try:
        await exercise(RedisOfflineStore(link, max_messages=5, max_bytes=60, prefix="t1"))
        # Another store on the same Redis (another node) sees the same.
        one = RedisOfflineStore(link, prefix="t2")
        two = RedisOfflineStore(link, prefix="t2")
        assert await one.store("carol", None, [b"x"], "alice") == [1]
        assert [m.raw for m in await two.fetch("carol", [None], 0, 10, 100)] == [b"x"]
    finally:
        await link.stop()
