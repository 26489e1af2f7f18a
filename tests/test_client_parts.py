"""
The client's parts on their own: the L{Inbox} with a small host of its own
in place of the engine (it needs only what L{InboxHost} lists), and the
signatures that the server engine, the client engine and the blocking
client share.
"""

from __future__ import annotations

import collections
import inspect

from twisted.internet.task import Clock

from esf import ClientEngine, ServerEngine
from esf.client._inbox import ClientBlobs, Inbox, InboxHost
from esf.client._requests import ClientRequests
from esf.client.blocking import BlockingClient
from esf.wire import _messages as m
from esf.wire._decoder import FrameDecoder
from esf.wire._events import Event
from esf.wire._frames import (
    SERVER_ID,
    ClientType,
    DisconnectedType,
    MessageType,
    WireConfig,
    encode_frame,
)
from esf.wire._pending import PendingRequests

WIRE = WireConfig()


def frame(
    message_type, body=b"", *, sender="bob", kind=ClientType.ANDROID, message_id=0, dest="alice"
):
    data = encode_frame(
        WIRE,
        message_type,
        body,
        client_type=kind,
        message_id=message_id,
        user_id=sender,
        dest_user_id=dest,
    )
    (decoded,) = FrameDecoder(WIRE).feed(data)
    return decoded


class Connection:
    def __init__(self):
        self.ending = None
        self.written: list[bytes] = []
        self.paused = False
        self.broken = None
        self.answers_while_busy = 0

    def write(self, data):
        self.written.append(data)


class Handler:
    def __init__(self):
        self.information = []

    def handle_information(self, user_id, client_type, information_type, payload):
        self.information.append((user_id, client_type, information_type, payload))

    def handle_query(self, user_id, client_type, information_type, payload):
        return payload.upper()


class Host(ClientRequests):
    """
    What an L{Inbox} needs, and no engine: a request table (the real one,
    L{ClientRequests}, so that answers are checked as the engine checks
    them), a clock, counters, a handler, events; it records how sessions
    end and what is written.
    """

    def __init__(self):
        self.clock = Clock()
        self.wire = WIRE
        self.user_id = "alice"
        self.client_type = ClientType.DOTNET
        self.counters = collections.Counter()
        self.handler = Handler()
        self.offline_mark = 0
        self.max_output_buffer = 8 * 1024 * 1024
        self.request_timeout = 30.0
        self._protocol = Connection()
        self._drain_waiters = []
        self._pending = PendingRequests(self.clock, 30)
        self.ended = []
        for name in (
            "being_pushed_out",
            "being_kicked_out",
            "my_device_online",
            "my_device_offline",
            "information_received",
            "broadcast_received",
        ):
            setattr(self, name, Event(name))

    logged_on = True

    @property
    def connection(self):
        return self._protocol

    def end_for_good(self, connection, ending):
        self.ended.append((connection, ending))

    def written(self):
        decoder = FrameDecoder(WIRE)
        frames = [f for data in self._protocol.written for f in decoder.feed(data)]
        self._protocol.written.clear()
        return frames


def inbox() -> tuple[Inbox, Host]:
    host = Host()
    assert set(_members(InboxHost)) <= set(dir(host))  # what the inbox may use, and no more
    return Inbox(host, ClientBlobs()), host


def _members(protocol) -> set[str]:
    """
    The members a C{typing.Protocol} declares (what typing's own
    C{_get_protocol_attrs} finds; C{__protocol_attrs__} is 3.12's).
    """
    return {
        name
        for klass in protocol.__mro__
        if klass.__module__.startswith("esf.")
        for name in (*vars(klass), *getattr(klass, "__annotations__", {}))
        if not name.startswith("__") and name not in ("_is_protocol", "_abc_impl")
    }


def test_the_inbox_host_names_no_private_member():
    assert {
        "offline_mark",
        "take_answer",
        "end_for_good",
        "write_message",
        "connection",
        "channel_is_busy",
    } <= _members(InboxHost)
    assert [name for name in _members(InboxHost) if name.startswith("_")] == []


def test_a_message_is_handed_to_the_handler_and_acknowledged():
    box, host = inbox()
    heard = []
    host.information_received.subscribe(lambda *a: heard.append(a))
    body = m.Information(7, b"hi").encode()
    box.frame_received(host.connection, frame(MessageType.SEND_CERTAINLY, body, message_id=4))
    assert host.handler.information == [("bob", ClientType.ANDROID, 7, b"hi")]
    assert heard == host.handler.information
    (ack,) = host.written()
    assert (ack.message_type, ack.message_id, ack.dest_user_id) == (
        MessageType.ACK,
        4,
        f"bob#{int(ClientType.ANDROID)}",
    )


def test_a_query_is_answered_by_the_handler_to_the_asking_device():
    box, host = inbox()
    box.frame_received(
        host.connection, frame(MessageType.REQUEST, m.Information(2, b"q").encode(), message_id=9)
    )
    (answer,) = host.written()
    assert (answer.message_type, answer.message_id, answer.dest_user_id) == (
        MessageType.RESPONSE,
        9,
        f"bob#{int(ClientType.ANDROID)}",
    )
    assert m.Information.decode(answer.body).payload == b"Q"


def test_a_ping_is_not_answered_while_the_server_does_not_read():
    """
    No PingAck is written while the channel is busy (it would only pile up
    unsent); the ping is counted, and answered again once it drains.
    """
    box, host = inbox()
    host._protocol.paused = True
    for _ in range(1000):
        box.frame_received(host.connection, frame(MessageType.PING_BY_SERVER, message_id=9))
    assert host.written() == []
    assert host.counters["pings_unanswered"] == 1000
    host._protocol.paused = False
    box.frame_received(host.connection, frame(MessageType.PING_BY_SERVER, message_id=9))
    (ack,) = host.written()
    assert (ack.message_type, ack.message_id, ack.dest_user_id) == (
        MessageType.PING_ACK,
        9,
        "bob#5",
    )


def test_a_forged_answer_is_counted_and_the_call_goes_on_waiting():
    box, host = inbox()
    results = []
    host._request(MessageType.REQUEST, m.Information(1, b"?").encode(), dest="bob").addBoth(
        results.append
    )
    (request,) = host.written()
    answer = m.Information(1, b"forged").encode()
    box.frame_received(
        host.connection,
        frame(MessageType.RESPONSE, answer, sender="mallory", message_id=request.message_id),
    )
    assert host.counters["forged_answers"] == 1
    assert results == []
    real = m.Information(1, b"real").encode()
    box.frame_received(
        host.connection, frame(MessageType.RESPONSE, real, message_id=request.message_id)
    )
    assert [m.Information.decode(r.body).payload for r in results] == [b"real"]


def test_an_offline_duplicate_is_acknowledged_and_not_handled_again():
    box, host = inbox()
    host.offline_mark = 5
    stored = m.Information(3, b"kept").encode()
    box.frame_received(
        host.connection, frame(MessageType.SEND, stored, message_id=5, dest=SERVER_ID)
    )
    assert host.handler.information == []
    assert host.counters["offline_duplicates"] == 1
    box.frame_received(
        host.connection, frame(MessageType.SEND, stored, message_id=6, dest=SERVER_ID)
    )
    assert host.handler.information == [("bob", ClientType.ANDROID, 3, b"kept")]
    assert host.offline_mark == 6
    assert host.written() == []  # acknowledged once per turn, cumulatively
    host.clock.advance(0)
    (ack,) = host.written()
    assert (ack.message_type, ack.message_id, ack.dest_user_id) == (MessageType.ACK, 6, SERVER_ID)


def test_a_kick_ends_the_session_through_the_host():
    box, host = inbox()
    kicked = []
    host.being_kicked_out.subscribe(lambda *a: kicked.append(a))
    notice = m.BeingKickedOutNotify("admin", "spam").encode()
    box.frame_received(
        host.connection, frame(MessageType.BEING_KICKED_OUT_NOTIFY, notice, sender=SERVER_ID)
    )
    ((connection, ending),) = host.ended
    assert connection is host.connection
    assert (ending.reason, ending.operator, ending.text) == (
        DisconnectedType.BEING_KICKED_OUT,
        "admin",
        "spam",
    )
    assert kicked == [("admin", "spam")]


# -- the signatures the three share ---------------------------------------------------


def _parameters(method) -> list[tuple[str, object, object, object]]:
    return [
        (p.name, p.kind, p.default, p.annotation)
        for p in inspect.signature(method).parameters.values()
        if p.name != "self"
    ]


def _calls(cls) -> dict[str, object]:
    return {
        name: member
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


def test_query_takes_the_same_arguments_on_server_client_and_blocking_client():
    """
    C{client_type} and C{timeout} are keyword-only, in the same order, on
    the server's and the client's C{query}.
    """
    server = _parameters(ServerEngine.query)
    assert _parameters(ClientEngine.query) == server
    assert _parameters(BlockingClient.query) == server
    kinds = {name: kind for name, kind, _, _ in server}
    assert kinds["client_type"] is kinds["timeout"] is inspect.Parameter.KEYWORD_ONLY


def test_the_blocking_client_takes_the_engines_arguments():
    """
    Every call of the blocking client takes what the engine's call of that
    name takes; wherever a call has a timeout, it and any client_type are
    keyword-only.
    """
    engine = _calls(ClientEngine)
    shared = sorted(set(_calls(BlockingClient)) & set(engine))
    assert {"query", "send_certainly", "send_blob", "broadcast", "ping", "ping_by_server"} <= set(
        shared
    )
    for name in shared:
        assert _parameters(getattr(BlockingClient, name)) == _parameters(engine[name]), name
    for cls in (ClientEngine, BlockingClient, ServerEngine):
        for name, method in _calls(cls).items():
            parameters = inspect.signature(method).parameters
            if "timeout" in parameters:
                for keyword in ("timeout", "client_type"):
                    if keyword in parameters:
                        assert parameters[keyword].kind is inspect.Parameter.KEYWORD_ONLY, (
                            cls,
                            name,
                        )
