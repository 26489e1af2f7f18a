"""
The group manager of C{esf-bench --pattern fanout}: groups in blocks, told
by their names alone.

The esf server that C{esf-bench} starts for a fan-out run is given
C{--handler esf.bench._groups:blocks}.  Its groups hold no state that a
run would have to set up: a name says it all.

- The user C{u<tag>.<n>} is member number C{n} (from 0) of the run
  C{<tag>} (the load's tag: any text without a dot).
- The group C{g<tag>.<G>.<k>} is the block of C{G} members C{k*G} to
  C{k*G + G - 1}: C{u<tag>.0} to C{u<tag>.<G-1>} form C{g<tag>.<G>.0}, and
  so on.
- A user may broadcast to a group it is a member of, and to no other.  An
  ID of neither form is in no group (an unknown group has no members).

Both answers are given at once (no Deferred), as an application that holds
its groups in memory gives them.  The member list of a group is made from
its name once and kept, for at most L{CACHED_GROUPS} groups, and so is
whether a user may broadcast to a group (for as many pairs), as such an
application keeps them: what the benchmark measures is esf's delivery, not
the parsing and making of names.

This module imports only C{zope.interface} and L{esf.interfaces}: a server
on PyPy, whose environment holds only esf's own requirements, imports it
without the rest of C{esf.bench} (whose package imports its parts lazily).
"""

from __future__ import annotations

from functools import lru_cache

from zope.interface import implementer

from esf.interfaces import IGroupManager

__all__ = ["BlockGroups", "blocks", "group_name", "member_name", "MAX_GROUP_SIZE"]

#: Groups whose member lists are kept at once (each at most
#: L{MAX_GROUP_SIZE} names).
CACHED_GROUPS = 1024

#: A group ID naming more members than this has none: a typo in a command
#: line must not make the server build a list of millions of names.
MAX_GROUP_SIZE = 100_000


def member_name(tag: str, n: int) -> str:
    """
    The user ID of member C{n} (from 0) of the run C{tag}.
    """
    return f"u{tag}.{n}"


def group_name(tag: str, size: int, index: int) -> str:
    """
    The ID of group C{index} (from 0) of C{size} members of the run
    C{tag}: members C{index * size} to C{index * size + size - 1}.
    """
    return f"g{tag}.{size}.{index}"


def _number(text: str) -> int | None:
    # Decimal digits only: int() would also take " 7", "+7" and "7_0".
    if not text.isdigit() or not text.isascii():
        return None
    return int(text)


def _parse_member(user_id: str) -> tuple[str, int] | None:
    tag, dot, n = user_id[1:].partition(".")
    number = _number(n)
    if not user_id.startswith("u") or not dot or number is None:
        return None
    return tag, number


def _parse_group(group_id: str) -> tuple[str, int, int] | None:
    parts = group_id[1:].split(".")
    if not group_id.startswith("g") or len(parts) != 3:
        return None
    tag, size, index = parts[0], _number(parts[1]), _number(parts[2])
    if size is None or index is None or not 1 <= size <= MAX_GROUP_SIZE:
        return None
    return tag, size, index


@lru_cache(maxsize=CACHED_GROUPS)
def _members(group_id: str) -> tuple[str, ...]:
    parsed = _parse_group(group_id)
    if parsed is None:
        return ()
    tag, size, index = parsed
    first = index * size
    return tuple(member_name(tag, n) for n in range(first, first + size))


@lru_cache(maxsize=CACHED_GROUPS)
def _may_broadcast(user_id: str, group_id: str) -> bool:
    member = _parse_member(user_id)
    group = _parse_group(group_id)
    if member is None or group is None:
        return False
    tag, size, index = group
    return member[0] == tag and member[1] // size == index


@implementer(IGroupManager)
class BlockGroups:
    """
    Groups in blocks of consecutive members, told by their names (see the
    module's docstring).
    """

    def get_members(self, group_id: str) -> tuple[str, ...]:
        """
        The members of C{group_id}, in order; none if it is not of the form
        C{g<tag>.<G>.<k>}.
        """
        return _members(group_id)

    def can_broadcast(self, user_id: str, group_id: str) -> bool:
        """
        Whether C{user_id} is a member of C{group_id}.
        """
        return _may_broadcast(user_id, group_id)


#: The group manager that C{twistd esf --handler esf.bench._groups:blocks}
#: loads.
blocks = BlockGroups()
