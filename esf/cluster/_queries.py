"""
Queries between nodes.

An engine's query to a device of another node goes to that node's inbox
(L{RemoteHandle.ask}, a L{Query} record).  The holder's node sends its
session the Request under a MessageID of its own engine's (so that it
never collides with that engine's own queries), remembers for the query's
timeout who asked, and when the session answers that MessageID
(L{Queries.forward_answer}, which the engine's services call for an answer
its own table does not expect) sends the answer back to the asking node (an
L{Answer} record), whose table takes it as the answer of the RemoteHandle
it asked.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime

from esf.interfaces import IDeviceHandle
from esf.wire import _messages as m
from esf.wire._frames import SERVER_ID, ErrorCode, MessageType, encode_frame

from ._messaging import Post
from ._records import MAX_QUERY_SECONDS, Answer, Query

if TYPE_CHECKING:
    from esf.wire._frames import WireConfig
    from esf.wire._pending import PendingRequests

__all__ = ["Queries"]


class Queries:
    """
    This node's side of queries between nodes: those other nodes ask its
    sessions, and the answers to those its engine asked others'.

    @param post: posts a record to another node (L{Outbox.post}).

    @ivar max_forwarded: the most queries from other nodes remembered at
        once (the oldest are forgotten first).
    """

    def __init__(self, clock: IReactorTime, *, post: Post, stats: collections.Counter[str]):
        self.clock = clock
        self.post = post
        self.stats = stats
        self.max_forwarded = 10_000
        self.timeout = 30.0
        #: The engine's wire settings and outstanding queries (set by the
        #: presence's C{attach}).
        self.wire: WireConfig | None = None
        self.pending: PendingRequests | None = None
        #: Queries other nodes' engines asked this node's sessions:
        #: (session ID, MessageID sent to the session) -> (asking node, its
        #: MessageID, deadline), oldest first; bounded by count and time.
        self.forwarded: collections.OrderedDict[tuple[str, int], tuple[str, int, float]] = (
            collections.OrderedDict()
        )

    def ask(self, handle: IDeviceHandle, query: Query) -> None:
        """
        Another node's engine asks this node's session C{handle} C{query}.
        """
        if self.pending is None or self.wire is None:
            self.stats["queries_dropped"] += 1  # not attached to an engine
            return
        now = self.clock.seconds()
        forwarded = self.forwarded
        while forwarded:
            key, (_, _, deadline) = next(iter(forwarded.items()))
            if deadline > now and len(forwarded) < self.max_forwarded:
                break
            del forwarded[key]
            if deadline > now:
                self.stats["queries_forgotten"] += 1
        local_id = self.pending.next_id()
        seconds = min(query.seconds or self.timeout, MAX_QUERY_SECONDS)
        forwarded[(handle.session_id, local_id)] = (query.asker, query.message_id, now + seconds)
        handle.send(
            encode_frame(
                self.wire,
                MessageType.REQUEST,
                query.body,
                message_id=local_id,
                user_id=SERVER_ID,
                dest_user_id=handle.user_id,
            )
        )

    def forward_answer(self, session: Any, frame: Any) -> bool:
        """
        C{session} (this node's) answered the server's MessageID
        C{frame.message_id} with a Response or an Error that this node's
        engine does not wait for: if another node asked it, send the answer
        there and say C{True}.
        """
        entry = self.forwarded.pop((session.session_id, frame.message_id), None)
        if entry is None:
            return False
        asker, their_id, deadline = entry
        if deadline <= self.clock.seconds():
            return False  # timed out at the asker already
        error = frame.message_type == MessageType.ERROR
        self.post(asker, Answer(session.session_id, their_id, error, bytes(frame.body)))
        return True

    def answered(self, session_id: str, message_id: int, error: bool, body: bytes) -> None:
        """
        The answer to this node's engine's query C{message_id} to the session
        C{session_id} of another node: a Response's C{body}, or an Error's.
        """
        pending = self.pending
        asked = pending.asked(message_id) if pending is not None else None
        if asked is None or getattr(asked, "session_id", None) != session_id:
            self.stats["answers_dropped"] += 1  # timed out, or not ours
            return
        assert pending is not None  # it knew whom it asked
        result: Any
        try:
            if error:
                decoded = m.Error.decode(body)
                result = m.RequestError(decoded.code, decoded.text)
            else:
                result = m.Information.decode(body).payload
        except m.BadRequest as e:
            result = m.RequestError(ErrorCode.BAD_REQUEST, f"malformed answer: {e}")
        pending.answer(message_id, asked, result)
