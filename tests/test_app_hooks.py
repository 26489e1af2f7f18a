"""
What an application's own tests need from esf, in memory and against a
real C{twistd esf}: an offline store that the engine opens itself, the
engine's clock, the pytest fixtures that pass them, a client whose
C{logoff()} fires once the server has the Logoff, and L{esf.testing}'s
real-process helper with C{--port-file}.
"""

from __future__ import annotations

import textwrap

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from zope.interface import implementer

from esf import (
    ClientEngine,
    DisconnectedType,
    ServerConfig,
    ServerEngine,
    ServerFactory,
    ServerService,
    engine_for,
)
from esf.interfaces import ICustomizeHandler
from esf.offline import MemoryOfflineStore, SQLiteOfflineStore
from esf.testing import LogCapture, MemoryServer, record_events

pytest_plugins = ["pytester"]


# -- the offline store: the engine opens and closes it -------------------------------------------


def test_the_first_connection_opens_the_store_and_stop_closes_it():
    store = MemoryOfflineStore()
    server = MemoryServer(offline_store=store)
    assert not store.started
    alice = server.logged_on("alice")
    assert store.started
    server.result(alice.send_certainly("bob", 1, b"kept"))
    assert server.result(store.counts("bob"))[0] == 1
    server.close()
    assert not store.started


def test_an_engine_built_by_hand_opens_its_store_as_it_starts():
    store = MemoryOfflineStore()
    engine = ServerEngine(clock=task.Clock(), offline_store=store)
    engine.start()
    assert store.started
    engine.start()  # once
    d = engine.stop()
    assert d.called and not store.started


def test_a_store_that_cannot_be_opened_stops_the_start(tmp_path):
    (tmp_path / "bad.db").write_bytes(b"not a database at all" * 100)
    engine = engine_for(clock=task.Clock(), offline_store=SQLiteOfflineStore(str(tmp_path / "bad.db")))
    from esf.offline import OfflineStoreError

    with pytest.raises(OfflineStoreError, match="bad.db"):
        engine.start()


@pytest_twisted.ensureDeferred
async def test_engine_for_with_a_sqlite_store_keeps_messages_as_embedded(tmp_path):
    """
    docs/server.md's embedding, with an offline store: nothing but
    C{engine_for(..., offline_store=store)} and a L{ServerService}; a
    message to an offline user is stored, and the store is closed when the
    service stops.
    """
    from twisted.internet import reactor

    store = SQLiteOfflineStore(str(tmp_path / "offline.db"))
    engine = engine_for(clock=reactor, offline_store=store)
    service = ServerService(engine, TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
    service.startService()
    try:
        port = service.port.getHost().port
        alice = ClientEngine(TCP4ClientEndpoint(reactor, "127.0.0.1", port), "alice", clock=reactor)
        await alice.logon()
        await alice.send_certainly("bob", 1, b"while you were out")  # Ack: stored
        assert await store.counts("bob") == (1, len(b"while you were out") + 36 + 4)
        await alice.close()
    finally:
        await service.stopService()
    assert store.pool is None


# -- the engine's clock -----------------------------------------------------------------------------


@implementer(ICustomizeHandler)
class SlowAnswers:
    """
    Answers each query a second later, on the engine's clock (set by
    L{IEngineAware.initialize}).
    """

    def __init__(self):
        self.engine = None

    def handle_information(self, user_id, client_type, information_type, payload):
        pass

    def handle_query(self, user_id, client_type, information_type, payload):
        return task.deferLater(self.engine.clock, 1.0, lambda: payload.upper())


def test_engine_clock_is_the_memory_servers_clock():
    handler = SlowAnswers()
    server = MemoryServer(handler)
    handler.engine = server.engine
    assert server.engine.clock is server.clock
    alice = server.logged_on("alice")
    d = alice.query("_0", 1, b"later")
    server.pump()
    assert not d.called
    server.advance(1)
    assert server.result(d) == b"LATER"
    server.close()
