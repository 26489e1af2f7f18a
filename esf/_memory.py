"""
Giving memory the server has freed back to the system.

glibc's malloc keeps what a process frees in its heaps, for reuse.  After a
burst (a hundred slow readers' backlogs, say) the process would keep its
peak RSS although nothing holds those bytes any more: a large block freed
once makes malloc serve later ones from the heap, whose free pages it gives
back only at the heap's top.  L{MemoryTrimmer} looks every few seconds at
how much malloc holds free (C{mallinfo2}) and at the process's RSS (both
looks cost microseconds) and, when malloc holds more than a threshold
free and the RSS moved since it last did so, calls C{malloc_trim(0)},
which gives the free pages back (about 15 ms for 100 MiB).  Where the C
library is not glibc 2.33 or later on Linux, it does nothing.
"""

from __future__ import annotations

import ctypes
import os
from typing import Protocol

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

__all__ = ["MemoryTrimmer", "Allocator", "GlibcAllocator"]

log = Logger(namespace="esf.server")

#: Default: trim only when malloc holds at least this many bytes free.
TRIM_THRESHOLD = 16 * 1024 * 1024

#: An RSS within this many bytes of the one after the last trim has not
#: moved: nothing new to give back.
SETTLED = 1024 * 1024


class Allocator(Protocol):
    """
    What L{MemoryTrimmer} asks of the C allocator.
    """

    def free_bytes(self) -> int:
        """
        Bytes the allocator holds free in its heaps.
        """

    def resident_bytes(self) -> int:
        """
        The process's resident set size.
        """

    def trim(self) -> None:
        """
        Give free pages back to the system.
        """


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]


class GlibcAllocator:
    """
    glibc's malloc, through C{ctypes}.
    """

    def __init__(self, libc: ctypes.CDLL, statm: str = "/proc/self/statm"):
        self._statm = statm
        self._page = os.sysconf("SC_PAGE_SIZE")
        self.resident_bytes()  # raises OSError without /proc
        self._mallinfo2 = libc.mallinfo2
        self._mallinfo2.restype = _MallInfo2
        self._mallinfo2.argtypes = []
        self._malloc_trim = libc.malloc_trim
        self._malloc_trim.restype = ctypes.c_int
        self._malloc_trim.argtypes = [ctypes.c_size_t]

    @classmethod
    def load(cls) -> GlibcAllocator | None:
        """
        The process's glibc, or C{None} when its C library has no
        C{mallinfo2} and C{malloc_trim} (not glibc, or older than 2.33) or
        the process's RSS cannot be read (no C{/proc}).
        """
        try:
            return cls(ctypes.CDLL(None))
        except (OSError, AttributeError, TypeError, ValueError):
            return None

    def free_bytes(self) -> int:
        return int(self._mallinfo2().fordblks)

    def resident_bytes(self) -> int:
        with open(self._statm, "rb") as statm:
            return int(statm.read().split()[1]) * self._page

    def trim(self) -> None:
        self._malloc_trim(0)


class MemoryTrimmer(Service):
    """
    Every C{interval} seconds, give freed memory back to the system when
    malloc holds at least C{threshold} bytes free and the RSS moved (by
    more than L{SETTLED}) since the last trim: an idle server that gave back
    what it could is left alone, a server after a burst is not.

    @ivar trims: how many times it trimmed.
    """

    def __init__(
        self,
        clock: IReactorTime,
        interval: float = 5.0,
        threshold: int = TRIM_THRESHOLD,
        allocator: Allocator | None = None,
    ):
        self.clock = clock
        self.interval = interval
        self.threshold = threshold
        self.allocator = allocator if allocator is not None else GlibcAllocator.load()
        self.trims = 0
        self._resident = 0
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self.allocator is None:
            log.info(
                "esf: not glibc 2.33 or later on Linux: memory freed after a burst "
                "is left to the allocator",
                esf_event="malloc_trim_unavailable",
            )
            return
        self._resident = self.allocator.resident_bytes()
        self._loop = LoopingCall(self.check)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False).addErrback(self._failed)

    def _failed(self, failure: Failure) -> None:
        # LoopingCall stops when check raises: say so, or trimming would
        # stop without a word.
        self._loop = None
        log.failure(
            "esf: giving freed memory back to the system failed; no more trims",
            failure,
            level=LogLevel.error,
            esf_event="malloc_trim_failed",
        )

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def check(self) -> bool:
        """
        Trim if malloc holds enough free and the RSS moved since the last
        trim.

        @return: whether it trimmed.
        """
        allocator = self.allocator
        assert allocator is not None  # started
        free = allocator.free_bytes()
        if free < self.threshold:
            return False  # little to give back
        resident = allocator.resident_bytes()
        if abs(resident - self._resident) <= SETTLED:
            # As after the last trim: malloc still counts the chunks it gave
            # back as free, but there is nothing new.
            return False
        allocator.trim()
        self.trims += 1
        self._resident = allocator.resident_bytes()
        log.debug(
            "gave freed memory back to the system: RSS {before} -> {after} bytes "
            "({free} bytes free in malloc's heaps)",
            esf_event="malloc_trim",
            before=resident,
            after=self._resident,
            free=free,
        )
        return True
