"""
What a client engine announces: its events, one attribute each.
"""

from __future__ import annotations

from esf.wire._events import Event

__all__ = ["ClientEvents"]


class ClientEvents:
    """
    The events of L{esf.ClientEngine} (each an L{esf.interfaces.IEvent}):
    the connection's (C{connection_interrupted}, C{connection_rebuild_start},
    C{relogon_completed}, C{disconnected}), the session's end
    (C{being_pushed_out}, C{being_kicked_out}, C{session_ended}: once, with
    an L{esf.Ending}, when a session that had logged on ends for good) and
    what arrives (C{my_device_online}, C{my_device_offline},
    C{broadcast_received}, C{information_received}).  docs/client.md says
    what each carries and which fire in which case.
    """

    def __init__(self) -> None:
        self.connection_interrupted = Event("connection_interrupted")
        self.connection_rebuild_start = Event("connection_rebuild_start")
        self.relogon_completed = Event("relogon_completed")
        self.being_pushed_out = Event("being_pushed_out")
        self.being_kicked_out = Event("being_kicked_out")
        self.disconnected = Event("disconnected")
        self.session_ended = Event("session_ended")
        self.my_device_online = Event("my_device_online")
        self.my_device_offline = Event("my_device_offline")
        self.broadcast_received = Event("broadcast_received")
        self.information_received = Event("information_received")
