"""
The support desk (support_desk.py) end to end, under trial: a real
C{twistd esf} started and stopped without blocking the reactor.

    PYTHONPATH=docs/examples python -m twisted.trial test_support_desk_twistd_trial
"""

from pathlib import Path

from support_desk import ASK
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase

from esf import ClientEngine
from esf.testing import TwistdServer

EXAMPLES = Path(__file__).resolve().parent


class SupportDeskProcessTests(TestCase):
    def setUp(self):
        self.server = TwistdServer(
            ["--handler", "support_desk:desk"], python_path=[EXAMPLES], directory=self.mktemp()
        )
        self.addCleanup(self.server.stop_deferred)  # fails the test unless it stops cleanly
        return self.server.start_deferred()

    @inlineCallbacks
    def test_a_question_opens_a_ticket(self):
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.server.port)
        alice = ClientEngine(endpoint, "alice", "pa", clock=reactor)
        yield alice.logon()
        answer = yield alice.query("_0", ASK, b"my printer is on fire")
        self.assertEqual(answer, b"ticket 1")
        yield alice.logoff()
