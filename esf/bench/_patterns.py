"""
Who sends to whom in the timed phases, and what each end counts: a
sender/receiver pair of send mode (L{_SendPair}), the interleaved ring
(L{_Ring}), a group of the fan-out pattern (L{_Group}), and a request pair
(L{_RequestPair}).
"""

from __future__ import annotations

import struct
import time

from esf.wire._frames import FrameError

from ._wire import BenchError

_I32 = struct.Struct("<i")


class _Pair:
    """
    One sender/receiver pair of a timed phase (L{esf.bench._load.Load._exchange}): adds
    what it got done to C{totals["count"]}, and fires C{done} once every
    pair has done its share (with C{"error"} as soon as one fails).
    """

    error = None
    _finished = False

    def __init__(self, sender, receiver, share, totals, done, pairs):
        self.sender, self.receiver = sender, receiver
        self.share, self.totals, self.done, self.pairs = share, totals, done, pairs

    def begin(self) -> None:
        raise NotImplementedError

    def fail(self, text: str) -> None:
        self.error = text
        if not self.done.called:
            self.done.callback("error")

    def finished(self) -> None:
        if self._finished:
            return
        self._finished = True
        self.totals["pairs_done"] += 1
        if self.totals["pairs_done"] == self.pairs and not self.done.called:
            self.done.callback("done")


class _SendPair(_Pair):
    checker = None

    def __init__(self, sender, receiver, share, totals, done, pairs, frame, window, size):
        super().__init__(sender, receiver, share, totals, done, pairs)
        # size: the bytes a receiver gets per message (over WebSocket, not
        # what the sender writes, which is masked).
        self.frame, self.size = frame, size
        self.window = window
        self.sent = 0
        self.got = 0
        self.bytes = 0
        self.low = max(1, window // 2)
        self._batches: dict[int, bytes] = {}

    def begin(self) -> None:
        self.pump()

    def pump(self) -> None:
        inflight = self.sent - self.got
        if self.sent >= self.share or inflight > self.low:
            return
        n = min(self.window - inflight, self.share - self.sent)
        batch = self._batches.get(n)
        if batch is None:
            batch = self.frame * n
            if len(self._batches) < 4:
                self._batches[n] = batch
        self.sender.transport.write(batch)
        self.sent += n

    def received(self, data: bytes) -> None:
        self.bytes += len(data)
        got = self.bytes // self.size
        self.totals["count"] += got - self.got
        self.got = got
        if got >= self.share:
            self.finished()
        else:
            self.pump()

    def received_checked(self, data: bytes) -> None:
        try:
            n = self.checker.feed(data)
        except (BenchError, FrameError) as e:
            self.sender.transport.abortConnection()
            self.fail(str(e))
            return
        self.got += n
        self.totals["count"] += n
        if self.got >= self.share:
            self.finished()
        else:
            self.pump()


class _Ring:
    """
    The senders and receivers of one worker in the interleaved pattern
    (C{--pattern interleaved}): every sender cycles over every receiver,
    starting at its own (sender i writes to receivers i, i+1, ..., i-1,
    and again), so that consecutive frames of a read go to different
    receivers.  The window is the pairs' windows together, over all of
    them (a receiver cannot tell which sender a frame came from without
    decoding it); each sender's share is what its pair would have sent.
    """

    def __init__(self, dialect, window: int, size: int, check: bool):
        self.dialect, self.window, self.size, self.check = dialect, window, size, check
        self.senders: list[_RingSender] = []
        self.sent = self.got = 0
        self.share = 0
        #: Per sender, its frames to every receiver in turn, repeated: a
        #: batch is one slice of it.
        self._cycles: list[bytes] | None = None
        #: What a sender writes per frame (over WebSocket, masked: not
        #: C{size}, what a receiver gets).
        self._written = 0

    def make_pair(self, sender, receiver, share, totals, done, pairs) -> _RingSender:
        st = _RingSender(self, sender, receiver, share, totals, done, pairs)
        self.senders.append(st)
        self.share += share
        received = [0]

        def count(data: bytes) -> None:
            received[0] += len(data)
            got = received[0] // self.size
            n, st.receiver_got = got - st.receiver_got, got
            self._got(n)

        def checked(data: bytes) -> None:
            try:
                n = st.checker.feed(data)
            except (BenchError, FrameError) as e:
                for other in self.senders:
                    other.sender.transport.abortConnection()
                st.fail(str(e))
                return
            self._got(n)

        receiver.on_data = checked if self.check else count
        return st

    def begin(self) -> None:
        if self._cycles is not None:
            return
        names = [st.receiver.name for st in self.senders]
        n = len(names)
        senders = {st.sender.name for st in self.senders}
        repeat = self.window // n + 2
        self._cycles = []
        for i, st in enumerate(self.senders):
            cycle = b"".join(
                self.dialect.message(st.sender.name, names[(i + k) % n]) for k in range(n)
            )
            self._written = len(cycle) // n  # every frame of a dialect is the same size
            self._cycles.append(cycle * repeat)
            if self.check:
                st.checker = self.dialect.checker(senders, st.receiver.name)
        self.pump()

    def pump(self) -> None:
        inflight = self.sent - self.got
        limit = self.window * len(self.senders)
        if inflight > limit // 2:
            return
        active = [i for i, st in enumerate(self.senders) if st.sent < st.share]
        if not active:
            return
        each = max(1, (limit - inflight) // len(active))
        n_receivers = len(self.senders)
        assert self._cycles is not None
        for i in active:
            st = self.senders[i]
            count = min(each, self.window, st.share - st.sent)
            start = st.sent % n_receivers
            written = self._written
            st.sender.transport.write(self._cycles[i][start * written : (start + count) * written])
            st.sent += count
            self.sent += count

    def _got(self, n: int) -> None:
        if n <= 0:
            return
        self.got += n
        first = self.senders[0]
        first.totals["count"] += n
        if self.got >= self.share:
            for st in self.senders:
                st.finished()
        else:
            self.pump()


class _RingSender(_Pair):
    """
    One sender of a L{_Ring} (and its receiver's count).
    """

    checker = None

    def __init__(self, ring: _Ring, sender, receiver, share, totals, done, pairs):
        super().__init__(sender, receiver, share, totals, done, pairs)
        self.ring = ring
        self.sent = 0
        self.receiver_got = 0

    def begin(self) -> None:
        self.ring.begin()


class _Group(_Pair):
    """
    One group of the fan-out pattern (C{--pattern fanout}): its sender
    broadcasts its share, one frame per broadcast, and each of the other
    members (C{receivers}) counts the copies it gets; C{totals["count"]}
    counts deliveries, one per copy.

    The window is in broadcasts, over the slowest member: the sender
    writes more only while no member is more than half a window behind
    what was sent, so that no member's backlog passes a window of frames
    (what a server holds for it stays within --window-bytes).  The group is
    done when every member has its share.
    """

    def __init__(
        self, sender, receivers, share, totals, done, groups, frame, window, size, checkers=None
    ):
        super().__init__(sender, receivers, share, totals, done, groups)
        self.frame, self.window, self.size = frame, window, size
        self.low = max(1, window // 2)
        self.sent = 0
        #: Frames each member got, and the fewest any got (the members
        #: that have only that many: C{_at_floor}).
        self.got = [0] * len(receivers)
        self.floor = 0
        self._at_floor = len(receivers)
        #: Bytes the members got in all, counted apart from the frames.
        self.bytes = 0
        self._batch = frame * window
        for i, receiver in enumerate(receivers):
            if checkers is None:
                receiver.on_data = self._counter(i)
            else:
                receiver.on_data = self._checked(i, checkers[i])

    def _counter(self, i: int):
        size = self.size
        got = self.got
        have = [0]

        def count(data: bytes) -> None:
            have[0] += len(data)
            self.bytes += len(data)
            self._delivered(i, have[0] // size - got[i])

        return count

    def _checked(self, i: int, checker):
        def check(data: bytes) -> None:
            self.bytes += len(data)
            try:
                n = checker.feed(data)
            except (BenchError, FrameError) as e:
                self.sender.transport.abortConnection()
                self.fail(str(e))
                return
            self._delivered(i, n)

        return check

    def _delivered(self, i: int, n: int) -> None:
        if n <= 0:
            return
        got = self.got
        if got[i] == self.floor:
            self._at_floor -= 1
        got[i] += n
        self.totals["count"] += n
        if self._at_floor == 0:
            # The slowest member moved: find the new floor (one pass over
            # the members each time the floor moves, not each read).
            self.floor = min(got)
            self._at_floor = got.count(self.floor)
            if self.floor >= self.share:
                self.finished()
                return
            self.pump()

    def begin(self) -> None:
        self.pump()

    def pump(self) -> None:
        inflight = self.sent - self.floor
        if self.sent >= self.share or inflight > self.low:
            return
        n = min(self.window - inflight, self.share - self.sent)
        self.sender.transport.write(self._batch[: n * len(self.frame)])
        self.sent += n


class _RequestPair(_Pair):
    def __init__(self, sender, receiver, share, totals, done, pairs, dialect):
        super().__init__(sender, receiver, share, totals, done, pairs)
        self.dialect = dialect
        self.request = dialect.request(sender.name, receiver.name)
        self.response = dialect.response(receiver.name, sender.name)
        self.req_off = dialect.mid_offset_in_request
        self.resp_off = dialect.mid_offset_in_response
        self.size = dialect.frame_size
        self.mid = 0
        self.t0 = 0.0
        self.rtts: list[float] = []
        self._sbuf = b""
        self._rbuf = b""
        sender.on_data = self.answered
        receiver.on_data = self.asked

    def begin(self) -> None:
        self.send()

    def send(self) -> None:
        if self.share == 0:
            return
        self.mid = self.mid % 0x7FFFFFFF + 1
        _I32.pack_into(self.request, self.req_off, self.mid)
        self.t0 = time.perf_counter()
        self.sender.transport.write(bytes(self.request))

    def asked(self, data: bytes) -> None:
        buf = self._rbuf + data if self._rbuf else data
        size = self.size
        offset = 0
        while len(buf) - offset >= size:
            frame = buf[offset : offset + size]
            offset += size
            if not self.dialect.is_request(frame):
                return self.fail(
                    f"the receiver {self.receiver.name} got an unexpected frame: {bytes(frame[:40]).hex()}"
                )
            self.response[self.resp_off : self.resp_off + 4] = frame[
                self.req_off : self.req_off + 4
            ]
            self.receiver.transport.write(bytes(self.response))
        self._rbuf = buf[offset:]

    def answered(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self._sbuf + data if self._sbuf else data
        if len(buf) < self.size:
            self._sbuf = buf
            return
        if len(buf) > self.size:
            return self.fail(f"the sender {self.sender.name} got more than one answer")
        self._sbuf = b""
        if (
            not self.dialect.is_response(buf)
            or _I32.unpack_from(buf, self.resp_off)[0] != self.mid
        ):
            return self.fail(
                f"the sender {self.sender.name} got an unexpected frame: {buf[:40].hex()}"
            )
        self.rtts.append(now - self.t0)
        self.totals["count"] += 1
        if len(self.rtts) >= self.share:
            self.finished()
        else:
            self.send()
