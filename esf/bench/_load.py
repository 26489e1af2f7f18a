"""
A load worker's connections and the timed part of its phases: logging
connections on within a window, sender/receiver pairs, and the exchange
that runs them between the coordinator's sync points (the modes themselves
are in L{esf.bench._modes}).
"""

from __future__ import annotations

import math
import time

from twisted.internet import defer, task
from twisted.internet.protocol import ClientFactory, Protocol

from ._wire import BareDialect, BenchError, EsfDialect, WsDialect

#: How long a send or request phase may see nothing arrive before the
#: server counts as stopped (at most half of --duration).
STALL_SECONDS = 10.0


def stall_seconds(duration: float) -> float:
    return min(STALL_SECONDS, duration / 2)


class Conn(Protocol):
    """
    One load connection: says hello (logs on), then hands every byte to
    L{on_data}.
    """

    on_data = None
    on_lost = None
    lost = False

    def __init__(self, name: str, hello: bytes, parser):
        self.name = name
        self._hello = hello
        self._parser = parser
        self.ready = defer.Deferred()
        self.unexpected = 0

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.transport.write(self._hello)

    def dataReceived(self, data: bytes) -> None:
        if self.on_data is not None:
            self.on_data(data)
            return
        if self.ready.called:
            self.unexpected += len(data)
            return
        status, rest = self._parser.feed(data)
        if status is None:
            return
        self._parser = None
        if status is True:
            self.ready.callback(self)
            if rest:
                self.dataReceived(rest)
        else:
            self.ready.errback(BenchError(f"{self.name}: {status}"))
            self.transport.abortConnection()

    def connectionLost(self, reason) -> None:
        self.lost = True
        if not self.ready.called:
            self.ready.errback(
                BenchError(f"{self.name}: connection lost before logon: {reason.value}")
            )
        if self.on_lost is not None:
            self.on_lost(self)


class _ConnFactory(ClientFactory):
    noisy = False

    def __init__(self, conn: Conn):
        self.conn = conn

    def buildProtocol(self, addr):
        self.conn.factory = self
        return self.conn

    def clientConnectionFailed(self, connector, reason):
        if not self.conn.ready.called:
            self.conn.ready.errback(
                BenchError(f"{self.conn.name}: cannot connect: {reason.value}")
            )


def close_all(reactor, conns) -> defer.Deferred:
    """
    Abort every connection; fire when they are all gone (at most 10 s).
    """
    waiting = [c for c in conns if not c.lost and c.transport is not None]
    if not waiting:
        return defer.succeed(None)
    done = defer.Deferred()
    left = [len(waiting)]

    def gone(_conn):
        left[0] -= 1
        if left[0] == 0 and not done.called:
            done.callback(None)

    for conn in waiting:
        conn.on_lost = gone
        conn.transport.abortConnection()
    timer = reactor.callLater(10, lambda: done.called or done.callback(None))
    done.addBoth(lambda r: (timer.active() and timer.cancel(), r)[1])
    return done


class Load:
    """
    What the phases of a load worker share: its connections, logons and
    the timed exchange of send and request (L{esf.bench._modes.Bench} has
    the phases themselves, as one load worker process runs its part of
    each; L{LoadGenerator} splits a phase over the workers and merges what
    they measured).

    A phase waits at named points (C{await self.sync(point)}) until every
    worker has reached the point and the coordinator has taken its readings
    (the server's CPU and memory, the workers' CPU): C{start} before the
    timed interval, C{measured} after it, and for idle sessions C{settled}
    before any connection.  Each phase returns what this worker saw, with
    C{t0} and C{t1} (C{time.perf_counter}, which every process on the
    machine reads from one clock) around its timed interval.
    """

    def __init__(self, reactor, opts, progress, sync, tag: str):
        self.reactor = reactor
        self.opts = opts
        self.progress = progress
        self.sync = sync
        self.tag = tag
        self.esf = EsfDialect(opts.size, opts.password, opts.system_token)
        self.bare = BareDialect(self.esf.frame_size)
        self.ws = WsDialect(self.esf)

    def dialect(self, kind: str):
        return self.ws if kind == "ws" else self.esf if kind == "esf" else self.bare

    def connect(self, server, dialect, name: str, group: str | None = None) -> Conn:
        conn = Conn(name, dialect.hello(name, group), dialect.hello_parser())
        node = server.node_for(name)
        port = node.ws_port if dialect.kind == "ws" else node.port
        self.reactor.connectTCP(node.host, port, _ConnFactory(conn), timeout=10)
        return conn

    def log_on(
        self,
        server,
        dialect,
        names: list[str],
        stage: str,
        deadline: float,
        window: int,
        groups: dict[str, str] | None = None,
        logged_on=None,
    ) -> defer.Deferred:
        """
        Open one logged-on connection per name, at most C{window} at a time
        (the progress C{stage}); C{groups}: the group of each name, for the
        relays, which learn it at logon; C{logged_on}, if given, is called
        with each connection as soon as it is logged on.  Fires with
        C{(conns, failures, first_error, t0, t1)}.
        """
        conns: list[Conn] = []
        state = {"next": 0, "inflight": 0, "failures": 0, "error": None, "finished": 0}
        done = defer.Deferred()
        t0 = time.perf_counter()

        def finish():
            if not done.called:
                timer.cancel() if timer.active() else None
                self.progress.stop()
                done.callback((conns, state["failures"], state["error"], t0, time.perf_counter()))

        def ok(conn):
            conns.append(conn)
            if logged_on is not None:
                logged_on(conn)
            settle()

        def failed(failure):
            state["failures"] += 1
            if state["error"] is None:
                state["error"] = str(failure.value)
            settle()

        def settle():
            state["inflight"] -= 1
            state["finished"] += 1
            if state["finished"] == len(names):
                finish()
            else:
                start_more()

        def start_more():
            while state["inflight"] < window and state["next"] < len(names) and not done.called:
                name = names[state["next"]]
                state["next"] += 1
                state["inflight"] += 1
                group = groups.get(name) if groups is not None else None
                self.connect(server, dialect, name, group).ready.addCallbacks(ok, failed)

        def too_late():
            state["error"] = (
                state["error"] or f"logons still unanswered after the {self.opts.duration:g} s cap"
            )
            state["failures"] += len(names) - state["finished"]
            finish()

        timer = self.reactor.callLater(max(deadline - time.perf_counter(), 0.1), too_late)
        self.progress.start(stage, len(names), lambda: state["finished"])
        if not names:
            finish()
        else:
            start_more()
        return done

    async def _pairs(
        self, server, dialect, indices: list[int], prefix: str, deadline: float, window: int
    ):
        senders = [f"{prefix[0]}{self.tag}{i}" for i in indices]
        receivers = [f"{prefix[1]}{self.tag}{i}" for i in indices]
        conns, failures, error, _, _ = await self.log_on(
            server, dialect, senders + receivers, "log on", deadline, window
        )
        if failures:
            await close_all(self.reactor, conns)
            raise BenchError(f"{failures} of {2 * len(indices)} logons failed; first: {error}")
        by_name = {c.name: c for c in conns}
        if server.cluster:
            # Cluster nodes learn of logons on other nodes through Redis
            # (within milliseconds): let them before anything is sent.
            await task.deferLater(self.reactor, 0.5, lambda: None)
        return [(by_name[s], by_name[r]) for s, r in zip(senders, receivers)], conns

    async def _exchange(
        self,
        server,
        dialect,
        part: dict,
        mode: str,
        names: str,
        pairing,
        members=None,
        goal: int | None = None,
    ):
        """
        The timed part of send, request and fan-out: log the pairs on
        (C{members(deadline)} instead, when given, for the groups of the
        fan-out: it gives each group's sender and other members), warm the
        server up with a round of C{--warmup} of each pair's share, untimed,
        then make each pair's state (C{pairing()} gives the C{make_pair(sender,
        receiver, share, totals, done, pairs)} of a round, which makes a
        L{_Pair}), start every pair at the C{start} sync point and wait until
        each has done its share, one fails, or the C{--duration} cap.
        Returns the states, the count done and C{{"t0", "t1", "capped"}}.
        C{goal}: the count that the shares make, if not their sum (the
        deliveries of the fan-out's broadcasts).

        A server that stops answering (nothing arrives for L{stall_seconds})
        fails the phase: it is not a slow server whose figures the cap
        would report.
        """
        deadline = time.perf_counter() + self.opts.duration
        if members is None:
            couples, conns = await self._pairs(
                server, dialect, part["pairs"], names, deadline, part["window"]
            )
        else:
            couples, conns = await members(deadline)
        lost = []
        for c in conns:
            c.on_lost = lost.append
        shares = part["shares"]
        # The warm-up: the same traffic, a fraction of it, before the clock
        # starts (the servers and the relays alike: on PyPy it is their JIT's
        # warm-up, which a long-lived server pays once).
        unit = "deliveries" if members else mode + "s"
        if goal is None:
            goal = sum(shares)
        warmup = [math.ceil(share * self.opts.warmup) for share in shares]
        if any(warmup):
            states, totals, outcome = await self._round(couples, warmup, pairing(), deadline)
            try:
                self._check_round(states, lost, conns, outcome, f"{totals['count']} {unit}")
                if outcome == "capped":
                    raise BenchError(f"the warm-up took longer than --duration ({mode})")
            except BenchError:
                await close_all(self.reactor, conns)
                raise
        await self.sync("start")
        t0 = time.perf_counter()
        states, totals, outcome = await self._round(
            couples, shares, pairing(), deadline, (mode, goal)
        )
        t1 = time.perf_counter()
        await self.sync("measured")
        await close_all(self.reactor, conns)
        self._check_round(states, lost, conns, outcome, f"{totals['count']} of {goal} {unit}")
        return states, totals["count"], {"t0": t0, "t1": t1, "capped": outcome == "capped"}

    async def _round(self, couples, shares, make_pair, deadline: float, progress=None):
        """
        One round of an exchange: each couple does its share; returns the
        states, the totals and how the round ended (C{"done"}, C{"error"},
        C{"capped"} at C{deadline}, C{"stalled"}).  C{progress}: the mode
        and the goal the progress bar shows (the timed round).
        """
        done = defer.Deferred()
        totals = {"count": 0, "pairs_done": 0}
        states = []
        for (sender, receiver), share in zip(couples, shares):
            st = make_pair(sender, receiver, share, totals, done, len(couples))
            states.append(st)
            if share == 0:
                st.finished()
        if progress is not None:
            self.progress.start(*progress, lambda: totals["count"])
        timer = self.reactor.callLater(
            max(deadline - time.perf_counter(), 0.1),
            lambda: done.called or done.callback("capped"),
        )
        stall = stall_seconds(self.opts.duration)
        seen = [totals["count"], self.reactor.seconds()]

        def watch() -> None:
            if totals["count"] != seen[0]:
                seen[:] = [totals["count"], self.reactor.seconds()]
            elif self.reactor.seconds() - seen[1] >= stall and not done.called:
                done.callback("stalled")

        watchdog = task.LoopingCall(watch)
        watchdog.clock = self.reactor
        watchdog.start(stall / 10, now=False)
        for st in states:
            st.begin()
        outcome = await done
        watchdog.stop()
        if timer.active():
            timer.cancel()
        if progress is not None:
            self.progress.stop()
        return states, totals, outcome

    def _check_round(self, states, lost, conns, outcome: str, done: str) -> None:
        """
        Raise L{BenchError} if a round failed (C{done}: what it got done).
        """
        errors = [st.error for st in states if st.error]
        if errors:
            raise BenchError(errors[0])
        if lost:
            raise BenchError(f"{len(lost)} connection(s) lost during the run")
        unexpected = sum(c.unexpected for c in conns)
        if unexpected:
            raise BenchError(f"senders received {unexpected} unexpected bytes (an error reply?)")
        if outcome == "stalled":
            stall = stall_seconds(self.opts.duration)
            raise BenchError(
                f"the server stopped answering: nothing arrived for {stall:g} s ({done} done)"
            )
