"""
The support desk (support_desk.py) tested under trial:

    PYTHONPATH=docs/examples python -m twisted.trial test_support_desk_trial
"""

from support_desk import AGENTS, ASK, CHAT, NEW_TICKET, SupportDesk
from twisted.trial.unittest import SynchronousTestCase

from esf import DisconnectedType, ErrorCode, LogonFailed, RequestError, ServerConfig
from esf.testing import LogCapture, MemoryServer, record_events


class SupportDeskTests(SynchronousTestCase):
    def setUp(self):
        self.desk = SupportDesk(
            {"alice": "pa", "bob": "pb", "ann": "agent-a", "art": "agent-b"},
            agents={"ann", "art"},
            banned={"mallory"},
        )
        config = ServerConfig(heartbeat_interval=10, heartbeat_timeout=30)
        self.server = MemoryServer(self.desk, config=config)
        self.addCleanup(self.server.close)

    def test_banned_user_is_refused_with_a_cause(self):
        mallory = self.server.client("mallory", "anything")
        error = self.server.failure(mallory.logon(), LogonFailed)
        self.assertEqual(error.cause, "mallory is banned")
        # A refusal is not an error: trial would fail this test if it had
        # been logged as one.

    def test_wrong_password(self):
        error = self.server.failure(self.server.client("alice", "nope").logon(), LogonFailed)
        self.assertEqual(error.cause, "invalid user ID or password")

    def test_a_question_opens_a_ticket_and_tells_the_agents(self):
        ann = self.server.logged_on("ann", "agent-a")
        told = record_events(ann, "information_received")
        alice = self.server.logged_on("alice", "pa")
        answer = self.server.result(alice.query("_0", ASK, b"my printer is on fire"))
        self.assertEqual(answer, b"ticket 1")
        [(sender, _, kind, payload)] = told.of("information_received")
        self.assertEqual(
            (sender, kind, payload), ("_0", NEW_TICKET, b"1: alice: my printer is on fire")
        )

    def test_an_empty_question_is_a_bad_request(self):
        alice = self.server.logged_on("alice", "pa")
        error = self.server.failure(alice.query("_0", ASK, b"  "), RequestError)
        self.assertEqual((error.code, error.text), (ErrorCode.BAD_REQUEST, "ask a question"))

    def test_chat(self):
        alice = self.server.logged_on("alice", "pa")
        ann = self.server.logged_on("ann", "agent-a")
        heard = record_events(ann, "information_received")
        alice.send("ann", CHAT, b"hello")
        self.server.pump()
        self.assertEqual(heard.of("information_received")[0][2:], (CHAT, b"hello"))

    def test_agents_broadcast_to_each_other_and_customers_may_not(self):
        ann = self.server.logged_on("ann", "agent-a")
        art = self.server.logged_on("art", "agent-b")
        alice = self.server.logged_on("alice", "pa")
        heard = record_events(art, "broadcast_received")
        self.server.result(ann.broadcast(AGENTS, CHAT, b"I take ticket 1"))
        self.assertEqual(
            heard.of("broadcast_received"), [("ann", AGENTS, CHAT, b"I take ticket 1")]
        )
        error = self.server.failure(alice.broadcast(AGENTS, CHAT, b"hi all"), RequestError)
        self.assertEqual(error.code, ErrorCode.NOT_AUTHORIZED)

    def test_event_log_of_connects_push_outs_and_kicks(self):
        ann = self.server.logged_on("ann", "agent-a")
        alice = self.server.logged_on("alice", "pa")
        pushed = record_events(alice, "being_pushed_out")
        # alice logs on again from another machine: the first session is pushed out.
        alice_again = self.server.logged_on("alice", "pa", host="192.0.2.7")
        new_address = self.server.connection(alice_again).address
        self.assertEqual(len(pushed.of("being_pushed_out")), 1)
        self.assertFalse(alice.logged_on)
        # An agent kicks her.
        kicked = record_events(alice_again, "being_kicked_out")
        self.server.result(ann.kick_out("alice", "rude"))
        self.assertEqual(kicked.of("being_kicked_out"), [("ann", "rude")])
        self.assertFalse(alice_again.logged_on)
        self.assertEqual(
            self.desk.events,
            [
                ("connect", "ann"),
                ("connect", "alice"),
                ("push_out", "alice", new_address),
                ("disconnect", "alice", "BEING_PUSHED_OUT"),
                ("connect", "alice"),
                ("kick", "alice", "ann", "rude"),
                ("disconnect", "alice", "BEING_KICKED_OUT"),
            ],
        )

    def test_a_vanished_customer_is_dropped_after_the_heartbeat_timeout(self):
        alice = self.server.logged_on("alice", "pa")
        users = record_events(self.server.engine.user_manager, "device_disconnected")
        with LogCapture() as logs:
            # Her machine vanishes: nothing moves, nobody is told.
            self.server.connection(alice).freeze()
            alice.close()
            self.server.advance(29)
            self.assertEqual(users.events, [])
            self.server.advance(20)
        [(user, why)] = users.of("device_disconnected")
        self.assertEqual((user.user_id, why), ("alice", DisconnectedType.HEARTBEAT_TIMEOUT))
        [ended] = logs.esf_events("session_ended")
        self.assertEqual(ended["reason"], "HEARTBEAT_TIMEOUT")
        self.assertIn(("disconnect", "alice", "HEARTBEAT_TIMEOUT"), self.desk.events)
