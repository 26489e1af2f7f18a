"""
An example of a relogon mode per user and device kind, and of a relay
policy: an IoT hub whose devices (C{dev-<serial>}) reconnect over flaky
links and must replace their own stale sessions, while its operators
(C{op-<name>}) must not be pushed out by a second login with their
account; devices may talk to operators only, operators to anyone.

Run it with C{twistd}, with this directory on the import path::

    PYTHONPATH=docs/examples twistd -n esf --port tcp:4530 --handler iot_hub:handler

A second logon of C{dev-7} replaces the first; a second logon of C{op-ann}
from the same device kind is refused with C{HadLoggedOn}, and the hub logs
who tried.  A device's message to another device is refused: a request
with C{Error(NotAuthorized, "devices may talk to operators only")}.
"""

from twisted.logger import Logger
from zope.interface import implementer

from esf import ClientType, LogonRefused, RelayRefused, RelogonMode
from esf.interfaces import IBasicHandler, IEngineAware, IRelayPolicy, IRelogonPolicy

log = Logger(namespace="iot_hub")

#: Operators' passwords.  A real hub asks its user database.
OPERATORS = {"op-ann": "pa", "op-bob": "pb"}
#: Device serial -> its token.
DEVICES = {"7": "t7", "8": "t8"}


@implementer(IBasicHandler, IRelogonPolicy, IRelayPolicy, IEngineAware)
class Hub:
    """
    Operators log on with a password, devices with their token; each kind
    of account has the relogon mode it needs, and devices talk to
    operators only.
    """

    # IBasicHandler

    def verify_user(self, system_token, user_id, password, client_type, address):
        if user_id.startswith("dev-"):
            return DEVICES.get(user_id[4:]) == password
        if user_id in OPERATORS:
            return OPERATORS[user_id] == password
        raise LogonRefused(f"no such account: {user_id}")

    def can_kick_out(self, operator_id, target_id, client_type):
        # Operators may kick devices (a device stuck in a bad state).
        return operator_id.startswith("op-") and target_id.startswith("dev-")

    # IRelogonPolicy: asked for every logon verify_user accepted.

    def relogon_mode(self, user_id, client_type):
        if user_id.startswith("op-") and client_type != ClientType.WEBSOCKET:
            # A second operator console must not take the first one's place.
            return RelogonMode.IGNORE_NEW
        # Devices, and operators' browser tabs: the newest connection wins.
        return RelogonMode.REPLACE_OLD

    # IRelayPolicy: asked for every frame a user sends another user (or a
    # group), answers excepted.

    def may_relay(self, sender, receiver, message_type, information_type):
        if sender.startswith("op-") or receiver.startswith("op-"):
            return True  # operators talk to anyone, devices to operators
        raise RelayRefused("devices may talk to operators only")

    # IEngineAware

    def initialize(self, engine):
        engine.user_manager.new_connection_ignored.subscribe(self.ignored)

    def ignored(self, user_id, client_type, address):
        log.warn(
            "{user_id} is already logged on; refused a second logon from {address}",
            user_id=user_id,
            address=address,
        )


#: The object C{twistd esf --handler iot_hub:handler} loads.
handler = Hub()
