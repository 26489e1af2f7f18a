"""
The progress bar: drawn by the coordinator (L{Progress}) from what each
load worker reports of the stage it is in (L{_WorkerProgress}), merged by
L{progress_of}.
"""

from __future__ import annotations

import sys
import time

from twisted.internet import task


class Progress:
    """
    A one-line progress bar on stderr (only when stderr is a terminal,
    unless forced), of whatever stage of a phase L{progress_of} says.
    """

    def __init__(self, reactor, enabled: bool):
        self.reactor = reactor
        self.enabled = enabled
        self._loop = None

    def start(self, state) -> None:
        """
        Draw C{state()} every 0.2 s: L{None} (nothing to show yet) or
        C{(label, done, total, unit, t0)}, C{t0} the C{time.perf_counter()}
        at which the stage began.
        """
        self.state = state
        if self.enabled:
            self._loop = task.LoopingCall(self.draw)
            self._loop.clock = self.reactor
            self._loop.start(0.2)

    def draw(self) -> None:
        state = self.state()
        if state is None:
            return
        label, done, total, unit, t0 = state
        elapsed = time.perf_counter() - t0
        width = 24
        filled = min(width, int(width * done / total)) if total > 0 else width
        if unit == "s":
            figures = f"{done:>9.1f}/{total:.1f} s"
        else:
            rate = done / elapsed if elapsed > 0 else 0
            figures = f"{done:>9,}/{total:,} {rate:>11,.0f}/s"
        line = (
            f"\r{label:<30.30} [{'#' * filled}{'.' * (width - filled)}] {figures} {elapsed:6.1f} s"
        )
        sys.stderr.write(line)
        sys.stderr.flush()

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
            self.draw()
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()


def progress_of(stages: list[dict]) -> tuple[str, float, float, str, float] | None:
    """
    What the progress bar of a phase shows, from each of its workers' last
    report of each stage (C{{stage: (done, total, unit, t0)}}, in the order
    the stages came): the first stage some worker is still in, with its
    done and its total summed over the workers (averaged for a stage
    counted in seconds, C{unit} C{"s"}), so that both are of the same stage
    and sum the same workers, and when the first worker began it.  L{None}
    until every worker has reported.
    """
    if not stages or not all(stages):
        return None
    k = min(len(s) for s in stages) - 1
    at = [list(s.items())[k] for s in stages]
    name = at[0][0]
    done = sum(value[0] for _, value in at)
    total = sum(value[1] for _, value in at)
    unit = at[0][1][2]
    if unit == "s":
        done, total = done / len(at), total / len(at)
    return name, done, total, unit, min(value[3] for _, value in at)


class _WorkerProgress:
    """
    L{Progress} in a load worker: reports the stage of the phase it is in,
    with its done and total, to the coordinator every 0.25 s and at the
    stage's end (when there is a progress bar to draw; L{progress_of}
    merges the workers' reports).
    """

    def __init__(self, reactor, report, enabled: bool):
        self.reactor, self.report, self.enabled = reactor, report, enabled
        self._loop = None

    def start(self, stage: str, total: float, done, unit: str = "") -> None:
        """
        A stage begins: C{total} to do, C{done()} done so far, counted in
        C{unit} (C{""}: things, C{"s"}: seconds).
        """
        self.stop()
        self.stage, self.total, self.done, self.unit = stage, total, done, unit
        self.t0 = time.perf_counter()
        if self.enabled:
            self._loop = task.LoopingCall(self._report)
            self._loop.clock = self.reactor
            self._loop.start(0.25)

    def _report(self) -> None:
        self.report({"progress": [self.stage, self.done(), self.total, self.unit, self.t0]})

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
            self._report()
