"""
A small support desk on esf, the application that docs/testing.md tests.

Customers and agents log on with a password; banned users are refused with
a cause they see.  A customer asks the desk a question (a request to the
server, information type ASK): the desk opens a ticket, answers with its
number and tells every agent online (NEW_TICKET).  Users chat with each
other directly (CHAT, relayed by the server).  Agents talk among themselves
with a broadcast to the group "agents", and may kick customers.  The desk
keeps an event log of connects, push-outs, kicks and disconnects.

Run it::

    PYTHONPATH=docs/examples twistd -n esf --port 4530 --handler support_desk:desk
"""

from zope.interface import implementer

from esf import ErrorCode, LogonRefused, RequestError
from esf.interfaces import IBasicHandler, ICustomizeHandler, IEngineAware, IGroupManager

#: Information types.
ASK = 1  # customer -> desk (a request): the question; the answer names the ticket
NEW_TICKET = 2  # desk -> agents: "<ticket>: <customer>: <question>"
CHAT = 3  # user -> user

AGENTS = "agents"


@implementer(IBasicHandler, ICustomizeHandler, IGroupManager, IEngineAware)
class SupportDesk:
    """
    @ivar events: the event log, tuples such as C{("connect", "alice")},
        C{("push_out", "alice", new_address)}, C{("kick", "alice",
        operator, reason)}, C{("disconnect", "alice", reason_name)}.
    @ivar tickets: C{(customer, question)}, ticket 1 first.
    """

    def __init__(self, passwords, agents, banned=()):
        self.passwords = dict(passwords)
        self.agents = frozenset(agents)
        self.banned = set(banned)
        self.events = []
        self.tickets = []
        self.engine = None

    # IBasicHandler

    def verify_user(self, system_token, user_id, password, client_type, address):
        if user_id in self.banned:
            raise LogonRefused(f"{user_id} is banned")
        return self.passwords.get(user_id) == password

    def can_kick_out(self, operator_id, target_id, client_type):
        return operator_id in self.agents and target_id not in self.agents

    # ICustomizeHandler

    def handle_information(self, user_id, client_type, information_type, payload):
        pass  # the desk takes questions as requests only

    def handle_query(self, user_id, client_type, information_type, payload):
        if information_type != ASK:
            raise RequestError(ErrorCode.BAD_REQUEST, f"no request of type {information_type}")
        question = payload.decode("utf-8").strip()
        if not question:
            raise RequestError(ErrorCode.BAD_REQUEST, "ask a question")
        self.tickets.append((user_id, question))
        ticket = len(self.tickets)
        for agent in sorted(self.agents):
            self.engine.send(agent, NEW_TICKET, f"{ticket}: {user_id}: {question}".encode())
        return f"ticket {ticket}".encode()

    # IGroupManager

    def get_members(self, group_id):
        return sorted(self.agents) if group_id == AGENTS else []

    def can_broadcast(self, user_id, group_id):
        return group_id == AGENTS and user_id in self.agents

    # IEngineAware

    def initialize(self, engine):
        self.engine = engine
        users = engine.user_manager
        users.device_connected.subscribe(
            lambda user: self.events.append(("connect", user.user_id))
        )
        users.device_being_pushed_out.subscribe(
            lambda user, new_address: self.events.append(("push_out", user.user_id, new_address))
        )
        users.device_kicked_out.subscribe(
            lambda user, operator, reason: self.events.append(
                ("kick", user.user_id, operator, reason)
            )
        )
        users.device_disconnected.subscribe(
            lambda user, why: self.events.append(("disconnect", user.user_id, why.name))
        )


#: The object C{twistd esf --handler support_desk:desk} loads.
desk = SupportDesk(
    {"alice": "pa", "bob": "pb", "ann": "agent-a", "art": "agent-b"},
    agents={"ann", "art"},
    banned={"mallory"},
)
