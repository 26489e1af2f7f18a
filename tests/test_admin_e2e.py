"""
End-to-end tests of operations: a real C{twistd esf} with C{--metrics},
C{--admin-api}, C{--admin-token-file} and C{--audit-log}, driven over real
HTTP (urllib) and real ESF sessions (the raw-socket client).

Every wait is bounded by the wall clock (see test_e2e.py).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import rawclient as rc
from prometheus_client.parser import text_string_to_metric_families
from test_e2e import REPO, ServerProcess, server_env, start_server, twistd_command
from test_tls import make_certificate, ssl_endpoint_string
from twisted.logger import eventsFromJSONLogFile

pytestmark = pytest.mark.e2e

TOKEN = "e2e-admin-token-0123456789abcdef"
AUTH = ["--auth", "memory:alice:pa:bob:pb:carol:pc:dave:pd", "--admin", "carol"]
BEING_KICKED_OUT = 9


def site_port(server: ServerProcess, site: str) -> int:
    """The port C{site} ("admin-api", "metrics") listens on, from the port file."""
    return int(server.ports[site][0]["port"])


class Ops:
    """The server and how to reach its HTTP sides."""

    def __init__(self, server, audit_path, scheme="http", context=None):
        self.server = server
        self.audit_path = audit_path
        self.admin = f"{scheme}://127.0.0.1:{site_port(server, 'admin-api')}"
        self.context = context
        metrics_port = site_port(server, "metrics") if "metrics" in server.ports else None
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else None

    def call(self, method, path, body=None, token=TOKEN):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(
            self.admin + path, data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=5, context=self.context) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as e:
            with e:
                return e.code, json.load(e)

    def metrics(self):
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            text = response.read().decode("utf-8")
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
        return samples

    def audit(self):
        with open(self.audit_path) as f:
            return list(eventsFromJSONLogFile(f))


def token_file(directory):
    path = directory / "admin.token"
    path.write_text(TOKEN + "\n")
    os.chmod(path, 0o600)
    return path


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ops")
    audit_path = directory / "audit.jsonl"
    server = start_server(
        directory / "server.log",
        AUTH
        + [
            "--metrics", "tcp:0:interface=127.0.0.1",
            "--admin-api", "tcp:0:interface=127.0.0.1",
            "--admin-token-file", str(token_file(directory)),
            "--audit-log", str(audit_path),
        ],
    )  # fmt: skip
    yield Ops(server, audit_path)
    server.stop()


@pytest.fixture
def clients():
    made = []

    def logged_on(ops, user, password, client_type=0):
        client = rc.connect(ops.server.port)
        made.append(client)
        reply = client.logon(user, password, client_type)
        assert reply["result"] == 0, reply
        return client

    yield logged_on
    for client in made:
        client.close()


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    assert predicate()


def test_401_without_the_token(ops):
    for token in (None, "not-the-token"):
        status, body = ops.call("GET", "/api/info", token=token)
        assert status == 401 and body["error"] == "unauthorized"
        status, body = ops.call("POST", "/api/broadcast", {"text": "x"}, token=token)
        assert status == 401
    assert ops.call("GET", "/api/info")[0] == 200


def test_kick_with_a_reason_reaches_the_client_counted_and_audited(ops, clients):
    before = ops.metrics()
    alice = clients(ops, "alice", "pa", 5)
    refused = rc.connect(ops.server.port)
    assert refused.logon("bob", "wrong")["result"] == 1
    refused.close()

    status, user = ops.call("GET", "/api/users/alice")
    assert status == 200
    (device,) = user["devices"]
    assert device["kind"] == "android"
    assert device["address"] == f"127.0.0.1:{alice.sock.getsockname()[1]}"

    status, body = ops.call("POST", "/api/users/alice/kick", {"reason": "flooding the lobby"})
    assert (status, body) == (200, {"user_id": "alice", "kicked": 1})
    _header, payload = alice.recv_until(rc.KICKED_OUT)
    assert rc.parse_kicked_out(payload) == {"operator": "#admin", "reason": "flooding the lobby"}
    _header, payload = alice.recv_until(rc.DISCONNECT)
    assert rc.parse_disconnect_notice(payload)["type"] == BEING_KICKED_OUT
    assert alice.recv_frame() is None

    assert ops.call("POST", "/api/users/alice/kick", {"reason": "again"})[0] == 404

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return ops.metrics()[key] - before.get(key, 0)

    wait_for(lambda: delta("esf_disconnects_total", reason="being_kicked_out") == 1)
    assert delta("esf_logons_total", result="succeed") == 1
    assert delta("esf_logons_total", result="failed") == 1
    assert delta("esf_disconnects_total", reason="logon_failed") == 1
    assert delta("esf_kicks_total", origin="admin_api") == 1
    assert delta("esf_devices_online", kind="android") == 0
    assert ops.metrics()["process_open_fds", ()] > 0

    wait_for(lambda: any(e["audit"] == "admin" and e.get("status") == 404 for e in ops.audit()))
    records = [e for e in ops.audit() if e.get("user_id") in ("alice", "bob")]
    assert [r["audit"] for r in records] == ["logon", "logon_refused", "kick", "admin", "admin"]
    logon, refusal, kick, action, again = records
    assert logon["client_type"] == 5 and logon["address"] == device["address"]
    assert (refusal["result"], refusal["cause"]) == ("FAILED", "invalid user ID or password")
    assert (kick["operator"], kick["origin"], kick["reason"], kick["count"]) == (
        "#admin", "admin_api", "flooding the lobby", 1,
    )  # fmt: skip
    assert (action["action"], action["status"], action["reason"]) == (
        "kick",
        200,
        "flooding the lobby",
    )
    assert action["peer"].startswith("127.0.0.1:")
    assert (again["action"], again["status"]) == ("kick", 404)


def test_client_kick_and_push_out_are_audited(ops, clients):
    carol = clients(ops, "carol", "pc")
    clients(ops, "dave", "pd", 4)
    dave_again = clients(ops, "dave", "pd", 4)  # pushes the first out
    carol.send(rc.KICK_OUT, rc.pack_str("bye"), dest="dave", msg_id=5)
    _header, body = carol.recv_until(rc.KICK_OUT)
    assert rc.parse_kick_out_reply(body)["ok"] == 1
    assert rc.parse_kicked_out(dave_again.recv_until(rc.KICKED_OUT)[1])["operator"] == "carol"
    wait_for(lambda: any(e["audit"] == "kick" and e["user_id"] == "dave" for e in ops.audit()))
    (push,) = [e for e in ops.audit() if e["audit"] == "push_out" and e["user_id"] == "dave"]
    assert push["new_address"] == f"127.0.0.1:{dave_again.sock.getsockname()[1]}"
    (kick,) = [e for e in ops.audit() if e["audit"] == "kick" and e["user_id"] == "dave"]
    assert (kick["operator"], kick["origin"], kick["reason"]) == ("carol", "client", "bye")


def test_notice_and_broadcast_reach_clients(ops, clients):
    bob = clients(ops, "bob", "pb", 0)
    status, body = ops.call(
        "POST", "/api/users/bob/notice", {"text": "restart at 22:00", "information_type": 42}
    )
    assert (status, body) == (200, {"user_id": "bob", "devices": 1})
    header, payload = bob.recv_until(202)
    assert header["user_id"] == "_0"
    assert payload == (42).to_bytes(4, "little", signed=True) + b"restart at 22:00"
    status, body = ops.call("POST", "/api/broadcast", {"payload_hex": "cafe"})
    assert status == 200 and body["devices"] >= 1
    header, payload = bob.recv_until(202)
    assert payload == b"\x00\x00\x00\x00\xca\xfe"
    wait_for(lambda: any(e.get("payload") == "cafe" for e in ops.audit()))  # bytes as hex


def test_sessions_listing_and_errors(ops, clients):
    clients(ops, "bob", "pb", 4)
    status, page = ops.call("GET", "/api/sessions?user=bob&kind=ios")
    assert status == 200 and [s["kind"] for s in page["sessions"]] == ["ios"]
    assert ops.call("GET", "/api/sessions?limit=0")[0] == 400
    assert ops.call("GET", "/api/users/bob/kick")[0] == 405
    assert ops.call("GET", "/api/nothing")[0] == 404
    status, info = ops.call("GET", "/api/info")
    assert info["users_online"] >= 1 and info["options"]["admins"] == ["carol"]


def test_an_oversized_body_gets_413(ops):
    port = int(ops.admin.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"POST /api/broadcast HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + TOKEN.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"
        )
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    assert response.startswith(b"HTTP/1.1 413 ")
    assert b"too_large" in response


def test_non_loopback_admin_api_without_a_token_is_refused(tmp_path):
    command = twistd_command() + ["-n", "--pidfile=", "--logfile=-", "esf"]
    result = subprocess.run(
        command + ["--port", "tcp:0:interface=127.0.0.1", "--admin-api", "tcp:0"],
        cwd=REPO,
        env=server_env(),
        capture_output=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert b"--admin-api 'tcp:0' is reachable from other machines" in result.stderr + result.stdout


def test_admin_api_over_tls(tmp_path):
    cert_path, key_path, _ = make_certificate(tmp_path)
    server = start_server(
        tmp_path / "server.log",
        [
            "--admin-api", ssl_endpoint_string(cert_path, key_path),
            "--admin-token-file", str(token_file(tmp_path)),
        ],
    )  # fmt: skip
    try:
        context = ssl.create_default_context(cafile=str(cert_path))
        ops = Ops(server, None, scheme="https", context=context)
        ops.admin = ops.admin.replace("127.0.0.1", "localhost")
        status, info = ops.call("GET", "/api/info")
        assert status == 200 and info["connections"] == 0
        assert ops.call("GET", "/api/info", token=None)[0] == 401
        with pytest.raises((OSError, http.client.HTTPException)):  # no plain HTTP there
            urllib.request.urlopen(ops.admin.replace("https", "http") + "/api/info", timeout=5)
    finally:
        server.stop()
