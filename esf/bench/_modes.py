"""
The measured modes, as a load worker runs its part of each: send (in
pairs or interleaved), fan-out, request, logons, idle.
"""

from __future__ import annotations

import math
import time

from twisted.internet import task

from ._groups import group_name, member_name
from ._load import Load, close_all
from ._patterns import _Group, _RequestPair, _Ring, _SendPair
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

        def pairing():
            if opts.pattern == "interleaved":  # one ring for each round
                return _Ring(dialect, window, size, opts.check).make_pair
            return make_pair

        _, received, timed = await self._exchange(server, dialect, part, "send", "sr", pairing)
        return {"received": received, "frame_bytes": size, "window_per_pair": window, **timed}

    async def fanout(self, server, kind: str, part: dict) -> dict:
        """
        C{--pattern fanout}: this worker's groups (each whole: its members
        all here), each of C{part["group_size"]} members, the first of
        which broadcasts its share to the group; every other member counts
        the copies it gets.  Groups and members are named as
        L{esf.bench._groups} reads them.
        """
        opts = self.opts
        dialect = self.dialect(kind)
        size = dialect.frame_size
        group_size = part["group_size"]
        # What the server may hold for all the members of all the workers
        # together stays within --total-window-bytes, for one member within
        # --window-bytes.
        receivers = part["all_groups"] * (group_size - 1)
        window = max(1, min(opts.window_bytes, opts.total_window_bytes // receivers) // size)
        members_of = {
            k: [member_name(self.tag, k * group_size + j) for j in range(group_size)]
            for k in part["groups"]
        }
        group_of = {
            name: group_name(self.tag, group_size, k)
            for k, names in members_of.items()
            for name in names
        }

        async def log_on(deadline: float):
            everyone = [name for names in members_of.values() for name in names]
            conns, failures, error, _, _ = await self.log_on(
                server, dialect, everyone, "log on", deadline, part["window"], group_of
            )
            if failures:
                await close_all(self.reactor, conns)
                raise BenchError(f"{failures} of {len(everyone)} logons failed; first: {error}")
            by_name = {c.name: c for c in conns}
            groups = [
                (by_name[names[0]], [by_name[name] for name in names[1:]])
                for names in members_of.values()
            ]
            return groups, conns

        def make_group(sender, receivers, share, totals, done, groups):
            group = group_of[sender.name]
            frame = dialect.broadcast(sender.name, group)
            checkers = None
            if opts.check:
                checkers = [dialect.broadcast_checker(sender.name, group) for _ in receivers]
            return _Group(
                sender, receivers, share, totals, done, groups, frame, window, size, checkers
            )

        expected = sum(part["shares"]) * (group_size - 1)
        states, deliveries, timed = await self._exchange(
            server, dialect, part, "fanout", "", lambda: make_group, members=log_on, goal=expected
        )
        return {
            "groups": len(states),
            "deliveries": deliveries,
            "expected": expected,
            "broadcasts": sum(st.sent for st in states),
            # The fewest and the most frames a member got, and the bytes the
            # members got in all: what the count of deliveries is checked
            # against.
            "member_min": min(min(st.got) for st in states),
            "member_max": max(max(st.got) for st in states),
            "share_min": min(st.share for st in states),
            "share_max": max(st.share for st in states),
            "received_bytes": sum(st.bytes for st in states),
            "frame_bytes": size,
            "window_per_group": window,
            **timed,
        }

    async def request(self, server, kind: str, part: dict) -> dict:
        dialect = self.dialect(kind)

        def make_pair(sender, receiver, share, totals, done, pairs):
            return _RequestPair(sender, receiver, share, totals, done, pairs, dialect)

        states, _, timed = await self._exchange(
            server, dialect, part, "request", "qp", lambda: make_pair
        )
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
        # Every session beats from its logon on, every --heartbeat seconds
        # (a tick's share of them at a time), as a client would: with 100,000
        # sessions the logons alone may take longer than the server waits
        # for a frame.
        conns: list = []
        beats: list[bytes] = []
        lost: list = []
        received = [0]

        def count(data):
            received[0] += len(data)

        def logged_on(conn):
            conn.on_lost = lost.append
            conn.on_data = count
            conns.append(conn)
            beats.append(dialect.heartbeat(conn.name))

        tick = 0.1
        cursor = [0]
        sent = [0]

        def beat():
            held = len(conns)
            per_tick = max(1, math.ceil(held * tick / opts.heartbeat))
            start = cursor[0] if cursor[0] < held else 0
            for i in range(start, min(start + per_tick, held)):
                conn = conns[i]
                if not conn.lost:
                    conn.transport.write(beats[i])
                    sent[0] += 1
            cursor[0] = start + per_tick

        loop = task.LoopingCall(beat)
        loop.clock = self.reactor
        loop.start(tick, now=False)
        _, failures, error, logon_t0, logon_t1 = await self.log_on(
            server, dialect, names, "log on", deadline, part["window"], logged_on=logged_on
        )
        if failures:
            loop.stop()
            await close_all(self.reactor, conns)
            raise BenchError(f"{failures} of {len(names)} logons failed; first: {error}")
        hold = min(opts.hold, max(deadline - time.perf_counter(), 0.1))
        await self.sync("start")
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
