"""
An example esf server application: a fixed table of users, a moderator
who may kick, and a log line whenever a user comes online or leaves.

Run it on its own (it builds the engine and the service itself)::

    python docs/examples/server_app.py 4530

or let C{twistd} build the server and hand it the application object, with
this directory on the import path::

    PYTHONPATH=docs/examples twistd -n esf --port tcp:4530 --handler server_app:handler
"""

import sys

from twisted.logger import Logger
from zope.interface import implementer

from esf import LogonRefused, ServerConfig, ServerEngine, ServerService
from esf.interfaces import IBasicHandler, IEngineAware

log = Logger(namespace="server_app")

#: user ID -> password.  A real application asks its user database.
USERS = {"alice": "pa", "bob": "pb", "carol": "pc"}


@implementer(IBasicHandler, IEngineAware)
class ExampleApplication:
    """
    Decides who may log on and who may kick; logs users coming and going.
    """

    def __init__(self, users, moderators=()):
        self.users = dict(users)
        self.moderators = frozenset(moderators)
        self.engine = None

    # IBasicHandler

    def verify_user(self, system_token, user_id, password, client_type, address):
        expected = self.users.get(user_id)
        if expected is None:
            # The client sees this cause in its Logon reply.
            raise LogonRefused(f"no such user: {user_id}")
        # False refuses with a generic cause ("invalid user ID or password").
        return password == expected

    def can_kick_out(self, operator_id, target_id, client_type):
        # Moderators may kick ordinary users, not each other.
        return operator_id in self.moderators and target_id not in self.moderators

    # IEngineAware: called once with the engine, before any connection.

    def initialize(self, engine):
        self.engine = engine
        users = engine.user_manager
        users.user_connected.subscribe(self.user_connected)
        users.user_disconnected.subscribe(self.user_disconnected)

    # user manager events

    def user_connected(self, user_data):
        log.info(
            "{user_id} is online (device {client_type}, from {address})",
            user_id=user_data.user_id,
            client_type=user_data.client_type,
            address=user_data.address,
        )

    def user_disconnected(self, user_data, disconnected_type):
        log.info(
            "{user_id} is offline: {reason}",
            user_id=user_data.user_id,
            reason=disconnected_type.name,
        )


#: The object C{twistd esf --handler server_app:handler} loads.
handler = ExampleApplication(USERS, moderators={"carol"})


def make_service(reactor, endpoint_string):
    """
    Build the engine, give it the application, and wrap both in a service
    that listens on C{endpoint_string} (e.g. C{"tcp:4530"}).
    """
    from twisted.internet import endpoints

    app = ExampleApplication(USERS, moderators={"carol"})
    config = ServerConfig(heartbeat_interval=10, heartbeat_timeout=30, logon_timeout=10)
    engine = ServerEngine(config, clock=reactor, handler=app)
    app.initialize(engine)
    endpoint = endpoints.serverFromString(reactor, endpoint_string)
    return ServerService(engine, endpoint)


def main(argv):
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    port = argv[1] if len(argv) > 1 else "4530"
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    service = make_service(reactor, f"tcp:{port}")
    service.startService()
    # Stopping the service sends every session DisconnectNotice(ServerShutdown)
    # and waits for the connections to close; the reactor waits for it.
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv)
