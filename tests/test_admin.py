"""
Tests of the admin API (esf.operations._admin) on an engine driven in memory: the
resource is called with twisted.web's DummyRequest, the site's HTTP parsing
runs on a StringTransport.  The same against a real C{twistd esf} is in
test_admin_e2e.py.
"""

from __future__ import annotations

import io
import json
import os

import pytest
from _helpers import connect, make_engine
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.web.test.requesthelper import DummyRequest

from esf import DisconnectedType, MessageType
from esf.operations._admin import (
    ADMIN_OPERATOR,
    MAX_BODY,
    NOTICE_INFORMATION_TYPE,
    AdminApi,
    OnlineHistory,
    admin_site,
    config_summary,
    endpoint_is_local,
    read_token_file,
)
from esf.operations._admin_policy import REFUSALS_LOGGED
from esf.operations._metrics import OnlineDevices
from esf.wire import BeingKickedOutNotify, Information

TOKEN = "s3cret-token-0123456789"


@pytest.fixture
def engine():
    return make_engine()


@pytest.fixture
def devices(engine):
    devices = OnlineDevices(engine)
    devices.start()
    yield devices
    devices.stop()


@pytest.fixture
def api(engine, devices):
    return AdminApi(engine, TOKEN, devices)


class Answer:
    def __init__(self, request, body):
        self.request = request
        self.status = request.responseCode or 200
        self.body = json.loads(body)

    def header(self, name):
        values = self.request.responseHeaders.getRawHeaders(name)
        return values[0] if values else None


def call(api, method, path, body=None, token=TOKEN, query=None, raw=None):
    """
    Render C{method path} (C{path} below /api/) and return the L{Answer}; a
    body is sent as JSON.
    """
    request = DummyRequest([s.encode("utf-8") for s in path.split("/")])
    request.method = method.encode("ascii")
    request.requestHeaders.setRawHeaders(b"host", [b"127.0.0.1:8530"])
    request.requestHeaders.setRawHeaders(b"content-type", [b"application/json"])
    request.path = ("/api/" + path).encode("utf-8")
    request.client = IPv4Address("TCP", "127.0.0.1", 40000)
    for key, value in (query or {}).items():
        request.args.setdefault(key.encode(), []).append(str(value).encode())
    if raw is None:
        raw = b"" if body is None else json.dumps(body).encode()
    request.content = io.BytesIO(raw)
    if token is not None:
        request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {token}".encode()])
    return Answer(request, api.render(request))


# -- authentication -------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "wrong", TOKEN[:-1], TOKEN + "x", ""])
def test_401_without_the_token(api, token, logs):
    answer = call(api, "GET", "info", token=token)
    assert answer.status == 401
    assert answer.body["error"] == "unauthorized"
    assert answer.header(b"www-authenticate") == b'Bearer realm="esf"'
    (failure,) = logs.esf("admin_auth_failed")
    assert failure["peer"] == "127.0.0.1:40000" and failure["path"] == "/api/info"


def test_401_before_anything_else(api, engine):
    """
    Without the token nothing is revealed: not whether a route exists, not
    whether a user is online, and nothing is done.
    """
    alice = connect(engine, "alice")
    for method, path in [("GET", "nope"), ("GET", "users/alice"), ("POST", "users/alice/kick")]:
        assert call(api, method, path, token="bad").status == 401
    assert alice.take() == [] and not alice.closing


def test_auth_failures_logged_are_bounded(api, engine, logs):
    for _ in range(REFUSALS_LOGGED + 20):
        assert call(api, "GET", "info", token="bad").status == 401
    assert len(logs.esf("admin_auth_failed")) == REFUSALS_LOGGED
    engine.clock.advance(61)
    call(api, "GET", "info", token="bad")
    assert len(logs.esf("admin_auth_failed")) == REFUSALS_LOGGED + 1


def test_bearer_scheme_is_case_insensitive(api):
    request_token = f"bearer {TOKEN}"
    request = DummyRequest([b"info"])
    request.method = b"GET"
    request.requestHeaders.setRawHeaders(b"host", [b"localhost"])
    request.content = io.BytesIO(b"")
    request.requestHeaders.setRawHeaders(b"authorization", [request_token.encode()])
    api.render(request)
    assert request.responseCode == 200


def test_without_a_token_configured_the_api_only_reads(engine, devices, logs):
    alice = connect(engine, "alice")
    api = AdminApi(engine, None, devices)
    info = call(api, "GET", "info", token=None)
    assert info.status == 200 and info.body["read_only"] is True
    assert call(api, "GET", "users/alice", token=None).status == 200
    for path, body in [
        ("users/alice/kick", {}),
        ("users/alice/notice", {"text": "x"}),
        ("broadcast", {"text": "x"}),
    ]:
        answer = call(api, "POST", path, body, token=None)
        assert answer.status == 403 and answer.body["error"] == "token_required"
        assert "--admin-token-file" in answer.body["message"]
    assert alice.take() == [] and not alice.closing
    assert [e["check"] for e in logs.esf("admin_request_refused")] == ["read_only"] * 3
    assert logs.esf("admin_action") == []
    assert call(api, "GET", "info", token=TOKEN).status == 200  # a token sent is not looked at


# -- reading -------------------------------------------------------------------------


def test_info(api, engine):
    connect(engine, "alice", 5)
    connect(engine, "alice", 0)
    connect(engine, "bob", 5)
    engine.clock.advance(12)
    info = call(api, "GET", "info").body
    assert info["users_online"] == 2
    assert info["devices_online"] == 3
    assert info["devices_by_kind"] == {"android": 2, "dotnet": 1}
    assert info["connections"] == 3
    assert info["uptime_seconds"] == 12
    assert info["pending_queries"] == 0 and info["stopping"] is False
    assert info["read_only"] is False
    assert info["options"]["heartbeat_timeout"] == engine.config.heartbeat_timeout
    assert info["node"] == engine.node_id and info["version"]


def test_history_samples_the_online_count(engine, devices):
    history = OnlineHistory(engine, devices, interval=10, keep=3)
    api = AdminApi(engine, TOKEN, devices, history)
    history.start()
    try:
        connect(engine, "alice", 5)
        connect(engine, "alice", 0)
        engine.clock.advance(10)
        connect(engine, "bob")
        engine.clock.advance(10)
        body = call(api, "GET", "history").body
        assert body == {"interval": 10, "samples": [[0, 0, 0], [10, 1, 2], [20, 2, 3]]}
        engine.clock.advance(10)
        assert [s[0] for s in call(api, "GET", "history").body["samples"]] == [10, 20, 30]
        assert any("OnlineHistory" in repr(c) for c in engine.clock.getDelayedCalls())
    finally:
        history.stop()
    assert not any("OnlineHistory" in repr(c) for c in engine.clock.getDelayedCalls())


def test_info_hides_the_system_token():
    engine = make_engine(system_token="hush")
    summary = config_summary(engine.config)
    assert summary["system_token_set"] is True
    assert "hush" not in json.dumps(summary)


def test_sessions_paged_and_filtered(api, engine):
    for i in range(7):
        connect(engine, f"user{i}", 5 if i % 2 else 0, host=f"10.0.{i % 3}.1")
    connect(engine, "user3", 4, host="192.168.1.1")
    page = call(api, "GET", "sessions", query={"limit": 3}).body
    assert page["total"] == 8 and page["offset"] == 0 and page["limit"] == 3
    assert [(s["user_id"], s["kind"]) for s in page["sessions"]] == [
        ("user0", "dotnet"),
        ("user1", "android"),
        ("user2", "dotnet"),
    ]
    page = call(api, "GET", "sessions", query={"limit": 3, "offset": 3}).body
    assert [(s["user_id"], s["kind"]) for s in page["sessions"]] == [
        ("user3", "android"),
        ("user3", "ios"),
        ("user4", "dotnet"),
    ]
    assert call(api, "GET", "sessions", query={"offset": 8}).body["sessions"] == []

    def users(**query):
        return [
            (s["user_id"], s["client_type"])
            for s in call(api, "GET", "sessions", query=query).body["sessions"]
        ]

    assert users(user="user3") == [("user3", 5), ("user3", 4)]
    assert users(user="nobody") == []
    assert users(kind="android") == [("user1", 5), ("user3", 5), ("user5", 5)]
    assert users(kind="4") == [("user3", 4)]
    assert users(address="10.0.1.") == [("user1", 5), ("user4", 0)]
    assert users(address="192.168.", kind="ios") == [("user3", 4)]
    assert users(user_prefix="user1") == [("user1", 5)]
    session = call(api, "GET", "sessions", query={"user": "user3", "kind": "ios"}).body[
        "sessions"
    ][0]
    assert session["address"].startswith("192.168.1.1:")
    assert session["logon_time"] == engine.clock.seconds()
    assert set(session) == {
        "user_id", "client_type", "kind", "address", "logon_time", "connected_at",
        "last_active", "session_id", "node",
    }  # fmt: skip


@pytest.mark.parametrize(
    "query, message",
    [
        ({"limit": 0}, "limit is 1..1000"),
        ({"limit": 1001}, "limit is 1..1000"),
        ({"offset": -1}, "offset is at least 0"),
        ({"offset": "x"}, "offset is a whole number"),
        ({"kind": "toaster"}, "kind is a number 0..255 or one of"),
        ({"kind": "256"}, "kind is a number"),
        ({"usr": "alice"}, "unknown parameter 'usr'"),
    ],
)
def test_sessions_bad_query(api, query, message):
    answer = call(api, "GET", "sessions", query=query)
    assert answer.status == 400
    assert answer.body["error"] == "bad_request"
    assert message in answer.body["message"]


def test_user(api, engine):
    connect(engine, "alice", 5)
    connect(engine, "alice", 4)
    answer = call(api, "GET", "users/alice")
    assert answer.status == 200
    assert [d["kind"] for d in answer.body["devices"]] == ["android", "ios"]
    missing = call(api, "GET", "users/bob")
    assert missing.status == 404 and missing.body["error"] == "not_online"


def test_unknown_routes_and_methods(api):
    assert call(api, "GET", "nope").status == 404
    assert call(api, "GET", "users").status == 404
    answer = call(api, "GET", "users/alice/kick")
    assert answer.status == 405
    assert answer.header(b"allow") == b"POST"
    assert call(api, "POST", "info").status == 405
    assert call(api, "DELETE", "users/alice").status == 405
    assert call(api, "PUT", "broadcast").status == 405


# -- acting ----------------------------------------------------------------------------


def test_kick_reaches_the_client(api, engine, logs):
    phone = connect(engine, "alice", 5)
    desk = connect(engine, "alice", 0)
    answer = call(api, "POST", "users/alice/kick", {"reason": "spamming the lobby"})
    assert answer.status == 200
    assert answer.body == {"user_id": "alice", "kicked": 2}
    for client in (phone, desk):
        frames = [
            f
            for f in client.take()
            if f.message_type not in (MessageType.MY_DEVICE_ONLINE, MessageType.MY_DEVICE_OFFLINE)
        ]
        assert [f.message_type for f in frames] == [
            MessageType.BEING_KICKED_OUT_NOTIFY,
            MessageType.DISCONNECT_NOTICE,
        ]
        assert frames[0].body == BeingKickedOutNotify(ADMIN_OPERATOR, "spamming the lobby")
        assert frames[1].body.reason == DisconnectedType.BEING_KICKED_OUT
        assert client.closing
    (action,) = logs.esf("admin_action")
    assert (action["action"], action["user_id"], action["reason"], action["count"], action["status"]) == (
        "kick", "alice", "spamming the lobby", 2, 200,
    )  # fmt: skip
    assert action["peer"] == "127.0.0.1:40000"
    (kick,) = logs.esf("kick_out")
    assert kick["operator"] == ADMIN_OPERATOR


def test_the_admin_apis_operator_is_no_user(api, engine):
    """
    A client told who kicked it can tell the admin API from a user named
    "admin" (whom --admin or can_kick_out may let kick): the API's operator
    is a name no user can log on with, as it holds the device mark.
    """
    from _helpers import Client

    from esf.wire import LogonResult

    assert ADMIN_OPERATOR == "#admin"
    impostor = Client(engine)
    impostor.logon(ADMIN_OPERATOR)
    (reply,) = [f for f in impostor.take() if f.message_type == MessageType.LOGON]
    assert reply.body.result == LogonResult.FAILED

    bob, carol = connect(engine, "bob"), connect(engine, "carol")
    engine.kick_out("bob", "by a user", operator="admin", origin="client")
    assert call(api, "POST", "users/carol/kick", {"reason": "by the API"}).status == 200
    kicked = {
        who: [
            f.body.operator
            for f in client.take()
            if f.message_type == MessageType.BEING_KICKED_OUT_NOTIFY
        ]
        for who, client in [("bob", bob), ("carol", carol)]
    }
    assert kicked == {"bob": ["admin"], "carol": ["#admin"]}


def test_kick_one_device(api, engine):
    phone = connect(engine, "alice", 5)
    desk = connect(engine, "alice", 0)
    answer = call(api, "POST", "users/alice/devices/android/kick", {"reason": "lost phone"})
    assert answer.body == {"user_id": "alice", "kicked": 1}
    assert phone.closing and not desk.closing
    assert call(api, "POST", "users/alice/devices/5/kick").status == 404
    assert call(api, "POST", "users/alice/devices/0/kick").body["kicked"] == 1
    assert call(api, "POST", "users/alice/devices/toaster/kick").status == 400


def test_kick_offline_is_404(api, logs):
    answer = call(api, "POST", "users/nobody/kick", {"reason": "x"})
    assert answer.status == 404 and answer.body["error"] == "not_online"
    (action,) = logs.esf("admin_action")
    assert action["status"] == 404  # refused actions are audited too


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"{", "not JSON"),
        (b"[1]", "a JSON object"),
        (b'{"reason": 5}', "reason is a string"),
        (b'{"reasn": "x"}', "unknown field 'reasn'"),
        (json.dumps({"reason": "x" * 1001}).encode(), "at most 1000"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_kick_bad_body(api, engine, raw, message):
    alice = connect(engine, "alice")
    answer = call(api, "POST", "users/alice/kick", raw=raw)
    assert answer.status == 400
    assert message in answer.body["message"]
    assert not alice.closing


def test_kick_without_body_has_no_reason(api, engine):
    alice = connect(engine, "alice")
    assert call(api, "POST", "users/alice/kick").status == 200
    (notice,) = [f for f in alice.take() if f.message_type == MessageType.BEING_KICKED_OUT_NOTIFY]
    assert notice.body == BeingKickedOutNotify(ADMIN_OPERATOR, "")


def test_409_while_stopping(api, engine):
    connect(engine, "alice")
    engine.stop()
    for path, body in [
        ("users/alice/kick", {}),
        ("users/alice/notice", {"text": "x"}),
        ("broadcast", {"text": "x"}),
    ]:
        answer = call(api, "POST", path, body)
        assert answer.status == 409 and answer.body["error"] == "stopping"


def test_notice(api, engine):
    alice = connect(engine, "alice", 5)
    answer = call(api, "POST", "users/alice/notice", {"text": "maintenance at 22:00 ✓"})
    assert answer.body == {"user_id": "alice", "devices": 1}
    (frame,) = list(alice.take())
    assert frame.message_type == MessageType.SEND and frame.user_id == "_0"
    assert frame.body == Information(NOTICE_INFORMATION_TYPE, "maintenance at 22:00 ✓".encode())

    call(
        api,
        "POST",
        "users/alice/notice",
        {"payload_hex": "00ff", "information_type": -7, "kind": "android"},
    )
    (frame,) = alice.take()
    assert frame.body == Information(-7, b"\x00\xff")
    assert call(api, "POST", "users/alice/notice", {"text": "x", "kind": 0}).status == 404
    assert call(api, "POST", "users/bob/notice", {"text": "x"}).status == 404
    assert engine.counters["transmit_failed"] == 0  # an offline user is not the offline store's


@pytest.mark.parametrize(
    "body, status",
    [
        ({}, 400),
        ({"text": "a", "payload_hex": "00"}, 400),
        ({"payload_hex": "zz"}, 400),
        ({"text": 1}, 400),
        ({"text": "a", "information_type": 2**31}, 400),
        ({"text": "a", "information_type": True}, 400),
        ({"text": "a", "information_type": "1"}, 400),
        ({"text": "a", "kind": [1]}, 400),
    ],
)
def test_notice_bad_body(api, engine, body, status):
    connect(engine, "alice")
    assert call(api, "POST", "users/alice/notice", body).status == status


def test_notice_too_big_for_a_frame(engine, devices):
    small = make_engine(max_message_size=100)
    api = AdminApi(small, TOKEN, devices)
    connect(small, "alice")
    assert call(api, "POST", "users/alice/notice", {"text": "x" * 60}).status == 200
    answer = call(api, "POST", "users/alice/notice", {"text": "x" * 61})
    assert answer.status == 413 and answer.body["error"] == "too_large"


def test_broadcast(api, engine, logs):
    clients = [connect(engine, "alice", 5), connect(engine, "alice", 0), connect(engine, "bob")]
    for client in clients:
        client.take()
    answer = call(api, "POST", "broadcast", {"text": "hello all", "information_type": 9})
    assert answer.body == {"users": 2, "devices": 3}
    for client in clients:
        (frame,) = client.take()
        assert frame.body == Information(9, b"hello all")
    (action,) = logs.esf("admin_action")
    assert action["action"] == "broadcast" and action["payload"] == b"hello all"


# -- HTTP: bounded bodies, the dashboard ------------------------------------------------


def http(site, data: bytes) -> StringTransport:
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40001))
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
    protocol.makeConnection(transport)
    protocol.dataReceived(data)
    return transport


@pytest.fixture
def site(engine, devices):
    site = admin_site(engine, TOKEN, devices)
    # twisted.web's timers (the connections' idle timeout, the log date) on
    # the engine's clock: left on the global reactor, they would fire in
    # whichever later test runs it, on connections long gone.
    site.reactor = engine.clock
    return site


def test_a_big_body_is_refused_unread(site, engine):
    alice = connect(engine, "alice")
    head = (
        b"POST /api/broadcast HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
        + TOKEN.encode()
        + b"\r\nContent-Length: "
        + str(MAX_BODY + 1).encode()
        + b"\r\n\r\n"
    )
    transport = http(site, head + b"{" * 1000)
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert b'"error":"too_large"' in transport.value()
    assert transport.disconnecting
    assert alice.take() == []


def test_a_big_chunked_body_is_refused(site):
    head = b"POST /api/broadcast HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (16384, b"a" * 16384)
    transport = http(site, head + chunk * 5)
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert transport.disconnecting


def test_a_body_within_the_bound_is_read(site, engine):
    alice = connect(engine, "alice")
    alice.take()
    body = json.dumps({"text": "y" * (MAX_BODY - 20)}).encode()
    assert len(body) <= MAX_BODY
    transport = http(
        site,
        b"POST /api/broadcast HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
        + TOKEN.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body,
    )
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    (frame,) = alice.take()
    assert frame.body.payload == b"y" * (MAX_BODY - 20)


def test_dashboard_is_served_with_a_strict_policy(site):
    transport = http(site, b"GET /dashboard HTTP/1.1\r\nHost: localhost\r\n\r\n")
    response = transport.value()
    assert response.startswith(b"HTTP/1.1 200 ")
    assert b"default-src 'self'" in response and b"X-Frame-Options: DENY" in response
    assert b'<script src="/dashboard.js"' in response
    for path in (b"/dashboard.js", b"/dashboard.css"):
        assert (
            http(site, b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .value()
            .startswith(b"HTTP/1.1 200 ")
        )
    assert (
        b"Location: /dashboard" in http(site, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").value()
    )


# -- starting ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "description, local",
    [
        ("tcp:8530:interface=127.0.0.1", True),
        ("tcp:8530:interface=127.0.0.2", True),
        ("tcp6:8530:interface=\\:\\:1", True),
        ("tcp:8530:interface=localhost", True),
        ("ssl:8531:privateKey=k.pem:interface=127.0.0.1", True),
        ("unix:/run/esf-admin.sock", True),
        ("tcp:8530", False),
        ("8530", False),
        ("tcp:8530:interface=0.0.0.0", False),
        ("tcp:8530:interface=10.1.2.3", False),
        ("tcp6:8530:interface=\\:\\:", False),
        ("ssl:8531:privateKey=k.pem", False),
        ("systemd:domain=INET:index=0", False),
    ],
)
def test_endpoint_is_local(description, local):
    assert endpoint_is_local(description) is local


def test_read_token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    os.chmod(path, 0o600)
    assert read_token_file(str(path)) == TOKEN
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="other users"):
        read_token_file(str(path))
    os.chmod(path, 0o600)
    path.write_text("short")
    with pytest.raises(ValueError, match="shorter than 16"):
        read_token_file(str(path))
    path.write_text("two words in a token")
    with pytest.raises(ValueError, match="whitespace"):
        read_token_file(str(path))
    with pytest.raises(ValueError, match="cannot read"):
        read_token_file(str(tmp_path / "missing"))
