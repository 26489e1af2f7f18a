"""
The support desk (support_desk.py) end to end, with pytest: a real
C{twistd esf} loads the desk with C{--handler} and keeps messages to
offline users in SQLite; clients talk to it over TCP.

    PYTHONPATH=docs/examples python -m pytest -p no:cacheprovider docs/examples/test_support_desk_twistd.py

As in test_support_desk_pytest.py, the C{pytest_plugins} line and the
fixture belong in a project's C{conftest.py}.
"""

import re
from pathlib import Path

import pytest
import pytest_twisted
from support_desk import ASK, CHAT
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint

from esf import ClientEngine, LogonFailed

pytest_plugins = ["esf.pytest_plugin"]

EXAMPLES = Path(__file__).resolve().parent


@pytest.fixture
def desk_server(esf_twistd):
    # Port 0 on 127.0.0.1; the relative offline.db is made in the server's
    # own directory under tmp_path.
    return esf_twistd(
        "--handler", "support_desk:desk", "--offline", "sqlite:offline.db",
        python_path=[EXAMPLES],
    )  # fmt: skip


def client(server, user_id, password):
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
    return ClientEngine(endpoint, user_id, password, clock=reactor)


@pytest_twisted.ensureDeferred
async def test_a_question_opens_a_ticket(desk_server):
    alice = client(desk_server, "alice", "pa")
    await alice.logon()
    assert await alice.query("_0", ASK, b"my printer is on fire") == b"ticket 1"
    await alice.logoff()


@pytest_twisted.ensureDeferred
async def test_banned_user_is_refused_with_a_cause(desk_server):
    with pytest.raises(LogonFailed) as refused:
        await client(desk_server, "mallory", "anything").logon()
    assert refused.value.cause == "mallory is banned"


@pytest_twisted.ensureDeferred
async def test_a_chat_waits_for_its_receiver(desk_server):
    alice = client(desk_server, "alice", "pa")
    await alice.logon()
    await alice.send_certainly("bob", CHAT, b"call me")  # bob is offline: kept
    await alice.logoff()
    bob = client(desk_server, "bob", "pb")
    received = Deferred()
    bob.information_received.subscribe(lambda *message: received.callback(message))
    await bob.logon()
    sender, _, kind, payload = await received
    assert (sender, kind, payload) == ("alice", CHAT, b"call me")
    await bob.logoff()


@pytest_twisted.ensureDeferred
async def test_logoff_is_logged_before_the_server_stops(desk_server):
    alice = client(desk_server, "alice", "pa")
    await alice.logon()
    await alice.logoff()  # fires once the server has ended the session
    await desk_server.stop_deferred()  # SIGTERM; its re-raised exit is clean
    assert re.search(r"session ended: alice/\d+ .*LOGGED_OFF", desk_server.log())
