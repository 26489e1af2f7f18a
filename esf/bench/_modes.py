"""
The measured modes, as a load worker runs its part of each: send (in
pairs or interleaved), request, logons, idle.
"""

from __future__ import annotations

import math
import time

from twisted.internet import task

from ._load import Load, close_all
from ._patterns import _RequestPair, _Ring, _SendPair
from ._wire import BenchError


class Bench(Load):
    """
    The phases of a load worker, one method per mode: each takes the
    server's address, the kind of server and this worker's part of the
    phase, and returns what this worker measured.
    """

    async def send(self, server, kind: str, part: dict) -> dict:
        opts = self.opts
        dialect = self.dialect(kind)
        size = dialect.frame_size
        window = max(
            1, min(opts.window_bytes, opts.total_window_bytes // part["all_pairs"]) // size
        )

        def make_pair(sender, receiver, share, totals, done, pairs):
            frame = dialect.message(sender.name, receiver.name)
            st = _SendPair(sender, receiver, share, totals, done, pairs, frame, window, size)
            if opts.check:
                st.checker = dialect.checker(sender.name, receiver.name)
            receiver.on_data = st.received_checked if opts.check else st.received
            return st

        if opts.pattern == "interleaved":
            make_pair = _Ring(dialect, window, size, opts.check).make_pair

        _, received, timed = await self._exchange(server, dialect, part, "send", "sr", make_pair)
        return {"received": received, "frame_bytes": size, "window_per_pair": window, **timed}

    async def request(self, server, kind: str, part: dict) -> dict:
        dialect = self.dialect(kind)

        def make_pair(sender, receiver, share, totals, done, pairs):
            return _RequestPair(sender, receiver, share, totals, done, pairs, dialect)

        states, _, timed = await self._exchange(server, dialect, part, "request", "qp", make_pair)
        return {
            "rtts": [r for st in states for r in st.rtts],
            "frame_bytes": dialect.frame_size,
            **timed,
        }

    async def logons(self, server, kind: str, part: dict) -> dict:
        dialect = self.dialect(kind)
        names = [f"L{self.tag}{i}" for i in part["names"]]
        await self.sync("start")
        deadline = time.perf_counter() + self.opts.duration
        conns, failures, error, t0, t1 = await self.log_on(
            server, dialect, names, "logons", deadline, part["window"]
        )
        await self.sync("measured")
        await close_all(self.reactor, conns)
        if failures:
            raise BenchError(f"{failures} of {len(names)} logons failed; first: {error}")
        return {"logged_on": len(conns), "t0": t0, "t1": t1}

    async def idle(self, server, kind: str, part: dict) -> dict:
        opts = self.opts
        dialect = self.dialect(kind)
        names = [f"I{self.tag}{i}" for i in part["names"]]
        deadline = time.perf_counter() + opts.duration
        await self.sync("settled")  # the coordinator reads the server's RSS before any logon
        conns, failures, error, logon_t0, logon_t1 = await self.log_on(
            server, dialect, names, "log on", deadline, part["window"]
        )
        if failures:
            await close_all(self.reactor, conns)
            raise BenchError(f"{failures} of {len(names)} logons failed; first: {error}")
        lost = []
        received = [0]

        def count(data):
            received[0] += len(data)

        beats = [dialect.heartbeat(c.name) for c in conns]
        for c in conns:
            c.on_lost = lost.append
            c.on_data = count
        tick = 0.1
        per_tick = max(1, math.ceil(len(conns) * tick / opts.heartbeat)) if conns else 0
        cursor = [0]
        sent = [0]

        def beat():
            start = cursor[0]
            for i in range(start, min(start + per_tick, len(conns))):
                conn = conns[i]
                if not conn.lost:
                    conn.transport.write(beats[i])
                    sent[0] += 1
            cursor[0] = start + per_tick if start + per_tick < len(conns) else 0

        hold = min(opts.hold, max(deadline - time.perf_counter(), 0.1))
        await self.sync("start")
        loop = task.LoopingCall(beat)
        loop.clock = self.reactor
        if conns:
            loop.start(tick)
        t0 = time.perf_counter()
        self.progress.start("hold", hold, lambda: min(hold, time.perf_counter() - t0), unit="s")
        await task.deferLater(self.reactor, hold, lambda: None)
        self.progress.stop()
        if loop.running:
            loop.stop()
        t1 = time.perf_counter()
        await self.sync("measured")
        await close_all(self.reactor, conns)
        if lost:
            raise BenchError(f"{len(lost)} idle session(s) were closed while held")
        return {
            "sessions": len(conns),
            "heartbeats_sent": sent[0],
            "logon_t0": logon_t0,
            "logon_t1": logon_t1,
            "t0": t0,
            "t1": t1,
        }
