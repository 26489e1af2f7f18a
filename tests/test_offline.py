"""
Offline messages in the engine and the client: kept while the addressee is
offline, delivered at its next logon before anything live, forgotten once
acknowledged.  A real engine and real clients on a Clock (esf.testing), the
in-memory store (with a delay where the test needs a store that takes time).
"""

from __future__ import annotations

import struct

import pytest
from twisted.internet.defer import Deferred
from zope.interface import implementer

from esf import STORED, ClientType, ErrorCode, MessageType, RequestError, ServerConfig
from esf.interfaces import IOfflinePolicy
from esf.offline import MemoryOfflineStore, OfflineBounds
from esf.testing import MemoryServer
from esf.wire._frames import encode_frame


def frames_to(server, client, message_types=(202, 205, 207)):
    """The application frames the server wrote to C{client}'s connections."""
    wire = server.config.wire
    out = []
    for connection in client.endpoint.connections:
        out += [f for f in connection.frames(wire, to="client") if f.message_type in message_types]
    return out


def receiver(server, user_id, client_type=ClientType.OTHERS, handler=None, logon=True):
    client = server.client(user_id, client_type=client_type, handler=handler)
    got = []
    client.information_received.subscribe(lambda *args: got.append(args))
    if logon:
        server.result(client.logon())
    return client, got


def never_acknowledging(server, user_id):
    """
    C{user_id}'s client, logged on, that never acknowledges stored messages
    (a client built on the contract alone, say), and the information types
    it handles, in order.
    """
    client = server.client(user_id)
    client._inbox.stored.acknowledge = lambda *args: None  # never acknowledges
    got = []
    client.information_received.subscribe(lambda *a: got.append(a[2]))
    server.result(client.logon())
    return client, got


def bounded(**bounds: int) -> MemoryOfflineStore:
    """A store in memory with these bounds (the rest the defaults)."""
    return MemoryOfflineStore(bounds=OfflineBounds(**bounds))


@pytest.fixture
def store():
    return bounded(max_messages=5, max_bytes=4096)


@pytest.fixture
def server(store):
    s = MemoryServer(offline_store=store)
    yield s
    s.close()


def test_kept_and_delivered_in_order_as_sent(server, store):
    alice = server.logged_on("alice", client_type=ClientType.ANDROID)
    alice.send("bob", 1, b"one")
    assert server.result(alice.send_certainly("bob", 2, b"two")) == STORED
    alice.send("bob", 3, b"three")
    server.pump()
    assert server.result(store.counts("bob")) == (
        3,
        sum(len(f.raw) for f in frames_sent(server, alice)),
    )
    sent = frames_sent(server, alice)

    bob, got = receiver(server, "bob")
    server.pump()
    assert got == [
        ("alice", ClientType.ANDROID, 1, b"one"),
        ("alice", ClientType.ANDROID, 2, b"two"),
        ("alice", ClientType.ANDROID, 3, b"three"),
    ]
    delivered = frames_to(server, bob)
    # Each as the frame that was sent: type, sender, device kind, body; the
    # MessageID is the stored ID and DestUserID is _0.
    assert [(f.message_type, f.user_id, f.client_type, f.body) for f in delivered] == [
        (f.message_type, f.user_id, f.client_type, f.body) for f in sent
    ]
    assert [f.message_id for f in delivered] == [1, 2, 3]
    assert {f.dest_user_id for f in delivered} == {"_0"}
    # Acknowledged, hence forgotten.
    assert server.result(store.counts("bob")) == (0, 0)
    counters = server.engine.counters
    assert counters["offline_stored"] == 3 and counters["offline_delivered"] == 3


def frames_sent(server, client, message_types=(202, 205, 207)):
    wire = server.config.wire
    out = []
    for connection in client.endpoint.connections:
        out += [f for f in connection.frames(wire, to="server") if f.message_type in message_types]
    return out


def test_the_sender_learns_stored_apart_from_delivered_and_refused(server, store):
    alice = server.logged_on("alice")
    assert server.result(alice.send_certainly("bob", 1, b"x")) == STORED
    ack = [f for f in server.connection(alice).frames(to="client") if f.message_type == 206][-1]
    assert ack.user_id == "_0" and struct.unpack("<i", ack.body) == (1,)
    bob, _got = receiver(server, "bob")
    # Online: the receiver's own Ack, fired with None.
    assert server.result(alice.send_certainly("bob", 2, b"y")) is None
    bob.close()
    server.pump()
    # Refused (the store is full): an Error, not an Ack.
    for _n in range(5):
        alice.send("bob", 3, b"z")
    server.pump()
    error = server.failure(alice.send_certainly("bob", 4, b"w"), RequestError)
    assert error.code == ErrorCode.USER_OFFLINE
    assert "no room for more" in error.text and "at most 5" in error.text


def test_overflow_refuses_new_messages_and_counts_them(server, store):
    alice = server.logged_on("alice")
    for n in range(5):
        alice.send("bob", n, b"m")
    alice.send("bob", 99, b"one-way, refused")  # MessageID 0: counted, no answer
    errors = [alice.send_certainly("bob", 100, b"refused") for _ in range(2)]
    server.pump()
    for d in errors:
        assert server.failure(d, RequestError).code == ErrorCode.USER_OFFLINE
    counters = server.engine.counters
    assert counters["offline_full"] == 3
    assert counters["offline_stored"] == 5
    assert counters["dropped"] == 1
    # The kept ones are the first five, untouched by the overflow.
    _bob, got = receiver(server, "bob")
    server.pump()
    assert [g[2] for g in got] == [0, 1, 2, 3, 4]


def test_overflow_by_bytes(store):
    s = MemoryServer(offline_store=bounded(max_messages=100, max_bytes=2048))
    alice = s.logged_on("alice")
    assert s.result(alice.send_certainly("bob", 1, b"a" * 1000)) == STORED
    error = s.failure(alice.send_certainly("bob", 1, b"b" * 1000), RequestError)
    assert error.code == ErrorCode.USER_OFFLINE and "2048 bytes" in error.text
    assert s.engine.counters["offline_full"] == 1
    s.close()


def test_without_a_store_a_request_gets_user_offline():
    s = MemoryServer()
    alice = s.logged_on("alice")
    error = s.failure(alice.send_certainly("bob", 1, b"x"), RequestError)
    assert error.code == ErrorCode.USER_OFFLINE
    s.close()


def test_live_messages_during_the_drain_come_after_the_stored_ones():
    clock_store = bounded(max_messages=1000, max_bytes=1 << 20)
    s = MemoryServer(offline_store=clock_store)
    clock_store.clock, clock_store.delay = s.clock, 1.0  # every store call takes 1 s
    alice = s.logged_on("alice")
    for n in range(250):  # three windows of 100
        alice.send("bob", n, b"stored")
    s.advance(1.0)
    assert clock_store._sizes["bob"] > 0
    bob, got = receiver(server=s, user_id="bob", logon=False)
    d = bob.logon()
    s.pump()
    assert s.result(d).succeeded
    # The drain is under way (its reads take a second each): live messages
    # sent now are held until it is done.
    for n in range(250, 260):
        alice.send("bob", n, b"live")
        s.advance(0.5)
    assert len(got) < 260
    s.advance(10)
    assert [g[2] for g in got] == list(range(260))
    assert [g[3] for g in got] == [b"stored"] * 250 + [b"live"] * 10
    clock_store.delay = 0
    assert s.result(clock_store.counts("bob")) == (0, 0)
    assert s.engine.offline.deliveries == 0
    s.close()


def test_connection_lost_between_delivery_and_ack_redelivers_and_client_drops_duplicates(
    server, store
):
    alice = server.logged_on("alice")
    for n in range(3):
        alice.send("bob", n, b"m")
    server.pump()
    handled = []
    waits: list[Deferred] = []

    @implementer_customize
    class Slow:
        def handle_information(self, user_id, client_type, information_type, payload):
            handled.append(information_type)
            d = Deferred()
            waits.append(d)
            return d  # acknowledged only once this fires

        def handle_query(self, *args):
            return b""

    bob, _got = receiver(server, "bob", handler=Slow())
    server.pump()
    assert handled == [0, 1, 2]
    # The connection goes before any acknowledgement.
    server.connection(bob).cut()
    for d in waits:
        d.callback(None)
    server.pump()
    assert server.result(store.counts("bob"))[0] == 3  # nothing was forgotten
    # The client reconnects by itself; the three come again and are dropped
    # as duplicates (acknowledged, not handled again).
    server.advance(5)
    assert bob.logged_on
    assert handled == [0, 1, 2]
    assert bob.counters["offline_duplicates"] == 3
    assert server.result(store.counts("bob")) == (0, 0)
    assert len(frames_to(server, bob)) == 6  # each delivered twice


def test_a_new_client_process_gets_unacknowledged_messages_again(server, store):
    alice = server.logged_on("alice")
    alice.send("bob", 7, b"m")
    server.pump()
    # A device that never acknowledges: the delivery stops after the ack
    # timeout, live messages then go out, and the stored one stays for the
    # next logon.
    bob_raw, got = never_acknowledging(server, "bob")
    alice.send("bob", 8, b"live")
    server.pump()
    assert got == [7]  # the live one is held while the drain waits
    server.advance(server.config.offline_ack_timeout + 1)
    assert got == [7, 8]
    assert server.engine.counters["offline_drains_stalled"] == 1
    assert server.result(store.counts("bob"))[0] == 1
    bob_raw.close()
    server.pump()
    # Another process (no memory of what it handled) gets it again.
    _bob, got2 = receiver(server, "bob")
    server.pump()
    assert [g[2] for g in got2] == [7]
    assert server.result(store.counts("bob")) == (0, 0)


def test_what_is_stored_during_a_delivery_joins_its_window_and_the_ack_timeout_runs_on(
    server, store
):
    # In a cluster, a node that had not seen bob log on elsewhere may store
    # for him while his delivery waits for his acknowledgement; his node is
    # told (look_again): the window has room, so it goes out at once.  A
    # device that never acknowledges is still stopped within the ack
    # timeout of its first wait, however much is stored meanwhile.
    alice = server.logged_on("alice")
    alice.send("bob", 1, b"before")
    server.pump()
    _bob, got = never_acknowledging(server, "bob")
    server.pump()
    assert got == [1]
    (session,) = [s for s in server.engine.sessions if s.user_id == "bob"]
    timeout = server.config.offline_ack_timeout
    for n in (2, 3):
        server.advance(timeout / 3)
        body = struct.pack("<i", n) + b"stored meanwhile"
        frame = encode_frame(server.config.wire, 202, body, user_id="alice", dest_user_id="bob")
        server.result(store.store("bob", None, [frame], "alice"))
        server.engine.offline.look_again(session)
        server.pump()
        assert got[-1] == n
    alice.send("bob", 9, b"live")
    server.pump()
    assert got == [1, 2, 3]  # the live one is held while the drain waits
    server.advance(timeout / 3 + 0.1)
    assert got == [1, 2, 3, 9]
    assert server.engine.counters["offline_drains_stalled"] == 1
    # Looked at again with nothing new: nothing is delivered twice.
    server.engine.offline.look_again(session)
    server.pump()
    assert got == [1, 2, 3, 9]


def test_an_ack_timeout_that_passes_during_a_fetch_made_after_look_again_ends_the_delivery():
    # A store that takes a second: bob's delivery is woken (look_again)
    # half a second before his ack timeout, and its fetch is still under
    # way when the timeout passes.  It stops once the fetch is back, not an
    # ack timeout later.
    store = bounded(max_messages=100, max_bytes=1 << 20)
    s = MemoryServer(offline_store=store)
    alice = s.logged_on("alice")
    alice.send("bob", 1, b"before")
    s.pump()
    store.clock, store.delay = s.clock, 1.0
    _bob, got = never_acknowledging(s, "bob")
    s.advance(1.0)  # the first fetch
    assert got == [1]
    (session,) = [x for x in s.engine.sessions if x.user_id == "bob"]
    timeout = s.config.offline_ack_timeout
    s.advance(timeout - 0.5)
    s.engine.offline.look_again(session)
    s.advance(1.0)  # the timeout passes during the fetch; the fetch is back
    assert s.engine.counters["offline_drains_stalled"] == 1
    s.close()


def test_a_blob_is_kept_whole_and_delivered_whole():
    s = MemoryServer(offline_store=bounded(max_messages=100, max_bytes=1 << 20))
    alice = s.logged_on("alice")
    payload = bytes(range(256)) * 40
    assert s.result(alice.send_blob("bob", 11, payload, fragment_size=1000)) == STORED
    assert s.engine.counters["offline_stored"] == 11
    _bob, got = receiver(s, "bob")
    s.pump()
    assert got == [("alice", ClientType.OTHERS, 11, payload)]
    assert s.result(s.offline_store.counts("bob")) == (0, 0)
    s.close()


def test_a_blob_too_large_for_the_store_is_refused_whole():
    store = bounded(max_messages=100, max_bytes=3000)
    s = MemoryServer(offline_store=store)
    alice = s.logged_on("alice")
    error = s.failure(alice.send_blob("bob", 11, b"x" * 5000, fragment_size=1000), RequestError)
    # The fragment that passed the bound dropped the blob (it had no
    # MessageID: nobody to tell); the last one finds no blob to add to.
    assert error.code == ErrorCode.USER_OFFLINE
    assert s.engine.counters["offline_full"] == 1
    assert s.result(store.counts("bob")) == (0, 0)
    assert s.engine.budget.used == 0
    s.close()


def test_a_blob_begun_offline_stays_in_the_store_when_the_user_comes_online():
    store = bounded(max_messages=100, max_bytes=1 << 20)
    s = MemoryServer(offline_store=store)
    alice = s.logged_on("alice")
    wire = s.config.wire
    conn = s.connection(alice)

    def fragment(index, last, message_id=0):
        body = struct.pack("<iIIB", 5, 9, index, last) + bytes([index]) * 10
        return encode_frame(
            wire,
            MessageType.BLOB,
            body,
            message_id=message_id,
            client_type=ClientType.OTHERS,
            user_id="alice",
            dest_user_id="bob",
        )

    alice._protocol.write(fragment(0, 0))
    s.pump()
    bob, got = receiver(s, "bob")
    s.pump()
    assert got == []
    alice._protocol.write(fragment(1, 1, message_id=3))
    s.pump()
    # Kept with its first fragment (the Ack comes from the server) ...
    ack = [f for f in conn.frames(wire, to="client") if f.message_type == MessageType.ACK][-1]
    assert ack.user_id == "_0" and ack.message_id == 3
    # ... and delivered whole at bob's next logon.
    bob.close()
    s.pump()
    _bob2, got2 = receiver(s, "bob")
    s.pump()
    assert got2 == [("alice", ClientType.OTHERS, 5, b"\x00" * 10 + b"\x01" * 10)]
    s.close()


def test_a_message_to_one_device_waits_for_that_device(server, store):
    alice = server.logged_on("alice")
    _desktop, got_desktop = receiver(server, "bob", ClientType.DOTNET)
    assert (
        server.result(alice.send_certainly("bob", 1, b"phone", client_type=ClientType.ANDROID))
        == STORED
    )
    alice.send("bob", 2, b"both")  # online (desktop): relayed at once
    server.pump()
    assert [g[2] for g in got_desktop] == [2]
    _phone, got_phone = receiver(server, "bob", ClientType.ANDROID)
    server.pump()
    assert [g[2:] for g in got_phone] == [(1, b"phone")]
    assert [g[2] for g in got_desktop] == [2]


def test_messages_to_the_user_go_to_the_first_device_that_logs_on(server, store):
    alice = server.logged_on("alice")
    alice.send("bob", 1, b"for bob")
    server.pump()
    _desktop, got_desktop = receiver(server, "bob", ClientType.DOTNET)
    _phone, got_phone = receiver(server, "bob", ClientType.ANDROID)
    server.pump()
    assert [g[2] for g in got_desktop] == [1]
    assert got_phone == []


@implementer(IOfflinePolicy)
class OnlyChat:
    def keep_offline(self, sender_id, dest_user_id, message_type, information_type):
        return information_type == 1 and sender_id != "spammer"


def test_the_policy_decides_what_is_kept(store):
    s = MemoryServer(OnlyChat(), offline_store=store)
    alice = s.logged_on("alice")
    spammer = s.logged_on("spammer")
    assert s.result(alice.send_certainly("bob", 1, b"chat")) == STORED
    error = s.failure(alice.send_certainly("bob", 2, b"typing"), RequestError)
    assert error.code == ErrorCode.USER_OFFLINE
    s.failure(spammer.send_certainly("bob", 1, b"buy"), RequestError)
    assert s.engine.counters["offline_not_kept"] == 2
    _bob, got = receiver(s, "bob")
    s.pump()
    assert [g[3] for g in got] == [b"chat"]
    s.close()


def test_requests_are_never_kept(server):
    alice = server.logged_on("alice")
    error = server.failure(alice.query("bob", 1, b"?"), RequestError)
    assert error.code == ErrorCode.USER_OFFLINE


def test_an_ack_to_the_server_for_nothing_delivered_is_ignored(server, store):
    alice = server.logged_on("alice")
    alice.write_message(MessageType.ACK, struct.pack("<i", 0), message_id=5)
    alice.send("bob", 1, b"x")
    server.pump()
    assert server.result(store.counts("bob"))[0] == 1
    assert alice.logged_on


def test_a_broken_store_answers_the_sender(server, store):
    def broken(*args):
        raise OSError("disk on fire")

    store.store = broken
    alice = server.logged_on("alice")
    error = server.failure(alice.send_certainly("bob", 1, b"x"), RequestError)
    assert error.code == ErrorCode.USER_OFFLINE and "cannot keep" in error.text
    assert server.engine.counters["offline_errors"] == 1


def test_held_live_frames_are_bounded():
    store = bounded(max_messages=10, max_bytes=1 << 20)
    config = ServerConfig(max_output_buffer=4096)
    s = MemoryServer(config=config, offline_store=store)
    store.clock, store.delay = s.clock, 5.0
    alice = s.logged_on("alice")
    alice.send("bob", 0, b"stored")
    s.advance(5)
    bob, got = receiver(s, "bob", logon=False)
    s.result(bob.logon())
    for _n in range(100):
        alice.send("bob", 1, b"x" * 500)  # 100 * 540 bytes > 4 * 4096
    s.pump()
    session = next(x for x in s.engine.sessions if x.user_id == "bob")
    assert session._held_bytes <= 4 * 4096
    assert s.engine.counters["output_dropped"] > 0
    assert s.engine.counters["senders_paused"] >= 1
    s.advance(20)
    assert got[0][3] == b"stored"
    assert s.engine.budget.used == 0
    s.close()


def implementer_customize(cls):
    from esf.interfaces import ICustomizeHandler

    return implementer(ICustomizeHandler)(cls)


# -- bounds per sender and for the whole store ------------------------------------


def test_one_sender_filling_many_receivers_stops_at_its_bound_and_others_still_store():
    """
    An attacker with one account sends to ever more offline users: it
    stops at its per-sender bound (counted, told why, logged within its
    session's limit); another sender still stores; once a receiver
    acknowledges, the attacker may store that much again.
    """
    from esf.testing import LogCapture

    store = bounded(max_messages=100, max_bytes=1 << 20, max_sender_messages=20)
    s = MemoryServer(offline_store=store)
    mallory = s.logged_on("mallory")
    with LogCapture() as logs:
        outcomes = [mallory.send_certainly(f"u{n}", 1, b"spam") for n in range(200)]
        s.pump()
    refused = []
    kept = 0
    for d in outcomes:
        outcome = []
        d.addBoth(outcome.append)
        if outcome[0] == STORED:
            kept += 1
        else:
            error = outcome[0].value
            assert isinstance(error, RequestError) and error.code == ErrorCode.USER_OFFLINE
            refused.append(error.text)
    assert kept == 20 and len(refused) == 180
    assert "you cannot leave more for users who are offline" in refused[0]
    assert "at most 20" in refused[0]
    counters = s.engine.counters
    assert counters["offline_sender_full"] == 180
    assert counters["offline_full"] == 0 and counters["offline_server_full"] == 0
    assert s.result(store.sender_counts("mallory"))[0] == 20
    # Logged, but not once per refusal: the session's log limit holds.
    events = logs.esf_events("offline_sender_full")
    assert 1 <= len(events) <= 10
    # Another sender is not held back by mallory's bound.
    alice = s.logged_on("alice")
    assert s.result(alice.send_certainly("u0", 1, b"hello")) == STORED
    # u0 logs on and acknowledges: mallory's count goes down, and it may
    # store one more (and no more than that).
    _u0, got = receiver(s, "u0")
    s.pump()
    assert [g[0] for g in got] == ["mallory", "alice"]
    assert s.result(store.sender_counts("mallory"))[0] == 19
    assert s.result(mallory.send_certainly("u300", 1, b"again")) == STORED
    assert s.failure(mallory.send_certainly("u301", 1, b"no"), RequestError).code == (
        ErrorCode.USER_OFFLINE
    )
    s.close()


def test_the_sender_bound_counts_bytes_too():
    store = bounded(max_messages=100, max_bytes=1 << 20, max_sender_bytes=2048)
    s = MemoryServer(offline_store=store)
    mallory = s.logged_on("mallory")
    assert s.result(mallory.send_certainly("u1", 1, b"x" * 1000)) == STORED
    error = s.failure(mallory.send_certainly("u2", 1, b"y" * 1000), RequestError)
    assert error.code == ErrorCode.USER_OFFLINE and "2048 bytes" in error.text
    assert s.engine.counters["offline_sender_full"] == 1
    s.close()


def test_a_blob_larger_than_the_sender_bound_is_refused_at_once():
    store = bounded(max_messages=100, max_bytes=1 << 20, max_sender_bytes=4096)
    s = MemoryServer(offline_store=store)
    mallory = s.logged_on("mallory")
    error = s.failure(mallory.send_blob("u1", 7, b"z" * 20000, fragment_size=1000), RequestError)
    # The fragment that passed the bound dropped the blob (it had no
    # MessageID: nobody to tell); the last one finds no blob to add to.
    assert error.code == ErrorCode.USER_OFFLINE
    assert s.engine.counters["offline_sender_full"] == 1
    assert s.engine.counters["offline_full"] == 0
    # Nothing of it is kept, nor held in memory.
    assert s.result(store.total_counts()) == (0, 0)
    assert s.engine.budget.used == 0
    s.close()


def test_the_whole_store_refuses_when_full_and_accepts_again_once_acknowledged():
    from esf.testing import LogCapture

    store = bounded(max_messages=100, max_bytes=1 << 20, max_total_messages=30)
    s = MemoryServer(offline_store=store)
    senders = [s.logged_on(f"s{n}") for n in range(3)]
    for sender in senders:
        for n in range(10):
            assert s.result(sender.send_certainly(f"r{n}", 1, b"m")) == STORED
    assert s.result(store.total_counts())[0] == 30
    with LogCapture() as logs:
        errors = [senders[0].send_certainly("late", 1, b"x") for _ in range(15)]
        s.pump()
    for d in errors:
        error = s.failure(d, RequestError)
        assert error.code == ErrorCode.USER_OFFLINE
        assert "the server's offline store is full" in error.text
    counters = s.engine.counters
    assert counters["offline_server_full"] == 15 and counters["offline_sender_full"] == 0
    events = logs.esf_events("offline_server_full")
    assert 1 <= len(events) <= 10  # one session: its log limit
    # r0 logs on and acknowledges its three: room for three more.
    _r0, got = receiver(s, "r0")
    s.pump()
    assert len(got) == 3
    assert s.result(store.total_counts())[0] == 27
    for _ in range(3):
        assert s.result(senders[1].send_certainly("late", 1, b"x")) == STORED
    assert s.failure(senders[1].send_certainly("late", 1, b"x"), RequestError).code == (
        ErrorCode.USER_OFFLINE
    )
    s.close()


def test_the_whole_store_bound_counts_bytes_too():
    store = bounded(max_messages=100, max_bytes=1 << 20, max_total_bytes=2000)
    s = MemoryServer(offline_store=store)
    a, b = s.logged_on("a"), s.logged_on("b")
    assert s.result(a.send_certainly("r1", 1, b"x" * 900)) == STORED
    assert s.result(b.send_certainly("r2", 1, b"x" * 900)) == STORED
    error = s.failure(a.send_certainly("r3", 1, b"x" * 900), RequestError)
    assert "the server's offline store is full" in error.text
    assert s.engine.counters["offline_server_full"] == 1
    s.close()


def _blob_fragment(wire, index, last, dest="bob", size=10, message_id=0):
    body = struct.pack("<iIIB", 5, 9, index, last) + bytes([index]) * size
    return encode_frame(wire, MessageType.BLOB, body, message_id=message_id,
                        client_type=ClientType.OTHERS, user_id="alice", dest_user_id=dest)  # fmt: skip


def test_an_unfinished_blob_to_an_offline_user_is_dropped_once_idle():
    """
    A blob begun for a user who is offline and never finished is held no
    longer than blob_idle_timeout, as a blob to the server is: its bytes
    leave the memory budget and the sender's blobs in progress.
    """
    s = MemoryServer(
        offline_store=bounded(max_messages=100, max_bytes=1 << 20),
        config=ServerConfig(blob_idle_timeout=30),
    )
    alice = s.logged_on("alice")
    alice._protocol.write(_blob_fragment(s.config.wire, 0, 0, size=1000))
    s.pump()
    assert s.engine.budget.blob_bytes("alice") > 1000
    assert s.engine.budget.used >= s.engine.budget.blob_bytes("alice")
    s.advance(20)
    assert s.engine.budget.blob_bytes("alice") > 1000  # not idle long enough yet
    s.advance(20)
    assert s.engine.budget.blob_bytes("alice") == 0
    assert s.engine.budget.used == 0
    assert s.engine.counters["blob_errors"] == 1
    s.close()


@pytest.mark.parametrize(
    "bound, counter",
    [("max_sender_messages", "offline_sender_full"), ("max_messages", "offline_full")],
)
def test_a_blob_of_more_fragments_than_may_be_kept_is_dropped_at_the_one_past_it(bound, counter):
    """
    Each fragment of a blob is a message in the store: a blob of more
    fragments than its sender may keep (or its receiver may be kept) is
    dropped at the fragment that passes the bound, not gathered whole to be
    refused at its last one; its last fragment's sender hears why.
    """
    store = bounded(
        **{"max_messages": 100, "max_bytes": 1 << 20, "max_sender_messages": 100, bound: 5}
    )
    s = MemoryServer(offline_store=store)
    alice = s.logged_on("alice")
    wire = s.config.wire
    conn = s.connection(alice)
    for index in range(5):
        alice._protocol.write(_blob_fragment(wire, index, 0, size=1000))
    s.pump()
    assert s.engine.budget.blob_bytes("alice") > 5000  # five fragments: within the bound
    alice._protocol.write(_blob_fragment(wire, 5, 0, size=1000))
    s.pump()
    assert s.engine.budget.blob_bytes("alice") == 0 and s.engine.budget.used == 0
    assert s.engine.counters[counter] == 1
    alice._protocol.write(_blob_fragment(wire, 6, 1, size=10, message_id=4))
    s.pump()
    [error] = [f for f in conn.frames(wire, to="client") if f.message_type == MessageType.ERROR]
    assert error.message_id == 4
    assert s.result(store.total_counts()) == (0, 0)
    s.close()


def test_blobs_to_offline_users_count_among_the_senders_blobs_in_progress():
    """
    Blobs gathered for offline users count against max_blob_bytes_per_user
    with every other blob the user has in progress: one account on many
    devices cannot hold more than that bound.
    """
    s = MemoryServer(
        offline_store=bounded(max_messages=100, max_bytes=1 << 20),
        config=ServerConfig(max_blob_bytes_per_user=5000),
    )
    alice = s.logged_on("alice")
    wire = s.config.wire
    conn = s.connection(alice)
    for _n, dest in enumerate(("bob", "carol", "dave")):
        alice._protocol.write(_blob_fragment(wire, 0, 0, dest=dest, size=2000))
        s.pump()
    assert s.engine.budget.blob_bytes("alice") <= 5000
    alice._protocol.write(_blob_fragment(wire, 1, 1, dest="dave", size=10, message_id=4))
    s.pump()
    [error] = [f for f in conn.frames(wire, to="client") if f.message_type == MessageType.ERROR]
    assert error.message_id == 4  # the third blob was dropped, and its last fragment says so
    assert s.engine.counters["blob_errors"] == 1
    s.close()


def test_a_device_kind_the_server_does_not_know_is_not_kept_for():
    """
    A message to a device kind no device can log on with (a huge number,
    say) is not kept: it would wait for ever and take up the bounds.
    """
    store = bounded(max_messages=100, max_bytes=1 << 20)
    s = MemoryServer(offline_store=store)
    alice = s.logged_on("alice")
    error = s.failure(alice.send_certainly("b#999999999", 1, b"x"), RequestError)
    assert error.code == ErrorCode.USER_OFFLINE
    assert s.result(store.total_counts()) == (0, 0)
    assert s.engine.counters["offline_stored"] == 0
    s.close()


class _Counting(MemoryOfflineStore):
    """A store in memory that says how many bytes it was handed and has not answered."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.in_flight = self.most_in_flight = 0

    def store(self, user_id, client_type, frames, sender_id):
        size = sum(len(f) for f in frames)
        self.in_flight += size
        self.most_in_flight = max(self.most_in_flight, self.in_flight)

        def answered(result):
            self.in_flight -= size
            return result

        return super().store(user_id, client_type, frames, sender_id).addBoth(answered)


def test_what_a_sender_has_waiting_for_a_slow_store_is_bounded():
    """
    A store that takes its time (a disk under load, a far Redis) holds each
    message until it answers.  One sender flooding users who are offline is
    read no further while more than max_output_buffer of its messages wait
    for the store, and counts them in the memory budget: it cannot make the
    server hold more than that, and every message is still answered.
    """
    store = _Counting()
    config = ServerConfig(max_output_buffer=256 * 1024)
    s = MemoryServer(config=config, offline_store=store)
    store.clock, store.delay = s.clock, 1.0  # every store call takes 1 s
    alice = s.logged_on("alice")
    answers = []
    for n in range(200):  # 200 x 100 KB: more than the sender may keep (16 MiB)
        alice.send_certainly(f"bob{n}", 1, b"x" * 100_000).addBoth(answers.append)
        s.pump()
    assert store.most_in_flight <= 2 * config.max_output_buffer
    assert s.engine.budget.used >= store.in_flight
    assert s.engine.counters["senders_paused"] >= 1
    s.advance(300)
    assert len(answers) == 200  # stored (Ack), or refused (Error): none lost
    assert answers.count(STORED) == 167  # 16 MiB of them
    assert store.in_flight == 0 and s.engine.budget.used == 0
    s.close()
