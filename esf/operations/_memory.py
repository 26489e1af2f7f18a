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

On PyPy what a burst leaves is first garbage in the GC's own arenas: its
major collection runs only once the heap has grown by a factor (1.82) since
the last one, so an idle server after a logon storm would keep the storm's
garbage, and malloc would hold nothing free to give back.  There the
trimmer also runs a full collection when the RSS has grown by a quarter (at
least the threshold) since the last one, and once at start, in the GC's
own incremental steps (a few ms each, one per reactor turn), then trims.
CPython frees by reference counting as it goes: nothing to collect.
"""

from __future__ import annotations

import ctypes
import gc
import os
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

__all__ = [
    "MemoryTrimmer",
    "Allocator",
    "GlibcAllocator",
    "Collector",
    "PyPyCollector",
    "GCTuning",
    "GC_THRESHOLD",
]

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


class Collector(Protocol):
    """
    What L{MemoryTrimmer} asks of a garbage collector that keeps garbage
    until its next major collection (PyPy's).
    """

    def step(self) -> bool:
        """
        Do one bounded step of a full collection; return whether the
        collection is complete.
        """


class PyPyCollector:
    """
    PyPy's incremental GC, through C{gc.collect_step}.
    """

    @classmethod
    def load(cls) -> PyPyCollector | None:
        """
        PyPy's collector, or C{None} on an interpreter without one (CPython).
        """
        return cls() if hasattr(gc, "collect_step") else None

    def __init__(self) -> None:
        # Whether the collection being stepped through began at one of
        # this collector's steps.
        self._began = False

    def step(self) -> bool:
        stats = gc.collect_step()  # type: ignore[attr-defined]
        if stats.oldstate == stats.STATE_SCANNING:
            self._began = True  # this step began a major collection
        if not stats.major_is_done:
            return False
        if self._began:
            self._began = False
            return True
        # It finished one the GC had begun by itself, before the garbage
        # to collect was garbage (what it marked stays): go on to the next.
        return False


#: The collector a trimmer uses unless given one: PyPy's, or none.
DEFAULT_COLLECTOR = PyPyCollector.load()

#: The RSS must have grown by this share of itself (and by the threshold)
#: since the last full collection for the trimmer to run another.
COLLECT_GROWTH = 0.25


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
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
        collector: Collector | None = None,
    ):
        self.clock = clock
        self.interval = interval
        self.threshold = threshold
        self.allocator = allocator if allocator is not None else GlibcAllocator.load()
        self.collector = collector if collector is not None else DEFAULT_COLLECTOR
        self.trims = 0
        #: How many full collections it ran (with a collector).
        self.collections = 0
        self._resident = 0
        # The RSS after the last full collection (none yet: the first look
        # collects what start-up left), and the collection under way.
        self._collected_at = 0
        self._collecting: Any = None
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
        if self.collector is not None:
            self._collect()  # what start-up left

    def _failed(self, failure: Failure) -> None:
        # LoopingCall stops when check raises: say so, or trimming would
        # stop without a word.
        self._loop = None
        self._stop_collecting()
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
        self._stop_collecting()

    def _stop_collecting(self) -> None:
        if self._collecting is not None and self._collecting.active():
            self._collecting.cancel()
        self._collecting = None

    def check(self) -> bool:
        """
        Trim if malloc holds enough free and the RSS moved since the last
        trim; with a collector, first collect if the RSS grew enough since
        the last collection (the trim follows the collection's last step).

        @return: whether it trimmed.
        """
        allocator = self.allocator
        assert allocator is not None  # started
        if self.collector is not None and self._collecting is None:
            resident = allocator.resident_bytes()
            growth = max(self.threshold, int(self._collected_at * COLLECT_GROWTH))
            if resident - self._collected_at >= growth:
                self._collect()
                return False
        return self._trim()

    def _collect(self) -> None:
        """
        Run a full collection, one step per reactor turn, then trim.
        """
        collector = self.collector
        assert collector is not None
        if collector.step():
            self._collecting = None
            self.collections += 1
            self._trim(collected=True)
            self._collected_at = self.allocator.resident_bytes()  # type: ignore[union-attr]
        else:
            self._collecting = self.clock.callLater(0, self._collect)

    def _trim(self, collected: bool = False) -> bool:
        allocator = self.allocator
        assert allocator is not None
        free = allocator.free_bytes()
        if free < self.threshold:
            return False  # little to give back
        resident = allocator.resident_bytes()
        if not collected and abs(resident - self._resident) <= SETTLED:
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


#: The youngest generation's threshold that L{GCTuning} sets by default
#: (CPython's own is 700 allocations).
GC_THRESHOLD = 10_000


class GCTuning(Service):
    """
    CPython's cyclic GC set for a long-running server, while this service
    runs: what start-up made (modules, the engine, the services) is frozen
    out of the GC's reach (C{gc.freeze}), so full collections no longer walk
    it, and the youngest generation is collected every C{threshold}
    allocations instead of 700, which makes full collections that much
    rarer.  Sessions are long-lived and rarely cyclic garbage, and a logon
    storm otherwise walks the whole heap again and again as it grows: in a
    server taking 15,000 logons, 265 ms of GC with CPython's settings, 118 ms
    with these (about 10 µs per logon).  Cyclic garbage lives at most
    C{threshold} allocations longer.

    On stop, the thresholds are as they were, and what it froze is given
    back to the GC, unless the program had frozen objects itself before
    (C{gc.unfreeze} cannot tell them apart): then all stay frozen.  Nothing
    to do where the GC has no generations to set (PyPy's).
    """

    def __init__(self, threshold: int = GC_THRESHOLD):
        self.threshold = threshold
        self._before: tuple[int, ...] | None = None
        self._frozen_before = 0

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if not hasattr(gc, "freeze"):
            return
        self._before = gc.get_threshold()
        self._frozen_before = gc.get_freeze_count()
        gc.collect()  # what start-up dropped is not frozen forever
        gc.freeze()
        gc.set_threshold(self.threshold, *self._before[1:])

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._before is not None:
            gc.set_threshold(*self._before)
            if not self._frozen_before:
                gc.unfreeze()
            self._before = None
