"""
The coordinator's side of the load: the load worker processes it starts
(L{LoadGenerator}), their lines (L{Lines}), the sync points of each phase
and the merging of what the workers measured.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from twisted.internet import defer, task
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol

from ._figures import _merge
from ._options import fanout_groups
from ._procs import checkout_env, machine_cpu_seconds, proc_cpu_seconds
from ._progress import Progress, progress_of
from ._servers import ServerAddress
from ._wire import BenchError


class RunAborted(Exception):
    """
    The run cannot go on: a load worker stopped answering, exited or sent
    what it should not, or the coordinator failed at a sync point.  Unlike
    a L{BenchError}, which fails one measurement, this ends the run: the
    workers are in an unknown state.
    """


class LineTooLong(Exception):
    """
    A line grew past the longest one allowed.
    """


class Lines:
    """
    Splits a byte stream into lines (without their C{\\n}), in time linear
    in its length: the unfinished tail is kept as the chunks it came in and
    joined once, when its line ends.  (Splitting the whole buffer again for
    each chunk, as C{LineOnlyReceiver} does, or cutting one line at a time
    off it, as C{LineReceiver} does, is quadratic in the length of a line
    that comes in many chunks, such as a request phase's round-trip times.)
    """

    def __init__(self, max_length: int):
        self.max_length = max_length
        self._tail: list[bytes] = []
        self._tail_length = 0

    def feed(self, data: bytes) -> list[bytes]:
        """
        The lines that C{data} ends; raises L{LineTooLong} when a line, ended
        or not, is longer than C{max_length}.
        """
        end = data.rfind(b"\n")
        if end < 0:
            self._tail.append(data)
            self._tail_length += len(data)
            if self._tail_length > self.max_length:
                raise LineTooLong(self._tail_length)
            return []
        if self._tail:
            self._tail.append(data[:end])
            lines = b"".join(self._tail).split(b"\n")
        else:
            lines = data[:end].split(b"\n")
        rest = data[end + 1 :]
        self._tail = [rest] if rest else []
        self._tail_length = len(rest)
        longest = max(self._tail_length, *map(len, lines))
        if longest > self.max_length:
            raise LineTooLong(longest)
        return lines


class _Worker(ProcessProtocol):
    """
    The coordinator's end of one load worker process.
    """

    pid = None

    def __init__(self, coordinator, index: int):
        self.coordinator, self.index = coordinator, index
        # The longest line: a request phase's result, about 25 bytes per
        # round-trip time.
        self._lines = Lines(2**20 + 32 * coordinator.opts.requests)
        self.started = defer.Deferred()
        self.finished: defer.Deferred | None = None
        self.point: str | None = None
        #: What it did last, for the message when it stops answering.
        self.last = "idle"
        #: Its last progress report of each stage of the phase, in order.
        self.stages: dict[str, tuple] = {}
        self.gone = False
        #: Why it cannot be used any more (it exited, or sent nonsense).
        self.broken: str | None = None

    def __str__(self) -> str:
        return f"load worker {self.index} (pid {self.pid})"

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.started.callback(self)

    def send(self, message: dict) -> None:
        self.transport.write(json.dumps(message).encode() + b"\n")

    def outReceived(self, data: bytes) -> None:
        if self.broken is not None:
            return
        try:
            lines = self._lines.feed(data)
        except LineTooLong as e:
            self.fail(f"{self} sent a line of {e} bytes or more, longer than any message")
            return
        for line in lines:
            if self.broken is not None:
                return
            try:
                message = json.loads(line)
                if not isinstance(message, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                self.fail(f"{self} sent a line that is not a message ({e}): {line[:80]!r}")
                return
            if "at" in message:
                self.point = message["at"]
                self.last = f"waiting at {self.point!r}"
                self.coordinator.arrived()
            elif "progress" in message:
                try:
                    stage, done, total, unit, t0 = message["progress"]
                except (TypeError, ValueError):
                    self.fail(
                        f"{self} sent a progress report that is not [stage, done, total, unit, t0]: {line[:80]!r}"
                    )
                    return
                self.stages[stage] = (done, total, unit, t0)
            elif "result" in message or "error" in message:
                self.point = None
                self.last = "idle"
                finished, self.finished = self.finished, None
                if finished is None:
                    self.fail(f"{self} sent a result with no phase running")
                    return
                finished.callback(message)
                self.coordinator.arrived()
            else:
                self.fail(f"{self} sent an unknown message: {line[:80]!r}")

    def fail(self, why: str) -> None:
        """
        This worker cannot be used any more: end the phase and the run.
        """
        if self.broken is None:
            self.broken = why
        self.coordinator.abort(why)

    def processEnded(self, reason) -> None:
        self.gone = True
        self.point = None
        if self.finished is not None:
            self.finished = None
            self.fail(f"{self} exited during a phase: {reason.value}")
        self.coordinator.arrived()


class LoadGenerator:
    """
    The load of every phase, spread over C{--load-procs} worker processes,
    each with its own reactor and its share of the pairs, logons or idle
    sessions.  The coordinator (this process) starts a phase in every
    worker, releases each sync point once all the workers are there (after
    reading the server's and the workers' CPU from C{/proc}), and merges
    what they measured.
    """

    def __init__(self, reactor, opts, progress: Progress):
        self.reactor, self.opts, self.progress = reactor, opts, progress
        tag = os.getpid() % 1296
        self.tag = _ALPHABET[tag // 36] + _ALPHABET[tag % 36]
        self.workers: list[_Worker] = []
        self._active: list[_Worker] = []
        self._action = None
        #: Fails the phase in progress (L{abort}).
        self._aborted: defer.Deferred | None = None
        #: The readings at a sync point are being taken.
        self._reading = False

    async def start(self) -> None:
        env = checkout_env()
        init = {
            k: v
            for k, v in vars(self.opts).items()
            if isinstance(v, (int, float, str, bool, list, type(None)))
        }
        init["progress"] = bool(self.opts.progress)
        for i in range(self.opts.load_procs):
            worker = _Worker(self, i)
            self.reactor.spawnProcess(
                worker, sys.executable, [sys.executable, "-m", "esf.bench", "--load-worker"],
                env=env, childFDs={0: "w", 1: "r", 2: 2},
            )  # fmt: skip
            self.workers.append(worker)
        for worker in self.workers:
            await worker.started
            worker.send({"init": init, "tag": self.tag})

    def stop(self, kill: bool = False) -> None:
        """
        Let the workers go: end of input, on which they exit; C{kill}:
        SIGKILL (after an aborted run, when a worker may not be reading).
        """
        for worker in self.workers:
            if worker.gone:
                continue
            if kill:
                try:
                    worker.transport.signalProcess("KILL")
                except ProcessExitedAlready:
                    pass
            else:
                worker.transport.closeStdin()

    def abort(self, why: str) -> None:
        """
        End the phase in progress, if any, with L{RunAborted}.
        """
        aborted, self._aborted = self._aborted, None
        if aborted is not None:
            aborted.errback(RunAborted(why))

    def _too_slow(self, what: str, timeout: float) -> None:
        running = [w for w in self._active if w.finished is not None]
        late = [f"{w} ({w.last})" for w in running if w.point is None]
        if late:
            why = f"no answer from {', '.join(late)}"
        else:  # every worker waits at a sync point
            why = (
                f"the coordinator did not release {', '.join(f'{w} ({w.last})' for w in running)}"
            )
        self.abort(f"{what} did not end within {timeout:g} s (--phase-timeout): {why}")

    def _parts(self, mode: str, pairs: int | None) -> list[dict]:
        """
        Each worker's share of a phase (only workers with something to do);
        C{pairs}: the pairs of send and request, the group size of fanout.
        """
        opts = self.opts
        procs = self.opts.load_procs
        if mode == "fanout":
            # Whole groups to each worker, and to each group its share of
            # the broadcasts: as many as make --messages deliveries.
            size, count = pairs, fanout_groups(opts, pairs)
            shares = _split(math.ceil(opts.messages / (size - 1)), count)
            split = _split(count, min(procs, count))
            window = max(1, math.ceil(opts.logon_window / len(split)))
            parts, first = [], 0
            for n in split:
                indices = list(range(first, first + n))
                parts.append({"groups": indices, "shares": [shares[i] for i in indices],
                              "group_size": size, "all_groups": count,
                              "window": window})  # fmt: skip
                first += n
            return parts
        if mode in ("send", "request"):
            total = opts.messages if mode == "send" else opts.requests
            shares = _split(total, pairs)
            groups = _split(pairs, min(procs, pairs))
            window = max(1, math.ceil(opts.logon_window / len(groups)))
            parts, first = [], 0
            for n in groups:
                indices = list(range(first, first + n))
                parts.append({"pairs": indices, "shares": [shares[i] for i in indices],
                              "all_pairs": pairs, "window": window})  # fmt: skip
                first += n
            return parts
        count = opts.logons if mode == "logons" else opts.idle
        groups = [n for n in _split(count, procs) if n]
        window = max(1, math.ceil(opts.logon_window / len(groups)))
        parts, first = [], 0
        for n in groups:
            parts.append(
                {"names": list(range(first, first + n)), "all_names": count, "window": window}
            )
            first += n
        return parts

    def arrived(self) -> None:
        """
        A worker reached a sync point or finished: release the point once
        every worker still running is there.
        """
        running = [w for w in self._active if w.finished is not None]
        points = {w.point for w in running}
        if (
            not running
            or len(points) != 1
            or None in points
            or self._action is None
            or self._reading
        ):
            return
        (point,) = points
        self._reading = True
        aborted = self._aborted

        def release(_):
            self._reading = False
            if self._aborted is not aborted:  # the phase was aborted meanwhile
                return
            for w in running:
                w.point = None
                w.last = f"released from {point!r}"
                if not w.gone:
                    w.send({"go": point})

        def failed(failure):
            self._reading = False
            self.abort(
                f"the coordinator failed at sync point {point!r}: "
                f"{failure.type.__name__}: {failure.getErrorMessage()}\n{failure.getTraceback()}"
            )

        d = defer.Deferred.fromCoroutine(self._action(point))
        d.addCallbacks(release, failed)

    async def measure(self, mode: str, server, kind: str, pairs: int | None) -> dict:
        """
        One phase against C{server}: the merged figures, as one process
        would have measured them, and the load generator's own CPU.
        """
        parts = self._parts(mode, pairs)
        workers = self.workers[: len(parts)]
        for w in self.workers:
            if w.broken is not None or w.gone:
                raise RunAborted(w.broken or f"{w} has exited")
        readings: dict[str, dict] = {}

        async def action(point: str) -> None:
            if point == "settled":
                await task.deferLater(self.reactor, 0.5, lambda: None)  # let the server settle
            readings[point] = {
                "t": time.perf_counter(),
                "server_cpu": server.cpu_seconds(),
                "load_cpu": [proc_cpu_seconds(w.pid) for w in workers],
                "machine_cpu": machine_cpu_seconds(),
                "memory": server.memory(),
            }

        aborted = self._aborted = defer.Deferred()
        self._active, self._action = workers, action
        address = ServerAddress.of(server).to_json()
        outcomes = []
        for worker, part in zip(workers, parts):
            worker.finished = defer.Deferred()
            worker.stages = {}
            worker.last = "running the phase"
            outcomes.append(worker.finished)
            worker.send({"run": mode, "kind": kind, "server": address, "part": part})
        timeout = self.opts.phase_timeout
        timer = self.reactor.callLater(timeout, self._too_slow, f"{kind}: {mode}", timeout)
        # Whichever comes first: every worker's outcome, or an abort.
        defer.gatherResults(outcomes).addCallback(lambda r: aborted.called or aborted.callback(r))

        def state():
            shown = progress_of([w.stages for w in workers])
            if shown is None:
                return None
            stage, done, total, unit, t0 = shown
            return (
                f"{kind}: {mode}" + ("" if stage == mode else f", {stage}"),
                done,
                total,
                unit,
                t0,
            )

        self.progress.start(state)
        try:
            results = await aborted
        finally:
            if timer.active():
                timer.cancel()
            self.progress.stop()
            self._active, self._action, self._aborted, self._reading = [], None, None, False
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise BenchError(errors[0])
        return _merge(mode, self.opts, pairs, [r["result"] for r in results], readings)


_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]
