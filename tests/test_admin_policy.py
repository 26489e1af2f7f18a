"""
Tests of what the admin API lets in (esf.operations._admin_policy): the Host, Origin
and Content-Type checks and the token rule, each attack as a browser would
send it, through the site's real HTTP parsing on a StringTransport.  The
same attacks from a real Chromium page are in test_admin_dashboard.py.
"""

from __future__ import annotations

import json

import pytest
from _helpers import connect, make_engine
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import StringTransport

from esf import MessageType
from esf.operations._admin import admin_site
from esf.operations._admin_policy import REFUSALS_LOGGED, RequestPolicy, allowed_host_name
from esf.operations._metrics import OnlineDevices

TOKEN = "s3cret-token-0123456789"
PORT = 8530
#: What a browser adds to a request a page on another site makes.
CROSS_SITE = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}


@pytest.fixture
def engine():
    return make_engine()


@pytest.fixture
def devices(engine):
    devices = OnlineDevices(engine)
    devices.start()
    yield devices
    devices.stop()


def make_site(engine, devices, token=None, **options):
    site = admin_site(engine, token, devices, **options)
    site.reactor = engine.clock  # twisted.web's timers, off the global reactor
    return site


@pytest.fixture
def open_site(engine, devices):
    """The documented default: loopback, no token."""
    return make_site(engine, devices)


@pytest.fixture
def site(engine, devices):
    return make_site(engine, devices, TOKEN)


class Response:
    def __init__(self, raw: bytes):
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers.setdefault(name.strip().lower(), []).append(value.strip())
        self.raw = raw
        self.body = json.loads(body) if body.startswith(b"{") else body


def send(site, method, path, body=b"", headers=None, host=f"127.0.0.1:{PORT}", local="127.0.0.1"):
    """
    One request through C{site}'s HTTP parsing, from 127.0.0.1 to
    C{local}:L{PORT}; C{host} is its Host header (C{None}: none).
    """
    address = IPv6Address if ":" in local else IPv4Address
    transport = StringTransport(
        hostAddress=address("TCP", local, PORT), peerAddress=address("TCP", local, 40001)
    )
    protocol = site.buildProtocol(transport.getPeer())
    protocol.makeConnection(transport)
    lines = [f"{method} {path} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    protocol.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    return Response(transport.value())


def notices(client):
    return [f for f in client.take() if f.message_type == MessageType.SEND]


# -- the attacks as filed -------------------------------------------------------------


def test_a_page_elsewhere_cannot_kick_with_a_no_cors_post(open_site, engine, logs):
    """
    C{fetch(url, {method: "POST", mode: "no-cors", body: ...})} from
    http://evil.example: a "simple" request, sent without a preflight.
    """
    alice = connect(engine, "alice")
    response = send(
        open_site, "POST", "/api/users/alice/kick", b'{"reason": "you were hacked"}',
        {**CROSS_SITE, "Content-Type": "text/plain;charset=UTF-8", "Sec-Fetch-Mode": "no-cors"},
    )  # fmt: skip
    assert response.status == 403
    assert response.body["error"] == "cross_origin"
    assert not alice.closing and alice.take() == []
    assert logs.esf("kick_out") == [] and logs.esf("admin_action") == []
    (refusal,) = logs.esf("admin_request_refused")
    assert (refusal["check"], refusal["value"]) == ("origin", "http://evil.example")
    assert refusal["peer"] == "127.0.0.1:40001" and refusal["path"] == "/api/users/alice/kick"


# The body of <form method=post enctype=text/plain action=.../api/broadcast>
# holding <input name='{"text": "Your password expired: evil.example/login ' value='"}'>.
FORM_BODY = b'{"text": "Your password expired: evil.example/login ="}\r\n'


@pytest.mark.parametrize(
    "headers",
    [
        {**CROSS_SITE, "Sec-Fetch-Mode": "navigate"},  # a browser of today
        {"Origin": "null"},  # a sandboxed page or a redirect
        {},  # a browser that sends neither Origin nor Sec-Fetch-*
    ],
)
# (A multipart body is parsed, and a malformed one refused, by twisted.web
# before the API sees it; a well-formed one is not JSON.)
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_a_form_elsewhere_cannot_forge_a_notice(open_site, engine, logs, headers, content_type):
    alice, bob = connect(engine, "alice"), connect(engine, "bob")
    response = send(
        open_site, "POST", "/api/broadcast", FORM_BODY, {**headers, "Content-Type": content_type}
    )
    assert response.status in (403, 415)
    assert response.body["error"] in ("cross_origin", "unsupported_media_type", "token_required")
    assert notices(alice) == [] and notices(bob) == []
    assert len(logs.esf("admin_request_refused")) == 1


def test_a_rebound_name_cannot_read_the_sessions(open_site, engine, logs):
    """
    DNS rebinding: a page at http://rebind.evil.example:8530 whose name now
    resolves to 127.0.0.1 reads the API as its own origin (same-origin, no
    C{Origin} on a GET); only the Host header tells.
    """
    connect(engine, "alice", host="10.9.8.7")
    response = send(
        open_site, "GET", "/api/sessions", host=f"rebind.evil.example:{PORT}",
        headers={"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"},
    )  # fmt: skip
    assert response.status == 403
    assert response.body["error"] == "host_not_allowed"
    assert b"alice" not in response.raw and b"10.9.8.7" not in response.raw
    (refusal,) = logs.esf("admin_request_refused")
    assert (refusal["check"], refusal["value"]) == ("host", f"rebind.evil.example:{PORT}")


# -- Host -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host, local",
    [
        ("localhost", "127.0.0.1"),
        (f"localhost:{PORT}", "127.0.0.1"),
        ("LocalHost:9000", "127.0.0.1"),  # another port: ssh -L 9000:localhost:8530
        (f"127.0.0.1:{PORT}", "127.0.0.1"),
        ("127.3.2.1", "127.0.0.1"),
        (f"[::1]:{PORT}", "::1"),
        ("[::1]", "127.0.0.1"),
        (f"10.1.2.3:{PORT}", "10.1.2.3"),  # the address the request came in on
        (f"[fd00::7]:{PORT}", "fd00::7"),
        (f"10.1.2.3:{PORT}", "::ffff:10.1.2.3"),  # IPv4 on a tcp6 port listening on ::
    ],
)
def test_hosts_served_by_default(open_site, host, local):
    assert send(open_site, "GET", "/api/info", host=host, local=local).status == 200


@pytest.mark.parametrize(
    "host",
    [
        "rebind.evil.example",
        "localhost.evil.example",
        "evil.localhost.example:8530",
        "localhost.",
        "10.1.2.3",  # an address of this machine, but not the one asked
        "",
        "::1",  # an IPv6 address without brackets
        "[::1",
        "localhost:http",
        "localhost:123456",
        "127.0.0.1@evil.example",
        "evil.example/127.0.0.1",
        None,  # no Host at all
    ],
)
def test_hosts_refused(open_site, engine, logs, host):
    connect(engine, "alice")
    response = send(open_site, "GET", "/api/sessions", host=host)
    assert response.status == 403 and response.body["error"] == "host_not_allowed"
    assert "--admin-host" in response.body["message"]
    (refusal,) = logs.esf("admin_request_refused")
    assert refusal["check"] == "host" and refusal["value"] == (host or "")


def test_two_host_headers_are_refused(open_site):
    response = send(open_site, "GET", "/api/info", headers={"Host": "evil.example"})
    assert response.status == 403


def test_admin_host_names_more(engine, devices):
    site = make_site(engine, devices, hosts=["Admin.Example", "192.0.2.7", "[2001:db8::1]"])
    for host in (
        "admin.example",
        "ADMIN.example:443",
        "192.0.2.7:8530",
        "[2001:db8::1]:80",
        "localhost",
    ):
        assert send(site, "GET", "/api/info", host=host).status == 200, host
    for host in ("sub.admin.example", "admin.example.evil", "192.0.2.8"):
        assert send(site, "GET", "/api/info", host=host).status == 403, host


@pytest.mark.parametrize(
    "name, normal",
    [
        ("Admin.Example", "admin.example"),
        ("[::1]", "::1"),
        ("2001:DB8::1", "2001:db8::1"),
        ("a-b.c", "a-b.c"),
    ],
)
def test_allowed_host_name(name, normal):
    assert allowed_host_name(name) == normal


@pytest.mark.parametrize(
    "name", ["admin.example:8530", "http://admin.example", "-a.example", "a..b", "", "*"]
)
def test_allowed_host_name_refuses(name):
    with pytest.raises(ValueError, match="not a host name"):
        allowed_host_name(name)


def test_the_host_is_checked_before_the_token(site, logs):
    response = send(site, "GET", "/api/info", host="rebind.evil.example")
    assert response.status == 403 and response.body["error"] == "host_not_allowed"
    assert logs.esf("admin_auth_failed") == []


# -- Origin -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Origin": f"http://127.0.0.1:{PORT}"},
        {"Origin": f"HTTP://127.0.0.1:{PORT}"},
        {"Origin": f"https://127.0.0.1:{PORT}"},  # behind a proxy that ends TLS
        {"Origin": f"http://127.0.0.1:{PORT}", "Sec-Fetch-Site": "same-origin"},
        {"Sec-Fetch-Site": "none"},  # typed in the address bar
    ],
)
def test_same_origin_requests_pass(site, engine, headers):
    alice = connect(engine, "alice")
    response = send(
        site, "POST", "/api/users/alice/kick", b'{"reason": "r"}',
        {**headers, "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )  # fmt: skip
    assert response.status == 200, response.body
    assert alice.closing


@pytest.mark.parametrize(
    "headers, value",
    [
        ({"Origin": "http://evil.example"}, "http://evil.example"),
        ({"Origin": f"http://localhost:{PORT}"}, f"http://localhost:{PORT}"),  # Host: 127.0.0.1
        ({"Origin": "http://127.0.0.1:9999"}, "http://127.0.0.1:9999"),  # another local site
        ({"Origin": "null"}, "null"),
        ({"Origin": f"http://127.0.0.1:{PORT}/x"}, f"http://127.0.0.1:{PORT}/x"),
        ({"Origin": f"ftp://127.0.0.1:{PORT}"}, f"ftp://127.0.0.1:{PORT}"),
        ({"Sec-Fetch-Site": "cross-site"}, "Sec-Fetch-Site: cross-site"),
        ({"Sec-Fetch-Site": "same-site"}, "Sec-Fetch-Site: same-site"),
        (
            {"Origin": f"http://127.0.0.1:{PORT}", "Sec-Fetch-Site": "cross-site"},
            "Sec-Fetch-Site: cross-site",
        ),
    ],
)
def test_cross_origin_requests_are_refused_even_with_the_token(site, engine, logs, headers, value):
    """
    Even a request that carries the token and JSON is refused from another
    origin: nothing but the dashboard's own page is a browser client.
    """
    alice = connect(engine, "alice")
    for method, path, body in [
        ("GET", "/api/sessions", b""),
        ("POST", "/api/users/alice/kick", b"{}"),
    ]:
        response = send(
            site, method, path, body,
            {**headers, "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )  # fmt: skip
        assert response.status == 403 and response.body["error"] == "cross_origin"
    assert not alice.closing
    refusals = logs.esf("admin_request_refused")
    assert [(r["check"], r["value"], r["status"]) for r in refusals] == [
        ("origin", value, 403)
    ] * 2


def test_two_origin_headers_are_refused(site):
    response = send(
        site, "GET", "/api/info", headers={"Origin": f"http://127.0.0.1:{PORT}", "origin": "http://evil.example",
                                           "Authorization": f"Bearer {TOKEN}"},
    )  # fmt: skip
    assert response.status == 403


# -- changes: a token, and JSON ---------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "application/jsonx", "text/json"],
)
def test_a_change_is_json_or_415(site, engine, logs, content_type):
    alice = connect(engine, "alice")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = send(site, "POST", "/api/users/alice/notice", b'{"text": "x"}', headers)
    assert response.status == 415 and response.body["error"] == "unsupported_media_type"
    assert notices(alice) == []
    (refusal,) = logs.esf("admin_request_refused")
    assert (refusal["check"], refusal["value"]) == ("content_type", content_type or "")
    assert logs.esf("admin_action") == []


@pytest.mark.parametrize("content_type", ["application/json", "Application/JSON; charset=utf-8"])
def test_json_content_types(site, engine, content_type):
    alice = connect(engine, "alice")
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": content_type}
    assert send(site, "POST", "/api/users/alice/notice", b'{"text": "x"}', headers).status == 200
    assert len(notices(alice)) == 1


def test_reading_needs_no_content_type(site):
    assert (
        send(site, "GET", "/api/info", headers={"Authorization": f"Bearer {TOKEN}"}).status == 200
    )


# -- the log ----------------------------------------------------------------------------


def test_refusals_logged_are_bounded(site, engine, logs):
    for _ in range(REFUSALS_LOGGED + 30):
        assert send(site, "GET", "/api/info", headers=CROSS_SITE).status == 403
        assert send(site, "GET", "/api/info", host="evil.example").status == 403
        assert send(site, "GET", "/api/info").status == 401
    # The refusals of the checks share a bound; a bad token has its own.
    assert len(logs.esf("admin_request_refused")) == REFUSALS_LOGGED
    assert len(logs.esf("admin_auth_failed")) == REFUSALS_LOGGED
    engine.clock.advance(61)
    send(site, "GET", "/api/info", headers=CROSS_SITE)
    assert len(logs.esf("admin_request_refused")) == REFUSALS_LOGGED + 1


def test_a_long_header_is_logged_cut(open_site, logs):
    send(open_site, "GET", "/api/info", host="a" * 5000)
    (refusal,) = logs.esf("admin_request_refused")
    assert refusal["value"] == "a" * 200


# -- the Server header ------------------------------------------------------------------


def test_the_admin_site_does_not_name_its_software(site):
    for path in ("/api/info", "/api/nothing", "/dashboard", "/dashboard.js", "/", "/nothing"):
        response = send(site, "GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert "server" not in response.headers, (path, response.headers["server"])
        assert response.headers["date"]  # the other default headers stay
    assert send(site, "GET", "/nothing").status == 404
    response = send(site, "OPTIONS", "*")
    assert response.status == 200 and "server" not in response.headers


def test_the_metrics_site_does_not_name_its_software(engine):
    from esf.operations._metrics import MetricsService

    service = MetricsService(engine, endpoint=None)
    site = service.listener.factory
    site.reactor = engine.clock
    service.metrics.start()
    try:
        response = send(site, "GET", "/metrics")
    finally:
        service.metrics.stop()
    assert response.status == 200 and b"esf_connections" in response.raw
    assert "server" not in response.headers


def test_request_policy_without_a_token_is_read_only():
    assert RequestPolicy(None).read_only and not RequestPolicy(TOKEN).read_only
