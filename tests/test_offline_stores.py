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

from esf.offline import (
    OfflineBounds,
    OfflineSenderFull,
    OfflineServerFull,
    OfflineStoreError,
    OfflineStoreFull,
    RedisOfflineStore,
    SQLiteOfflineStore,
    check_database,
)


async def exercise(store) -> None:
    """The contract every store keeps (given L{SMALL}'s bounds)."""
    assert await store.store("bob", None, [b"a" * 1000, b"b" * 1000], "alice") == [1, 2]
    assert await store.store("bob", 5, [b"c" * 1000], "alice") == [3]
    assert await store.store("bob", None, [b"d" * 1000], "alice") == [4]
    assert await store.counts("bob") == (4, 4000)
    assert await store.counts("nobody") == (0, 0)
    every = await store.fetch("bob", [None, 5], 0, 100, 1 << 20)
    assert [(m.id, m.client_type, m.raw[:1]) for m in every] == [
        (1, None, b"a"),
        (2, None, b"b"),
        (3, 5, b"c"),
        (4, None, b"d"),
    ]
    only_device = await store.fetch("bob", [5], 0, 100, 1 << 20)
    assert [m.id for m in only_device] == [3]
    assert [m.id for m in await store.fetch("bob", [None], 1, 2, 1 << 20)] == [2, 4]
    # Bytes bound: at least one, then no more than max_bytes.
    assert [m.id for m in await store.fetch("bob", [None, 5], 0, 100, 1500)] == [1]
    assert [m.id for m in await store.fetch("bob", [None, 5], 0, 100, 500)] == [1]
    # Bounds: all or none (limit 5 messages, 6000 bytes).
    with pytest.raises(OfflineStoreFull, match=r"at most 5 .6000 bytes."):
        await store.store("bob", None, [b"e" * 500, b"f" * 500], "alice")
    with pytest.raises(OfflineStoreFull):
        await store.store("bob", None, [b"g" * 3000], "alice")
    assert await store.counts("bob") == (4, 4000)
    assert await store.delete("bob", [1, 3, 99]) == 2
    assert await store.counts("bob") == (2, 2000)
    # IDs are never reused.
    assert await store.store("bob", None, [b"h"], "alice") == [5]
    assert [m.id for m in await store.fetch("bob", [None, 5], 0, 100, 1 << 20)] == [2, 4, 5]
    assert await store.delete("bob", [2, 4, 5]) == 3
    assert await store.counts("bob") == (0, 0)
    assert await store.fetch("bob", [None, 5], 0, 100, 1 << 20) == []


#: The per-user bounds L{exercise} expects.
SMALL = OfflineBounds(max_messages=5, max_bytes=6000)


@pytest_twisted.ensureDeferred
async def test_sqlite_store(tmp_path):
    store = SQLiteOfflineStore(str(tmp_path / "offline.db"), bounds=SMALL)
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
            "INSERT INTO messages VALUES ('bob', ?, NULL, ?, 'alice')",
            [(i, b"x" * 3000) for i in range(200)],
        )
    data = bytearray(path.read_bytes())
    for offset in range(4096 * 3, len(data) - 4096, 4096):
        data[offset : offset + 64] = b"\xa5" * 64  # trash the start of every page
    path.write_bytes(bytes(data))
    with pytest.raises(OfflineStoreError, match=r"corrupt|not a usable|cannot use"):
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
            with pytest.raises(OfflineStoreError, match=r"cannot use|WAL|readonly|read-only"):
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
            with pytest.raises(OfflineStoreError, match=r"cannot use|WAL|readonly|read-only"):
                check_database(path)
        finally:
            os.seteuid(0)
    finally:
        shutil.rmtree(directory)


def test_a_path_that_is_no_file_is_a_clear_error(tmp_path):
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(OfflineStoreError, match=r"cannot open|not a usable|cannot use"):
        check_database(str(tmp_path / "dir.db"))


def test_a_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(OfflineStoreError, match="does not exist"):
        check_database(str(tmp_path / "nowhere" / "offline.db"))


@pytest_twisted.ensureDeferred
async def test_redis_store(redis_server):
    from _redis import connected_link

    link = await connected_link(redis_server.url)
    try:
        await exercise(RedisOfflineStore(link, bounds=SMALL, prefix="t1"))
        # Another store on the same Redis (another node) sees the same.
        one = RedisOfflineStore(link, prefix="t2")
        two = RedisOfflineStore(link, prefix="t2")
        assert await one.store("carol", None, [b"x"], "alice") == [1]
        assert [m.raw for m in await two.fetch("carol", [None], 0, 10, 100)] == [b"x"]
    finally:
        await link.stop()


# -- bounds per sender and for the whole store ------------------------------------

#: The bounds the next tests give their stores.
BOUNDS = OfflineBounds(
    max_messages=100,
    max_bytes=1 << 20,
    max_sender_messages=3,
    max_sender_bytes=1024,
    max_total_messages=6,
    max_total_bytes=5000,
)


def test_offline_bounds_are_checked_when_made():
    assert OfflineBounds(max_bytes=1024, max_sender_bytes=1024, max_total_bytes=1024)
    for name in ("max_messages", "max_sender_messages", "max_total_messages"):
        with pytest.raises(ValueError, match=f"{name}.*>= 1"):
            OfflineBounds(**{name: 0})
    for name in ("max_bytes", "max_sender_bytes", "max_total_bytes"):
        with pytest.raises(ValueError, match=f"{name}.*>= 1024"):
            OfflineBounds(**{name: 1023})
    with pytest.raises(TypeError, match="max_messages"):
        OfflineBounds(max_messages=10.5)
    with pytest.raises(AttributeError):
        BOUNDS.max_messages = 1  # frozen: a store's bounds do not change under it


def test_offline_bounds_refusal_names_the_first_bound_passed():
    # (messages, bytes) held now by the user, the sender, the whole store.
    room = ((0, 0), (0, 0), (0, 0))
    assert BOUNDS.refusal("bob", room[0], "alice", room[1], room[2], 3, 1024) is None
    # Every bound passed at once: the user's is named first...
    refused = BOUNDS.refusal("bob", (100, 0), "alice", (3, 0), (6, 0), 1, 1)
    assert type(refused) is OfflineStoreFull and refused.user_id == "bob"
    assert (refused.count, refused.max_messages, refused.max_bytes) == (100, 100, 1 << 20)
    # ...then the sender's...
    refused = BOUNDS.refusal("bob", (0, 0), "alice", (0, 1000), (6, 0), 1, 25)
    assert type(refused) is OfflineSenderFull and refused.sender_id == "alice"
    assert (refused.size, refused.max_messages, refused.max_bytes) == (1000, 3, 1024)
    # ...then the whole store's.
    refused = BOUNDS.refusal("bob", (0, 0), "alice", (0, 0), (5, 4999), 1, 2)
    assert type(refused) is OfflineServerFull
    assert (refused.count, refused.size, refused.max_bytes) == (5, 4999, 5000)
    # Exactly at a bound fits.
    assert BOUNDS.refusal("bob", (99, 0), "alice", (2, 1000), (5, 4976), 1, 24) is None


def test_the_full_errors_say_which_bound_and_carry_it():
    """
    The three refusals: their messages, and the five attributes each
    carries (the sender's ID as user_id, and as sender_id, for the
    sender's bound; no user for the whole store's).
    """
    cases = [
        (OfflineStoreFull("bob", 5, 6000, 5, 6000), ("bob", 5, 6000, 5, 6000),
         "bob has 5 messages (6000 bytes) waiting, at most 5 (6000 bytes) are kept: no room for more"),
        (OfflineSenderFull("alice", 3, 30, 3, 1024), ("alice", 3, 30, 3, 1024),
         "alice has 3 messages (30 bytes) waiting for users who are offline, at most 3 (1024 bytes) "
         "per sender: no room for more"),
        (OfflineServerFull(6, 60, 6, 5000), ("", 6, 60, 6, 5000),
         "the offline store holds 6 messages (60 bytes), at most 6 (5000 bytes) in all: no room for more"),
    ]  # fmt: skip
    for error, values, text in cases:
        assert isinstance(error, OfflineStoreFull)
        assert str(error) == text and error.args == (text,)
        assert (
            error.user_id,
            error.count,
            error.size,
            error.max_messages,
            error.max_bytes,
        ) == values
    assert cases[1][0].sender_id == "alice"


def test_the_bounds_example_in_the_docs_runs(tmp_path):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "messages.md").read_text()
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "OfflineBounds(" in b]
    code = code.replace("/var/lib/esf/offline.db", str(tmp_path / "offline.db"))
    namespace: dict = {}
    exec(compile(code, "docs/messages.md", "exec"), namespace)
    assert namespace["store"].bounds == namespace["bounds"]
    assert namespace["bounds"].max_total_bytes == 512 * 1024 * 1024


async def exercise_bounds(store, reopen):
    """
    What one sender may have waiting, for all receivers, and what the whole
    store holds: refused past them, counted down by deletes, the same after
    C{reopen} (which closes C{store} and answers the store opened again).
    """
    # The sender's bound in bytes, then in messages, over many receivers.
    with pytest.raises(OfflineSenderFull, match=r"at most 3 .1024 bytes. per sender"):
        await store.store("r0", None, [b"x" * 1025], "mallory")
    for n in (1, 2, 3):
        assert await store.store(f"r{n}", None, [b"m" * 10], "mallory") == [1]
    with pytest.raises(OfflineSenderFull):
        await store.store("r4", None, [b"m" * 10], "mallory")
    assert await store.sender_counts("mallory") == (3, 30)
    # Others are not held back by mallory's bound...
    assert await store.store("r4", None, [b"a" * 10, b"a" * 10], "alice") == [1, 2]
    assert await store.store("r4", 5, [b"a" * 10], "alice") == [3]
    assert await store.total_counts() == (6, 60)
    # ...but by the whole store's.
    with pytest.raises(OfflineServerFull, match=r"holds 6 messages .60 bytes., at most 6"):
        await store.store("r5", None, [b"c"], "carol")
    assert await store.sender_counts("carol") == (0, 0)
    assert await store.counts("r5") == (0, 0)

    store = await reopen(store)
    assert await store.total_counts() == (6, 60)
    assert await store.sender_counts("mallory") == (3, 30)
    assert await store.sender_counts("alice") == (3, 30)
    with pytest.raises(OfflineServerFull):
        await store.store("r5", None, [b"c"], "carol")
    with pytest.raises(OfflineSenderFull):
        await store.store("r5", None, [b"c"], "mallory")

    # r1 acknowledged: mallory and the store have room for one more.
    assert await store.delete("r1", [1]) == 1
    assert await store.sender_counts("mallory") == (2, 20)
    assert await store.total_counts() == (5, 50)
    assert await store.store("r5", None, [b"c" * 5], "carol") == [1]
    assert await store.total_counts() == (6, 55)
    with pytest.raises(OfflineServerFull):
        await store.store("r6", None, [b"m"], "mallory")
    # Deleting what is gone, or was never there, changes nothing.
    assert await store.delete("r1", [1, 7]) == 0
    assert await store.total_counts() == (6, 55)
    assert await store.delete("r2", [1]) == 1
    assert await store.delete("r3", [1]) == 1
    assert await store.delete("r4", [1, 2, 3]) == 3
    assert await store.delete("r5", [1]) == 1
    for sender in ("mallory", "alice", "carol"):
        assert await store.sender_counts(sender) == (0, 0)
    assert await store.total_counts() == (0, 0)
    # The whole store's bound in bytes.
    for n in range(5):
        assert await store.store(f"b{n}", None, [b"b" * 1000], f"s{n}") == [1]
    with pytest.raises(OfflineServerFull, match=r"holds 5 messages .5000 bytes."):
        await store.store("b5", None, [b"b"], "s5")
    return store


@pytest_twisted.ensureDeferred
async def test_memory_store_bounds():
    from esf.offline import MemoryOfflineStore

    async def reopen(store):
        return store  # nothing to reopen: the same object

    await exercise_bounds(MemoryOfflineStore(bounds=BOUNDS), reopen)


@pytest_twisted.ensureDeferred
async def test_sqlite_store_bounds_survive_a_restart(tmp_path):
    path = str(tmp_path / "offline.db")

    async def reopen(store):
        await store.stop()
        again = SQLiteOfflineStore(path, bounds=BOUNDS)
        await again.start()
        return again

    store = SQLiteOfflineStore(path, bounds=BOUNDS)
    await store.start()
    store = await exercise_bounds(store, reopen)
    await store.stop()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM senders").fetchone()[0] == 5
        assert db.execute("SELECT sum(count), sum(bytes) FROM users").fetchone() == (5, 5000)


@pytest_twisted.ensureDeferred
async def test_sqlite_store_total_rolls_back_with_its_transaction(tmp_path):
    """
    The total is kept in memory: a transaction that fails (here: a value
    SQLite cannot bind, after a store that went well in the same
    transaction) leaves it as it was, like the database.
    """
    store = SQLiteOfflineStore(str(tmp_path / "offline.db"), bounds=BOUNDS)
    await store.start()
    try:
        assert await store.store("bob", None, [b"1" * 10], "alice") == [1]
        busy = store.fetch("bob", [None], 0, 10, 1000)  # holds the next two back
        good = store.store("bob", None, [b"2" * 10], "alice")
        bad = store.store("bob", object(), [b"3" * 10], "alice")  # type: ignore[arg-type]
        await busy
        for d in (good, bad):
            with pytest.raises(OfflineStoreError):
                await d
        assert await store.total_counts() == (1, 10)
        assert await store.sender_counts("alice") == (1, 10)
        assert await store.counts("bob") == (1, 10)
        assert await store.store("bob", None, [b"4" * 10], "alice") == [2]
        assert await store.total_counts() == (2, 20)
    finally:
        await store.stop()


#: The offline store's schema version 1, as it was made.
_SCHEMA_1 = (
    (
        "CREATE TABLE users ("
        " user_id TEXT PRIMARY KEY,"
        " next_id INTEGER NOT NULL,"
        " count INTEGER NOT NULL,"
        " bytes INTEGER NOT NULL)"
    ),
    (
        "CREATE TABLE messages ("
        " user_id TEXT NOT NULL,"
        " id INTEGER NOT NULL,"
        " client_type INTEGER,"
        " frame BLOB NOT NULL,"
        " PRIMARY KEY (user_id, id)) WITHOUT ROWID"
    ),
    "PRAGMA user_version = 1",
)


@pytest_twisted.ensureDeferred
async def test_a_version_1_database_is_migrated(tmp_path):
    """
    A database of schema version 1 (no sender kept) opens: each message
    gets the sender named in its frame's header, each sender its totals,
    and what it holds counts against the bounds at once.
    """
    from esf.wire._frames import MessageType, WireConfig, encode_frame

    path = tmp_path / "offline.db"
    wire = WireConfig()
    kept = {  # receiver -> [(sender, body)]
        "bob": [("mallory", b"x" * 40), ("alice", b"a" * 7), ("mallory", b"y" * 3)],
        "carol": [("mallory", b"z" * 100), ("\u00e9mile", b"e")],
    }
    with sqlite3.connect(path) as db:
        for statement in _SCHEMA_1:
            db.execute(statement)
        for receiver, messages in kept.items():
            frames = [
                encode_frame(wire, MessageType.SEND, body, user_id=sender, dest_user_id=receiver)
                for sender, body in messages
            ]
            db.executemany(
                "INSERT INTO messages VALUES (?, ?, NULL, ?)",
                [(receiver, i + 1, f) for i, f in enumerate(frames)],
            )
            db.execute(
                "INSERT INTO users VALUES (?, ?, ?, ?)",
                (receiver, len(frames) + 1, len(frames), sum(map(len, frames))),
            )
    header = wire.header_length
    store = SQLiteOfflineStore(str(path), bounds=BOUNDS)
    await store.start()
    try:
        assert await store.sender_counts("mallory") == (3, 3 * header + 143)
        assert await store.sender_counts("alice") == (1, header + 7)
        assert await store.sender_counts("\u00e9mile") == (1, header + 1)
        assert await store.total_counts() == (5, 5 * header + 151)
        with pytest.raises(OfflineSenderFull):
            await store.store("dave", None, [b"m"], "mallory")
        assert await store.store("bob", None, [b"a"], "alice") == [4]
        assert [m.raw[-1:] for m in await store.fetch("bob", [None], 0, 10, 1 << 20)] == [
            b"x",
            b"a",
            b"y",
            b"a",
        ]
        assert await store.delete("bob", [1, 3]) == 2
        assert await store.sender_counts("mallory") == (1, header + 100)
    finally:
        await store.stop()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
        assert db.execute(
            "SELECT sender FROM messages WHERE user_id = 'carol' ORDER BY id"
        ).fetchall() == [("mallory",), ("\u00e9mile",)]


@pytest_twisted.ensureDeferred
async def test_redis_store_bounds_survive_a_restart_of_redis(tmp_path):
    """
    The counters are Redis keys, kept by the same scripts as the messages:
    with C{appendfsync always} they survive a kill -9 of redis-server and
    a new node's store reads them.
    """
    from _redis import RedisServer, connected_link

    redis = RedisServer(tmp_path, args=("--appendonly", "yes", "--appendfsync", "always"))
    redis.start()
    links = []

    async def connect():
        link = await connected_link(redis.url)
        links.append(link)
        return RedisOfflineStore(link, bounds=BOUNDS)

    async def reopen(store):
        await store.link.stop()
        redis.restart()  # kill -9, then start again on its files
        return await connect()

    try:
        store = await exercise_bounds(await connect(), reopen)
        assert await store.total_counts() == (5, 5000)
    finally:
        for link in links:
            await link.stop()
        redis.stop()


class _Counting:
    """
    A Redis link that counts the bytes of the frames its replies carry.
    """

    def __init__(self, link):
        self.link = link
        self.received = 0

    def _count(self, reply):
        if isinstance(reply, bytes):
            self.received += len(reply)
        elif isinstance(reply, list):
            for item in reply:
                self._count(item)
        return reply

    def execute(self, *args, **kwargs):
        return self.link.execute(*args, **kwargs).addCallback(self._count)

    def eval(self, *args, **kwargs):
        return self.link.eval(*args, **kwargs).addCallback(self._count)


@pytest_twisted.ensureDeferred
async def test_redis_store_reads_only_what_a_window_delivers(redis_server):
    """
    A drain fetches a window (at most its bytes) after the last message
    delivered, again and again: Redis sends each time only the frames that
    window holds, not the next hundred, nor the frames of other devices
    skipped on the way.
    """
    from _redis import connected_link

    link = await connected_link(redis_server.url)
    try:
        counting = _Counting(link)
        store = RedisOfflineStore(counting, prefix="t3")
        frame = 600_000
        for n in range(20):
            await store.store("bob", None, [bytes([n]) * frame], "alice")
            await store.store("bob", 3, [b"x" * frame], "carol")  # for another device
        counting.received = 0
        after, delivered = 0, []
        while True:
            window = await store.fetch("bob", [None, 5], after, 100, 1 << 20)
            if not window:
                break
            assert len(window) == 1  # two do not fit in 1 MiB
            delivered.extend(m.raw[0] for m in window)
            after = window[-1].id
        assert delivered == list(range(20))
        # The 20 frames delivered, and at most one more of each window (the
        # one that did not fit), not 20 + 19 + ... + 1 of them.
        assert counting.received <= 2 * 21 * frame
    finally:
        await link.stop()
