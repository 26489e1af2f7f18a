"""
A small chat server: rooms are groups, an echo query, and C{/kick} for
administrators.  Run it with::

    twistd -n esf --handler esf.examples.chat:handler

and with its web page (C{esf/web/chat.html}, served at C{/})::

    twistd -n esf --handler esf.examples.chat:handler --websocket tcp:4531 --web-demo

This is a demonstration: every logon is accepted, so anyone may log on as
C{admin}.  A real application checks passwords in C{verify_user}.

Every application message body is C{i32 information_type} + payload; the
information types below are this application's own numbers.
"""

from zope.interface import implementer

from esf.interfaces import IBasicHandler, ICustomizeHandler, IEngineAware, IGroupManager

#: Send (202) or SendCertainly (205) to C{_0}; payload: the room name, UTF-8.
JOIN = 1
#: Send (202) or SendCertainly (205) to C{_0}; payload: the room name, UTF-8.
LEAVE = 2
#: Broadcast (601) to the room name; payload: the text.  Only members may.
SAY = 3
#: Request (203) to C{_0}; the Response carries the request's payload back.
ECHO = 4
#: Send (202) or SendCertainly (205) to C{_0}; payload: C{"/kick USER [reason]"}.
#: Only administrators may; use SendCertainly to learn whether it worked.
COMMAND = 5
#: Send (202) to a user: a private message; payload: the text.  The server
#: relays it as it is; the receiving client shows it.
TELL = 6


@implementer(IBasicHandler, ICustomizeHandler, IGroupManager, IEngineAware)
class ChatApplication:
    """
    Keeps the rooms (room name -> member user IDs) in memory.
    """

    def __init__(self, admins=("admin",)):
        self.admins = frozenset(admins)
        self.rooms: dict[str, set[str]] = {}
        self.engine = None

    # IEngineAware

    def initialize(self, engine):
        self.engine = engine
        engine.user_manager.user_disconnected.subscribe(self.user_left)

    def user_left(self, user_data, disconnected_type):
        """
        A user's last device went offline: it leaves every room.
        """
        for room in list(self.rooms):
            self._leave(user_data.user_id, room)

    # IBasicHandler

    def verify_user(self, system_token, user_id, password, client_type, address):
        return True

    def can_kick_out(self, operator_id, target_id, client_type):
        return operator_id in self.admins

    # ICustomizeHandler

    def handle_information(self, user_id, client_type, information_type, payload):
        text = payload.decode("utf-8")
        if information_type == JOIN:
            self._check_room(text)
            self.rooms.setdefault(text, set()).add(user_id)
        elif information_type == LEAVE:
            self._leave(user_id, text)
        elif information_type == COMMAND:
            self._command(user_id, text)
        else:
            raise ValueError(f"unknown information type {information_type}")

    def handle_query(self, user_id, client_type, information_type, payload):
        if information_type == ECHO:
            return payload
        raise ValueError(f"unknown query type {information_type}")

    # IGroupManager

    def get_members(self, group_id):
        return sorted(self.rooms.get(group_id, ()))

    def can_broadcast(self, user_id, group_id):
        if group_id == "*":
            return user_id in self.admins
        return user_id in self.rooms.get(group_id, ())

    # the rest

    def _check_room(self, room):
        slot = self.engine.config.wire.id_slot if self.engine else 11
        if not room or room in ("_0", "*") or len(room.encode("utf-8")) > slot:
            raise ValueError(f"{room!r} is not a room name (1..{slot} bytes, not _0 or *)")

    def _leave(self, user_id, room):
        members = self.rooms.get(room)
        if members is not None:
            members.discard(user_id)
            if not members:
                del self.rooms[room]

    def _command(self, user_id, text):
        words = text.split(maxsplit=2)
        if len(words) < 2 or words[0] != "/kick":
            raise ValueError("usage: /kick USER [reason]")
        if user_id not in self.admins:
            raise PermissionError("only administrators may /kick")
        reason = words[2] if len(words) > 2 else ""
        if not self.engine.kick_out(words[1], reason, operator=user_id):
            raise LookupError(f"{words[1]} is not online")


#: The object C{twistd esf --handler esf.examples.chat:handler} loads.
handler = ChatApplication()
