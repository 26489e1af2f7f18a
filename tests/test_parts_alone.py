"""
The server's parts built alone, each on small fakes of what it declares it
needs of the engine (its C{typing.Protocol}: L{SessionOwner},
L{LogonEngine}, L{BasicEngine}, L{ApplicationEngine}), never through
L{esf.server._engine.ServerEngine}.
"""

from __future__ import annotations

import collections

from twisted.internet import task
from twisted.internet.defer import succeed

from esf import DisconnectedType as D
from esf import LogonResult, ServerConfig
from esf import MessageType as T
from esf.server._budget import MemoryBudget
from esf.server._config import SessionPhase
from esf.server._counters import RELAYED_MESSAGES
from esf.server._logon import Logons
from esf.server._output import PUSH_BACK, OutputBatch
from esf.server._presence import LocalPresence, UserManager
from esf.server._relay import Relay
from esf.server._services import ApplicationServices, BasicServices
from esf.server._session import Session
from esf.wire import _messages as m
from esf.wire._decoder import FrameDecoder
from esf.wire._events import Event
from esf.wire._frames import SERVER_ID, encode_frame
from esf.wire._pending import PendingRequests

CONFIG = ServerConfig()
WIRE = CONFIG.wire


def _frames(data):
    return FrameDecoder(WIRE).feed(data)


class FakeChannel:
    """
    An L{esf.interfaces.IChannel} that keeps what is written.
    """

    address = "10.0.0.1:1234"

    def __init__(self):
        self.written = []
        self.closed = None

    def write(self, data):
        self.written.append(data)

    def close(self, reason=None):
        self.closed = reason

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


class FakeDevice:
    """
    A device the fake router names: keeps what is sent to it and answers
    C{status}.
    """

    def __init__(self, status=0):
        self.status = status
        self.sent = []
        self.pushed_back = []

    def send(self, data):
        self.sent.append(data)
        return self.status

    def push_back(self, sender):
        self.pushed_back.append(sender)


class FakeRouter:
    def __init__(self, routes):
        self.routes = routes

    def resolve(self, dest):
        return self.routes.get(dest)


class FakeAnswers:
    def accept(self, session, frame):
        return False

    def answer(self, session, frame):
        return ()

    def asked(self, session, frame):
        return True

    def forget(self, session, frame):
        return True


class FakeSessionOwner:
    """
    Exactly what L{esf.server._session.SessionOwner} lists (and the
    L{esf.server._relay.RelayEngine} its relay needs), with a real relay
    rule over a fake router.
    """

    def __init__(self, routes):
        self.config = CONFIG
        self.clock = task.Clock()
        self.counters = collections.Counter()
        self.budget = MemoryBudget(CONFIG.max_buffered_bytes)
        self.batch = OutputBatch()
        self.node_id = "node"
        self.full_bucket = float(CONFIG.work_burst)
        self.router = FakeRouter(routes)
        self.answers = FakeAnswers()
        self.user_manager = UserManager(LocalPresence(), CONFIG)
        self.presence = LocalPresence()
        self.offline = None
        self.transmit_failed = Event("transmit_failed")
        self.relay_gate = None
        self.relay = Relay(self)
        self.received = []
        self.ended = []
        self.closed = []

    def frame_received(self, session, frame):
        self.received.append(frame)

    def broadcast_run(self, session, run):
        self.received.extend(run.frames())

    def connection_closed(self, session):
        self.closed.append(session)

    def session_ended(self, session, reason, text, was_logged_on):
        self.ended.append((reason, was_logged_on))


def _logged_on_session(owner, user_id="alice"):
    session = Session(owner, FakeChannel())
    session.state = SessionPhase.LOGGED_ON
    session.user_id = user_id
    session.client_type = 0
    return session


def _send(user_id, dest, payload=b"hi", message_id=0):
    body = m.Information(1, payload).encode()
    return encode_frame(
        WIRE, T.SEND, body, user_id=user_id, dest_user_id=dest, message_id=message_id
    )


# -- Session ------------------------------------------------------------------


def test_session_alone_relays_sends_to_the_routers_device():
    """
    A session on a fake owner forwards a read's Sends to the device its
    router names, as they came, and counts them once.
    """
    bob = FakeDevice()
    owner = FakeSessionOwner({"bob": [bob]})
    session = _logged_on_session(owner)
    frames = _send("alice", "bob", b"one") + _send("alice", "bob", b"two")
    session.data_received(frames)
    assert b"".join(bob.sent) == frames
    assert owner.received == []  # the relay's common case never reaches the owner
    assert owner.counters[RELAYED_MESSAGES[T.SEND]] == 2


def test_session_alone_hands_other_frames_to_its_owner():
    """
    A frame that is not a relayed Send (a heartbeat, a Send to nobody
    online) goes to the owner's C{frame_received}.
    """
    owner = FakeSessionOwner({"bob": []})
    session = _logged_on_session(owner)
    heartbeat = encode_frame(WIRE, T.HEARTBEAT, user_id="alice", dest_user_id=SERVER_ID)
    session.data_received(heartbeat + _send("alice", "bob"))
    assert [f.message_type for f in owner.received] == [T.HEARTBEAT, T.SEND]


def test_session_alone_is_held_back_by_a_backed_up_device():
    """
    A device that answers L{PUSH_BACK} holds its sender back (the relay
    rule), and the frames still count as relayed.
    """
    bob = FakeDevice(status=PUSH_BACK)
    owner = FakeSessionOwner({"bob": [bob]})
    session = _logged_on_session(owner)
    session.data_received(_send("alice", "bob"))
    assert bob.pushed_back == [session]
    assert owner.counters[RELAYED_MESSAGES[T.SEND]] == 1


def test_session_alone_ends_once_and_tells_its_owner():
    owner = FakeSessionOwner({})
    session = _logged_on_session(owner)
    session.end(D.BEING_KICKED_OUT, "bye")
    session.end(D.BEING_KICKED_OUT, "again")
    assert owner.ended == [(D.BEING_KICKED_OUT, True)]
    (notice,) = _frames(session.channel.written[-1])
    assert notice.message_type == T.DISCONNECT_NOTICE
    assert session.channel.closed == D.BEING_KICKED_OUT


# -- Logons -----------------------------------------------------------------------


class Handler:
    """
    An L{esf.interfaces.IBasicHandler}: one password is right.
    """

    def verify_user(self, system_token, user_id, password, client_type, address):
        return password == "right"

    def can_kick_out(self, operator_id, target_id, client_type):
        return False


class FakeLogonEngine:
    """
    Exactly what L{esf.server._logon.LogonEngine} lists.
    """

    def __init__(self, config=CONFIG):
        self.config = config
        self.clock = task.Clock()
        self.counters = collections.Counter()
        self.node_id = "node"
        self.handler = Handler()
        self.relogon_policy = None
        self.presence = LocalPresence()
        self.user_manager = UserManager(self.presence, config)
        self.offline = None
        self.stopping = False


class FakeSession:
    """
    What the logon pipeline and the services touch of a session.
    """

    def __init__(self, user_id=None):
        self.state = SessionPhase.AWAITING_LOGON if user_id is None else SessionPhase.LOGGED_ON
        self.user_id = user_id
        self.client_type = 0 if user_id is not None else None
        self.logon_order = 0
        self.address = "10.0.0.1:1234"
        self.replies = []
        self.queued = []
        self.charged = []
        self.ends = []

    @property
    def logged_on(self):
        return self.state is SessionPhase.LOGGED_ON

    def reply(self, frame, body, message_type=None):
        self.replies.append((frame.message_type if message_type is None else message_type, body))

    def queue(self, data):
        self.queued.append(data)

    def charge(self, cost):
        self.charged.append(cost)
        return True

    def error(self, frame, code, text):
        self.replies.append((T.ERROR, m.Error(frame.message_type, code, text).encode()))

    def end(self, reason, text=""):
        self.state = SessionPhase.ENDED
        self.ends.append((reason, text))


def _logon(password, system_token=""):
    body = m.Logon(m.PROTOCOL_VERSION, system_token, password).encode()
    return _frames(encode_frame(WIRE, T.LOGON, body, user_id="alice", dest_user_id=SERVER_ID))[0]


def test_logons_alone_refuse_a_wrong_password():
    """
    The pipeline on a fake engine: the handler says no, so the Logon is
    answered C{FAILED} and the session ends with C{LogonFailed}; nobody is
    online.
    """
    engine = FakeLogonEngine()
    session = FakeSession()
    Logons(engine).frame_received(session, _logon("wrong"))
    ((message_type, body),) = session.replies
    reply = m.LogonReply.decode(body)
    assert message_type == T.LOGON and reply.result == LogonResult.FAILED
    assert reply.failure_cause == "invalid user ID or password"
    assert [reason for reason, _ in session.ends] == [D.LOGON_FAILED]
    assert engine.presence.user_count() == 0


def test_logons_alone_refuse_a_wrong_system_token():
    """
    A Logon without the server's system token is refused by the policy
    before the handler is asked.
    """
    engine = FakeLogonEngine(ServerConfig(system_token="secret"))
    session = FakeSession()
    Logons(engine).frame_received(session, _logon("right", system_token="guess"))
    ((_, body),) = session.replies
    assert m.LogonReply.decode(body).result == LogonResult.VERSION_MISMATCHED
    assert session.ends and session.state is SessionPhase.ENDED


# -- the services -----------------------------------------------------------------


class FakePresence:
    """
    What the basic services read of presence.
    """

    def __init__(self, users):
        self.users = users

    def user_ids(self, offset=0, limit=None):
        return self.users[offset : offset + limit if limit is not None else None]

    def user_count(self):
        return len(self.users)

    def devices(self, user_id):
        return ["device"] if user_id in self.users else []


class FakeBasicEngine:
    """
    Exactly what L{esf.server._services.BasicEngine} lists.
    """

    def __init__(self, users=()):
        self.config = CONFIG
        self.presence = FakePresence(list(users))
        self.relay = None  # a PingByServer to a user is not exercised here
        self.handler = Handler()
        self.logons = None
        self.kicked = []

    def kick_out(self, user_id, reason="", client_type=None, *, operator=SERVER_ID,
                 origin="server_api"):  # fmt: skip
        self.kicked.append((user_id, reason, operator))
        return 1


def _to_server(message_type, body=b"", message_id=1, dest=SERVER_ID):
    return _frames(
        encode_frame(
            WIRE, message_type, body, message_id=message_id, user_id="alice", dest_user_id=dest
        )
    )[0]


def test_basic_services_alone_answer_a_heartbeat():
    session = FakeSession("alice")
    services = BasicServices(FakeBasicEngine())
    services.handlers[T.HEARTBEAT](session, _to_server(T.HEARTBEAT, message_id=0))
    (heartbeat,) = _frames(session.queued[0])
    assert heartbeat.message_type == T.HEARTBEAT
    assert (heartbeat.user_id, heartbeat.dest_user_id) == (SERVER_ID, "alice")


def test_basic_services_alone_answer_get_all_online_users():
    """
    GetAllOnlineUsers pages through the fake presence and charges the
    session for the size of the answer.
    """
    session = FakeSession("alice")
    services = BasicServices(FakeBasicEngine(["alice", "bob", "carol"]))
    request = m.GetAllOnlineUsers(offset=1, limit=5).encode()
    services.handlers[T.GET_ALL_ONLINE_USERS](session, _to_server(T.GET_ALL_ONLINE_USERS, request))
    ((message_type, body),) = session.replies
    reply = m.GetAllOnlineUsersReply.decode(body)
    assert message_type == T.GET_ALL_ONLINE_USERS
    assert (reply.total, reply.user_ids) == (3, ("bob", "carol"))
    assert session.charged == [2 / 10]


class CustomizeHandler:
    def handle_information(self, user_id, client_type, information_type, payload):
        pass

    def handle_query(self, user_id, client_type, information_type, payload):
        return succeed(payload.upper())


class FakeApplicationEngine:
    """
    Exactly what L{esf.server._services.ApplicationEngine} lists.
    """

    def __init__(self):
        self.config = CONFIG
        self.clock = task.Clock()
        self.counters = collections.Counter()
        self.budget = MemoryBudget(CONFIG.max_buffered_bytes)
        self.customize_handler = CustomizeHandler()
        self.group_manager = None
        self.pending = PendingRequests(self.clock, CONFIG.query_timeout)
        self.presence = FakePresence([])
        self.router = FakeRouter({})
        self.relay = None
        self.relay_gate = None


def test_application_services_alone_answer_a_request_from_the_handler():
    session = FakeSession("alice")
    services = ApplicationServices(FakeApplicationEngine())
    body = m.Information(7, b"hello").encode()
    services.handlers[T.REQUEST](session, _to_server(T.REQUEST, body, message_id=5))
    ((message_type, answer),) = session.replies
    assert message_type == T.RESPONSE
    assert m.Information.decode(answer) == m.Information(7, b"HELLO")
