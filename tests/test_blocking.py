"""
The blocking facade, run in a subprocess (this process may have a reactor
of its own): a server and two L{BlockingClient}s share the facade's reactor
thread, and the clients are used from several threads at once.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    r"""
    import sys, threading, time

    from twisted.internet import endpoints, reactor
    from zope.interface import implementer

    from esf import (
        ClientType, ErrorCode, LogonFailed, LogonRefused, NotConnected, RequestError,
        ServerConfig, ServerEngine, ServerFactory, WireConfig,
    )
    from esf.client.blocking import BlockingClient, call_in_reactor, reactor_thread
    from esf.interfaces import IBasicHandler, ICustomizeHandler, IGroupManager
    from esf.offline import MemoryOfflineStore


    @implementer(IBasicHandler, IGroupManager)
    class App:
        def verify_user(self, system_token, user_id, password, client_type, address):
            if password != "pw":
                raise LogonRefused("wrong password")
            return True

        def can_kick_out(self, operator_id, target_id, client_type):
            return operator_id == "alice"

        def get_members(self, group_id):
            return ["alice", "bob"]

        def can_broadcast(self, user_id, group_id):
            return True


    @implementer(ICustomizeHandler)
    class Echo:
        def __init__(self):
            self.got = []

        def handle_information(self, user_id, client_type, information_type, payload):
            self.got.append((user_id, information_type, payload))

        def handle_query(self, user_id, client_type, information_type, payload):
            return b"echo:" + payload


    def start_server():
        app = App()
        engine = ServerEngine(
            ServerConfig(wire=WireConfig(11, 4096)),
            clock=reactor, handler=app, group_manager=app, customize_handler=Echo(),
            offline_store=MemoryOfflineStore(),
        )
        engine.start()
        endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        d = endpoint.listen(ServerFactory(engine))
        return d.addCallback(lambda port: (engine, port, port.getHost().port))

    assert reactor_thread() is not threading.current_thread()
    engine, listener, port = call_in_reactor(start_server)
    wire = WireConfig(11, 4096)

    try:
        BlockingClient("127.0.0.1", port, "mallory", "nope", wire=wire).logon()
    except LogonFailed as e:
        print("refused", e.result.name, e.cause)

    bob_handler = Echo()
    alice = BlockingClient("127.0.0.1", port, "alice", "pw", wire=wire, timeout=5)
    bob = BlockingClient("127.0.0.1", port, "bob", "pw", ClientType.ANDROID, handler=bob_handler, wire=wire)
    events = []
    alice.subscribe("being_kicked_out", lambda *a: events.append(("alice kicked",) + a))
    bob.subscribe("being_kicked_out", lambda *a: events.append(("bob kicked",) + a))
    bob.subscribe("broadcast_received", lambda *a: events.append(("broadcast",) + a))
    print("logon", alice.logon().succeeded, bob.logon().succeeded)
    print("online", alice.get_all_online_users())
    print("is_user_online", alice.is_user_online("bob"), alice.is_user_online("zed"))
    print("query_onlines", alice.query_onlines(["bob", "zed"]))
    print("devices", [int(k) for k in bob.get_my_devices()])
    print("ipe", alice.get_my_ipe().startswith("127.0.0.1:"))
    print("ping", 0 <= alice.ping() < 5, 0 <= alice.ping_by_server("bob") < 5)

    # A server that does not read (as the transport pausing the client shows):
    # the wait for the drain ends with TIMEOUT, not with the connection.
    call_in_reactor(lambda: alice.engine.connection.pauseProducing())
    try:
        alice.wait_for_drain(timeout=0.1)
    except RequestError as e:
        print("drain", e.code.name, alice.logged_on)
    call_in_reactor(lambda: alice.engine.connection.resumeProducing())
    alice.wait_for_drain()

    # Several threads at once, on both clients.
    answers, errors = [], []

    def worker(client, peer, n):
        try:
            for i in range(20):
                text = f"{client.user_id}-{n}-{i}".encode()
                assert client.query(peer, 1, text) == b"echo:" + text
                client.send_certainly(peer, 2, text)
            answers.append(n)
        except Exception as e:
            errors.append(repr(e))

    threads = [
        threading.Thread(target=worker, args=(c, p, n))
        for n in range(4)
        for c, p in ((alice, "bob"), (bob, "_0"))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    print("threads", len(answers), errors)
    print("bob got", len([g for g in bob_handler.got if g[1] == 2]))

    alice.send("bob", 3, b"one-way")
    alice.send_blob("bob", 4, bytes(range(256)) * 40)
    alice.broadcast("room", 5, b"hello room")
    time.sleep(0.2)
    print("bob got", [(u, t, len(p)) for u, t, p in bob_handler.got if t in (3, 4)])

    try:
        alice.query("zed", 1, b"?")
    except RequestError as e:
        print("offline", e.code.name)
    # Stored for a receiver who is offline, or delivered: the call says which.
    print("send_certainly", alice.send_certainly("zed", 6, b"later"), alice.send_certainly("bob", 6, b"now"))
    print("send_blob", alice.send_blob("zed", 7, bytes(10240)), alice.send_blob("bob", 7, bytes(10240)))
    try:
        bob.kick_out("alice", "no")
    except RequestError as e:
        print("kick refused", e.code.name)
    alice.kick_out("bob", "bye")
    time.sleep(0.2)
    try:
        bob.ping()
    except NotConnected:
        print("bob not connected")
    alice.logoff()
    try:
        alice.ping()
    except NotConnected:
        print("alice not connected")
    print("events", events)
    try:
        call_in_reactor(lambda: call_in_reactor(lambda: None))
    except RuntimeError:
        print("no deadlock")
    call_in_reactor(listener.stopListening)
    call_in_reactor(engine.stop)
    print("done")
    """
)


def test_blocking_client(tmp_path):
    script = tmp_path / "blocking_script.py"
    script.write_text(SCRIPT)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines == [
        "refused FAILED wrong password",
        "logon True True",
        "online ['alice', 'bob']",
        "is_user_online True False",
        "query_onlines {'bob': True, 'zed': False}",
        "devices [5]",
        "ipe True",
        "ping True True",
        "drain TIMEOUT True",
        "threads 8 []",
        "bob got 80",
        "bob got [('alice', 3, 7), ('alice', 4, 10240)]",
        "offline USER_OFFLINE",
        "send_certainly stored None",
        "send_blob stored None",
        "kick refused NOT_AUTHORIZED",
        "bob not connected",
        "alice not connected",
        "events [('broadcast', 'alice', 'room', 5, b'hello room'), ('bob kicked', 'alice', 'bye')]",
        "no deadlock",
        "done",
    ], run.stdout + run.stderr
