"""
The server-wide memory budget: every byte the server holds for a peer and
has not yet handed on (output waiting for a peer that does not read, frames
half received, blobs being reassembled) counts against one bound, so that
new work is refused before the bound is passed, whatever mix of peers asks
for it.
"""

from __future__ import annotations

__all__ = ["MemoryBudget"]


class MemoryBudget:
    """
    Bytes in use against C{limit}; blob bytes also by user.

    Counted by whoever holds the bytes, in deltas: a session for its
    output backlog and its partial frame, the application services for
    blobs.  Only the output backlog of a paused peer counts (what a reading
    peer's transport holds is passed on at once).
    """

    __slots__ = ("limit", "used", "blobs_by_user")

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.blobs_by_user: dict[str, int] = {}

    def fits(self, size: int) -> bool:
        """
        Whether C{size} more bytes stay within the budget.
        """
        return self.used + size <= self.limit

    def blob_bytes(self, user_id: str) -> int:
        return self.blobs_by_user.get(user_id, 0)

    def add_blob_bytes(self, user_id: str, delta: int) -> None:
        if not delta:
            return
        self.used += delta
        left = self.blobs_by_user.get(user_id, 0) + delta
        if left > 0:
            self.blobs_by_user[user_id] = left
        else:
            self.blobs_by_user.pop(user_id, None)
