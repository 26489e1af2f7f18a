"""
The interfaces at which applications plug into an esf server.

An application provides L{IBasicHandler} (who may log on, who may kick
whom), and later L{ICustomizeHandler} and L{IGroupManager}; it reads and
subscribes to L{IUserManager}.  L{IPresence} is the seam between the engine
and the registry of online devices, so that a registry shared by several
nodes can replace the in-process one without touching either side.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Sequence
from enum import Enum
from typing import Any, TypeVar, Union

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from esf.wire._events import IEvent
from esf.wire._frames import DisconnectedType

__all__ = [
    "IBasicHandler",
    "ICustomizeHandler",
    "IGroupManager",
    "IUserManager",
    "IPresence",
    "IDeviceHandle",
    "IEvent",
    "IChannel",
    "IEngineAware",
    "IRelogonPolicy",
    "IRelayPolicy",
    "IOfflineStore",
    "IOfflinePolicy",
]

_T = TypeVar("_T")

#: What an application method may answer with: the value, a Deferred of it,
#: or (from an C{async def}) an awaitable of it.
_Answer = Union[_T, Deferred[_T], Awaitable[_T]]


class RelogonMode(Enum):
    """
    What a second logon of the same user and device kind does.
    """

    #: Keep the session that is on; refuse the new one with C{HadLoggedOn}.
    IGNORE_NEW = "ignore-new"
    #: Push the old session out and bind the new one (the default).
    REPLACE_OLD = "replace-old"


class IBasicHandler(Interface):
    """
    The application's say on logons and kicks (ESFramework's
    C{IBasicHandler}).

    Every method may answer synchronously, with a
    L{twisted.internet.defer.Deferred}, or as a coroutine.
    """

    def verify_user(
        system_token: str, user_id: str, password: str, client_type: int, address: str
    ) -> _Answer[bool]:
        """
        Decide whether C{user_id} may log on.

        @param system_token: the token the client sent (already checked
            against the server's C{--system-token} when one is set).
        @type system_token: L{str}
        @param user_id: who wants to log on.
        @type user_id: L{str}
        @param password: the password the client sent.
        @type password: L{str}
        @param client_type: the device kind (a L{esf.ClientType} value).
        @type client_type: L{int}
        @param address: the peer, C{"host:port"}.
        @type address: L{str}

        @return: C{True} to accept, C{False} to refuse with a generic cause;
            raise L{esf.LogonRefused} to refuse with a cause the client
            sees.  Any other exception refuses the logon, is logged, and the
            client sees a generic cause.
        """

    def can_kick_out(operator_id: str, target_id: str, client_type: int | None) -> _Answer[bool]:
        """
        Decide whether logged-on user C{operator_id} may kick C{target_id}
        (every device when C{client_type} is C{None}, else that device).

        Users listed as administrators (C{--admin}) may always kick; for
        everyone else this method decides.  Return C{False} unless the
        application means otherwise.

        @rtype: L{bool} (or a Deferred or coroutine of one)
        """


class ICustomizeHandler(Interface):
    """
    The application's handler of application messages addressed to the
    server (ESFramework's C{ICustomizeHandler}).
    """

    def handle_information(
        user_id: str, client_type: int, information_type: int, payload: bytes
    ) -> _Answer[object]:
        """
        A one-way message (Send, SendCertainly or a reassembled Blob) from
        C{user_id}'s device C{client_type} arrived.  The return value is
        ignored; a Deferred or coroutine is waited for before an Ack.
        """

    def handle_query(
        user_id: str, client_type: int, information_type: int, payload: bytes
    ) -> _Answer[bytes | None]:
        """
        A Request arrived; return the reply payload (L{bytes}), directly, as
        a Deferred or as a coroutine.  An exception becomes an
        C{Error(HandlerError)} reply carrying its message.
        """


class IGroupManager(Interface):
    """
    Who is in a group (ESFramework's C{IGroupManager}), supplied by the
    application.

    Each Broadcast asks L{can_broadcast} and then L{get_members}, but
    consecutive Broadcasts from one sender to one group in the same read
    are asked about once, together: nothing else runs between them.
    """

    def get_members(group_id: str) -> _Answer[Iterable[str]]:
        """
        The user IDs in C{group_id}: an iterable, or a Deferred or coroutine
        of one.  An unknown group has no members.
        """

    def can_broadcast(user_id: str, group_id: str) -> _Answer[bool]:
        """
        Whether C{user_id} may broadcast to C{group_id} (C{"*"}: every online
        user).  A bool, or a Deferred or coroutine of one.
        """


class IEngineAware(Interface):
    """
    An application object that needs the engine it serves (to kick, push
    messages or read the user manager).
    """

    def initialize(engine: Any) -> None:
        """
        Called once with the L{esf.ServerEngine}, before any connection.

        An application that finds its configuration wrong here (a missing
        file, a bad setting) raises an exception whose message says what to
        change: C{twistd esf} then reports it as one line and exits with
        status 1 before it listens.
        """


class IRelogonPolicy(Interface):
    """
    Decides, per user and device kind, what a second logon of a device
    that is already on does (the server's C{--relogon-mode} decides for
    everyone when no application provides this).
    """

    def relogon_mode(user_id: str, client_type: int) -> RelogonMode:
        """
        The relogon mode of C{user_id}'s device C{client_type} (a
        L{esf.ClientType} value): C{REPLACE_OLD} pushes the session that is
        on out, C{IGNORE_NEW} refuses the new logon with C{HadLoggedOn}.

        Asked once for every logon that L{IBasicHandler.verify_user}
        accepted, before the device is claimed; answer at once (no
        Deferred), cheaply.  In a cluster the logon's node asks, and the
        mode travels with its claim: give the same answer on every node.
        An exception, or an answer that is not a L{esf.RelogonMode},
        refuses the logon (logged; the client sees C{logon verification
        failed}).
        """


class IRelayPolicy(Interface):
    """
    Decides which frames one user may relay to another (without one,
    every logged-on user may send anything to anyone): an IoT hub whose
    devices may talk to its operators only, say.
    """

    def may_relay(
        sender: str, receiver: str, message_type: int, information_type: int
    ) -> _Answer[bool]:
        """
        Whether C{sender} may relay a frame of C{message_type} (an
        L{esf.MessageType} value) and C{information_type} to C{receiver}.

        Asked on the sender's node for every frame a user addresses to
        another user that is not an answer: Send, SendCertainly, Request,
        every fragment of a Blob (its information type is the fragment's),
        PingByServer (information type 0), and Broadcast, once per frame,
        before the group manager's C{can_broadcast}.  Never for an answer
        (Response, Ack, PingAck, Error): its request was judged.  Asked
        before the route is resolved, so that a frame to a user who is
        offline (kept in the offline store or not) or on another node is
        judged as any other; frames that arrive from other nodes were
        judged on theirs: give every node the same policy.

        @param sender: the sending user's ID.
        @param receiver: the user the frame's DestUserID names (C{"bob"}
            for C{"bob"} and for one of his devices, C{"bob#5"}); for a
            Broadcast the group ID, or C{"*"} for everyone.
        @param message_type: the frame's L{esf.MessageType}.
        @param information_type: the C{i32} the frame's body starts with
            (a frame whose body is too short to hold one is refused with
            C{Error(BadRequest)} without asking).

        @return: C{True} to relay, C{False} to refuse with a reason naming
            the sender and the receiver; or raise L{esf.RelayRefused} to
            refuse with a reason of yours.  A Deferred or coroutine of
            those may answer later: the sender's later frames wait behind
            it, in order, within the server's C{--relay-policy-pending}
            and C{--relay-policy-timeout}.  A refused frame with a
            MessageID is answered C{Error(NotAuthorized, reason)}; a
            one-way one is counted (C{esf_relay_refused_total}).  Any
            other exception, or an answer that is not a L{bool}, refuses
            the frame with C{Error(HandlerError)} and is logged.  Whom a
            Broadcast reaches stays the group manager's to decide.
        """


class IOfflinePolicy(Interface):
    """
    Decides which messages to users who are offline the server keeps in its
    offline store (see docs/messages.md, section 5).  Without one the
    server keeps every Send, SendCertainly and Blob.
    """

    def keep_offline(
        sender_id: str, dest_user_id: str, message_type: int, information_type: int | None
    ) -> bool:
        """
        Whether to keep a message that C{sender_id} sent to C{dest_user_id}
        (C{"bob"} or C{"bob#5"}, as the sender wrote it), who is offline.
        Asked for Send (202), SendCertainly (205) and Blob (207) only (a
        Blob once, at its first fragment: all its fragments are kept, or
        none); C{information_type} is C{None} when the body is too short to
        hold one.  Answer at once (no Deferred): the answer decides the
        order of what is kept.
        """


class IOfflineStore(Interface):
    """
    Where the server keeps messages for users who are offline, durably,
    until they log on and acknowledge them (L{esf.offline}: SQLite, Redis,
    in memory).

    Every operation answers with a Deferred, and operations take effect in
    the order they are called (a fetch sees every store called before it).
    Each user's messages get increasing IDs, 1 to 2**31 - 1, never reused.
    """

    bounds = Attribute(
        """
        What the store keeps at most, an L{esf.offline.OfflineBounds}: per
        user, per sending user (for all receivers together) and in all,
        each in messages and in bytes (frames, headers included).  The
        engine reads the byte bounds to refuse a blob early.
        """
    )

    def start() -> Deferred[None]:
        """
        Open the store; raise or fail with L{esf.offline.OfflineStoreError}
        saying what is wrong (corrupt, unwritable, a newer schema).  The
        engine calls it once, as it starts.
        """

    def stop() -> Deferred[None]:
        """
        Close the store once what was called has finished.  The engine
        calls it as it stops, once its connections have closed.
        """

    def store(
        user_id: str, client_type: int | None, frames: Sequence[bytes], sender_id: str
    ) -> Deferred[list[int]]:
        """
        Keep C{frames} (whole frames, as C{sender_id} sent them) for
        C{user_id}, or only its device C{client_type}: all of them or, when
        they do not fit, none, failing with L{esf.offline.OfflineStoreFull}
        (the user's bound), L{esf.offline.OfflineSenderFull} (what
        C{sender_id} has waiting for all receivers) or
        L{esf.offline.OfflineServerFull} (the whole store).  Fires with
        their IDs once they are durable.  What is deleted counts no more
        against any bound.
        """

    def fetch(
        user_id: str,
        client_types: Sequence[int | None],
        after: int,
        max_count: int,
        max_bytes: int,
    ) -> Deferred[list[Any]]:
        """
        The user's messages with an ID above C{after} kept for any of
        C{client_types} (C{None}: the user, any device), in ID order: at
        most C{max_count}, and no more bytes than C{max_bytes} unless the
        first alone is larger.  A list of L{esf.offline.StoredMessage}.
        """

    def delete(user_id: str, ids: Sequence[int]) -> Deferred[int]:
        """
        Forget the user's messages C{ids}; fires with how many there were.
        """

    def counts(user_id: str) -> Deferred[tuple[int, int]]:
        """
        How many messages, and how many bytes, are kept for C{user_id}.
        """

    def sender_counts(sender_id: str) -> Deferred[tuple[int, int]]:
        """
        How many messages, and how many bytes, C{sender_id} has waiting in
        the store, for all receivers together.
        """

    def total_counts() -> Deferred[tuple[int, int]]:
        """
        How many messages, and how many bytes, the whole store keeps.
        """


class IUserManager(Interface):
    """
    The online users and their devices (ESFramework's C{IUserManager}).

    A user is online while at least one of its devices is; each device kind
    holds at most one session per user.  Events are L{IEvent}s: subscribe
    with C{user_manager.user_connected.subscribe(callback)}.
    """

    relogon_mode = Attribute(
        """
        What a second logon of the same user and device kind does, unless
        an L{IRelogonPolicy} application decides otherwise for that user
        and device kind: a L{esf.RelogonMode}.  C{REPLACE_OLD} (the
        default) pushes the old session out; C{IGNORE_NEW} refuses the new
        one with C{HadLoggedOn}.
        """
    )

    user_count = Attribute("""The number of users online (not devices).""")

    def is_user_online(user_id: str) -> bool:
        """
        Whether any device of C{user_id} is logged on.
        """

    def get_user_data(user_id: str, client_type: int | None = None) -> Any:
        """
        The L{esf.UserData} of one device of C{user_id}: the given
        C{client_type}, or when C{None} the device that logged on first.
        C{None} when not online.
        """

    def get_online_user_list() -> list[str]:
        """
        The IDs of the users online, sorted.
        """

    def get_all_user_data() -> list[Any]:
        """
        The L{esf.UserData} of every logged-on device.
        """

    def get_all_login_devices(user_id: str) -> list[int]:
        """
        The L{esf.ClientType}s of C{user_id}'s logged-on devices, in logon
        order.
        """

    user_connected = Attribute("""L{IEvent}: C{(user_data)}, the user's first device logged on.""")
    user_disconnected = Attribute(
        """
        L{IEvent}: C{(user_data, disconnected_type)}, the user's last device
        left.
        """
    )
    device_connected = Attribute("""L{IEvent}: C{(user_data)}, a device logged on.""")
    device_disconnected = Attribute(
        """
        L{IEvent}: C{(user_data, disconnected_type)}: a device's session
        ended, with the L{esf.DisconnectedType} that says why.
        """
    )
    device_being_pushed_out = Attribute(
        """
        L{IEvent}: C{(user_data, new_address)}: a logon of the same user and
        device from C{new_address} replaces this session (C{REPLACE_OLD}).
        """
    )
    device_kicked_out = Attribute(
        """
        L{IEvent}: C{(user_data, operator, reason)}: the device is being
        kicked (by the server's API, an administrator or an authorised
        user; C{operator} is C{"_0"} for the server), before its
        C{device_disconnected} with C{BEING_KICKED_OUT}.
        """
    )
    new_connection_ignored = Attribute(
        """
        L{IEvent}: C{(user_id, client_type, address)}: a logon was refused
        with C{HadLoggedOn} because the device is already on (C{IGNORE_NEW}).
        """
    )
    user_count_changed = Attribute("""L{IEvent}: C{(user_count)}.""")
    heartbeat_timed_out = Attribute(
        """
        L{IEvent}: C{(user_data)}: nothing arrived from the device for the
        heartbeat timeout; its session is being ended.
        """
    )


class IDeviceHandle(Interface):
    """
    One logged-on device, wherever it is held: what the engine may do to a
    device that L{IPresence} hands back.  The engine's own sessions provide
    it; a registry shared by several nodes returns handles that forward to
    the node holding the session.
    """

    user_id = Attribute("""The user's ID (L{str}).""")
    client_type = Attribute("""The device kind (L{int}, an L{esf.ClientType} value).""")
    user_data = Attribute("""The device's L{esf.UserData}.""")
    session_id = Attribute(
        """
        The fencing token of this logon: unique among the logons of the
        cluster, it tells a newer holder of the same device from an older
        one.
        """
    )
    logon_order = Attribute(
        """
        When the Logon arrived, as a number that grows with each Logon this
        node receives, and across its restarts (it starts from the
        microseconds since the epoch when the process starts): of two
        logons of one device, the later one wins.
        """
    )
    node = Attribute("""The ID of the node that holds the session (L{str}).""")

    def send(data: bytes) -> int | None:
        """
        Write one frame (L{bytes}, a whole encoded frame) to the device.

        @return: a false value when it was queued; otherwise the device is
            backed up, and the value says what the caller does (see
            L{esf.server._relay.Relay.not_queued}): C{1} (queued; hold the
            sender back with C{push_back(sender_session)}), C{2} (not
            queued: the device is stalled and its queue full) or C{3} (not
            queued: past its hard bound or the server's memory budget).  A
            handle that cannot tell returns C{None}.
        """

    def notify(message_type: int, body: bytes = b"", client_type: int = 0) -> None:
        """
        Send the device a server-initiated message (MessageID 0).
        """

    def kick(reason: DisconnectedType, text: str) -> None:
        """
        End the device's session: C{reason} (an L{esf.DisconnectedType}) and
        C{text} go to its C{DisconnectNotice} and to the log.
        """

    def push_out(new_address: str, cause: str) -> None:
        """
        The same user and device kind logged on from C{new_address}: on the
        node holding the device, fire the user manager's
        C{device_being_pushed_out}, send C{BeingPushedOutNotify(cause)} and
        end the session with C{BeingPushedOut}.
        """

    def kick_out(operator: str, reason: str, text: str) -> None:
        """
        C{operator} kicks the device with C{reason}: on the node holding it,
        fire the user manager's C{device_kicked_out}, send
        C{BeingKickedOutNotify} and end the session with C{BeingKickedOut}
        (C{text} in its C{DisconnectNotice}).
        """

    def ask(message_id: int, body: bytes, timeout: float) -> None:
        """
        Send the device the server's query C{message_id} (a Request with the
        Information C{body}); its answer completes the engine's pending
        request of that MessageID, or it times out after C{timeout} seconds.
        """


class IPresence(Interface):
    """
    The registry of logged-on devices that the engine routes by: a device
    kind of a user has at most one holder.

    Changes are asynchronous and atomic, so that a registry shared by
    several nodes can keep this contract: L{claim} and L{release} return
    Deferreds, and never race with each other.  Reads are synchronous views
    (of the whole registry, or a node's cache of it); the relay reads
    L{devices} for every message.
    """

    def claim(handle: IDeviceHandle, replace: bool) -> Deferred[Any]:
        """
        Make C{handle} (an L{IDeviceHandle}) the holder of its user's device
        kind, atomically.

        @param replace: when a holder exists, C{True} takes its place (the
            caller pushes it out), C{False} leaves it there.
        @return: a Deferred firing with a L{esf.server._presence.Claim}: whether
            C{handle} holds the device now, and the holder it found (or
            C{None}).
        """

    def release(handle: IDeviceHandle) -> Deferred[bool]:
        """
        Remove C{handle} if it still holds its device; fenced by
        C{handle.session_id}, so that a late release never removes a newer
        holder.

        @return: a Deferred firing with C{True} when this removed the user's
            last device, C{False} otherwise (other devices remain, or
            C{handle} no longer held the device).
        """

    up = Attribute(
        """
        Whether the registry is reachable now (C{True} for the in-process
        one); while it is not, only this node's devices are known.
        """
    )

    def attach(engine: Any) -> None:
        """
        Called once by the L{esf.ServerEngine} that uses this registry,
        before any connection: a registry shared by nodes takes what it needs
        of the engine (settings, user manager, pending queries).
        """

    def forward_answer(session: Any, frame: Any) -> bool:
        """
        An answer (Response or Error) to the server arrived on C{session}
        that no query of this engine waits for: forward it if another node
        asked it.

        @return: whether it was forwarded.
        """

    def get(user_id: str, client_type: int) -> IDeviceHandle | None:
        """
        The handle of C{user_id}'s device C{client_type}, or C{None}.
        """

    def devices(user_id: str) -> Sequence[IDeviceHandle]:
        """
        The handles of C{user_id}'s devices, in logon order (empty when
        offline), as a sequence the caller must not change; it stays valid
        while handles come and go.
        """

    def user_count() -> int:
        """
        How many users are online.
        """

    def kept_offline(user_id: str, client_type: int | None) -> None:
        """
        A message for C{user_id}'s device C{client_type} (C{None}: for the
        user) has just been handed to the offline store, because this
        registry's view listed no such device.  A registry shared by nodes,
        whose view may lag, makes sure that a device logged on meanwhile at
        another node gets it now, not at its next logon: its node looks at
        the store again (L{esf.server._offline.OfflineMessages.look_again}).
        Called before anything else is relayed, in the same reactor turn.
        """

    def user_ids(offset: int = 0, limit: int | None = None) -> list[str]:
        """
        The IDs of the users online, sorted: the C{limit} (all when
        C{None}) from position C{offset}, at a cost in proportion to the
        answer, not to the number of users online.
        """


class IChannel(Interface):
    """
    What the engine needs of a connection: the thin protocol provides it.
    """

    address = Attribute("""The peer as C{"host:port"} (C{"[host]:port"} for IPv6).""")

    def write(data: bytes) -> None:
        """
        Queue C{data} (L{bytes}) for the peer.
        """

    def close(reason: Any = None) -> None:
        """
        Close once the queued output is written; abort the connection if
        the peer does not take it within the close timeout.

        @param reason: why the session ended (a L{DisconnectedType}; its
            C{DisconnectNotice} was written just before, unless the peer
            ended it), for transports that say why in their own terms (a
            WebSocket close code); C{None}: no session reason.
        """

    def pause_reading() -> None:
        """
        Read no more from the peer for now: the session calls this when the
        peer's receivers are backed up (push back).  The frames of the read
        in progress are still handled.
        """

    def resume_reading() -> None:
        """
        Read from the peer again (its receivers have drained).
        """
