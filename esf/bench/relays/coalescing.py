#!/usr/bin/env python3
"""
A bare Twisted relay that writes once per destination per read: the
yardstick that esf-bench measures the esf server against by default.

It speaks the framing of C{bare.py} (the write-per-frame relay, kept as
a second yardstick) and makes the same checks, but works on the read buffer
itself:

- Frames are a 4-byte little-endian length followed by that many bytes.  The
  first frame on a connection is the peer's name (and, after a zero byte,
  the group it joins); the relay answers it with an empty frame (four zero
  bytes).  Every later frame starts with C{u8 length} + the destination's
  name, and is forwarded unchanged, length prefix included, to the
  connection that registered that name, or, when the name is a group's, to
  every connection of the group but its sender's (a broadcast).
- Checks, on every frame: the length is at least 1 and at most
  L{MAX_FRAME} and the destination's name lies inside the frame (else the
  frames before it are forwarded and the connection is aborted); the
  destination is looked up among the connected names (a frame for an
  unknown name is counted and dropped).
- Consecutive frames for one destination are forwarded as one slice of the
  read buffer; when a read holds frames for several destinations, each
  destination's slices are gathered on its transport (a list, and the
  list of transports with output: no dictionary) and joined into one
  C{write} at the end of the read.  A run of broadcasts to one group is one
  slice too, gathered for every member of the group as a run to that
  member would be.  No object is made per frame: from a run's second frame
  on, a frame whose header (length, destination) is byte for byte that of
  the frame before it is checked with one C{bytes.startswith} at its
  offset, which proves the same length bound and the same destination;
  any other frame takes the full check and a lookup
  (C{--lookup-every-frame} makes every frame take them).  (The header is
  kept only once a run has a second frame: frames for many receivers in
  turn, one each, would pay for a copy of every header.)  The route of a
  run is valid for the rest of the read: nothing else runs between two
  frames of one read, so no connection can come or go.

CPython's cyclic GC is set as C{twistd esf} sets it (C{--gc-threshold}, same
default): the comparison is of the relays, not of their GC settings.

    python esf/bench/relays/coalescing.py --port 4600 [--interface 127.0.0.1]

The connections' bookkeeping (names, routes, the welcome), the bound
L{MAX_FRAME} and the options are C{bare.py}'s, imported from beside this
file: only the reading of frames differs.
"""

from __future__ import annotations

import sys

if __package__:  # imported as esf.bench.relays.coalescing
    from .bare import _LENGTH, MAX_FRAME, register, relay_options, serve
    from .bare import RelayFactory as _WritePerFrameFactory
    from .bare import RelayProtocol as _WritePerFrameProtocol
else:  # run by path, as esf-bench runs it: bare.py is beside this file, on sys.path
    from bare import _LENGTH, MAX_FRAME, register, relay_options, serve  # type: ignore[no-redef]
    from bare import RelayFactory as _WritePerFrameFactory  # type: ignore[no-redef]
    from bare import RelayProtocol as _WritePerFrameProtocol  # type: ignore[no-redef]

__all__ = ["MAX_FRAME", "RelayFactory", "RelayProtocol", "main"]


class RelayProtocol(_WritePerFrameProtocol):
    def connectionMade(self) -> None:
        super().connectionMade()
        # The slices gathered for this connection during another's read.
        self.transport.relay_out = None

    def dataReceived(self, data: bytes) -> None:
        buf = self._buffer + data if self._buffer else data
        size = len(buf)
        offset = 0
        if self.name is None:
            if size < 4:
                self._buffer = buf
                return
            (length,) = _LENGTH.unpack_from(buf)
            if length > MAX_FRAME:
                self.transport.abortConnection()
                return
            if 4 + length > size:
                self._buffer = buf
                return
            register(self, buf[4 : 4 + length])
            offset = 4 + length
        routes = self.factory.routes
        groups = self.factory.groups
        cache = self.factory.cache_header
        unpack = _LENGTH.unpack_from
        startswith = buf.startswith
        # The current run: frames [start, offset) for target (a transport,
        # or a group's list of them), each with the header head (length and
        # destination), step bytes long.
        start = offset
        target = None
        head = b""
        step = 0
        pending = None  # the transports gathering slices, once a read has several runs
        bad = False
        while True:
            if step and cache:
                # The common case: the next frame has the header of the last.
                limit = size - step
                while offset <= limit and startswith(head, offset):
                    offset += step
            if size - offset < 4:
                break
            (length,) = unpack(buf, offset)
            if length > MAX_FRAME or length == 0:
                bad = True
                break
            end = offset + 4 + length
            if end > size:
                break
            dest_end = offset + 5 + buf[offset + 4]
            if dest_end > end:
                bad = True
                break
            dest = buf[offset + 5 : dest_end]
            found = routes.get(dest)
            if found is None:
                found = groups.get(dest)
            if found is not target:
                if target is not None and offset > start:
                    if pending is None:
                        pending = []
                    # A run to one receiver, inline: a method call per run
                    # cost interleaved Sends about 10% in process.
                    if type(target) is list:  # a group's members
                        self._gather(pending, target, buf[start:offset])
                    else:
                        out = target.relay_out
                        if out is None:
                            target.relay_out = [buf[start:offset]]
                            pending.append(target)
                        else:
                            out.append(buf[start:offset])
                target = found
                start = offset
                if found is not None:
                    step = 0  # (a run's header is kept from its second frame)
                    offset = end
                    continue
            if found is None:
                self.factory.dropped += 1
                step = 0
                start = offset = end
                continue
            head = buf[offset:dest_end]
            step = end - offset
            offset = end
        if target is not None and offset > start:
            if pending is None and type(target) is not list:
                target.write(buf[start:offset])
            else:
                if pending is None:
                    pending = []
                self._gather(pending, target, buf[start:offset])
        if pending is not None:
            for transport in pending:
                slices = transport.relay_out
                transport.relay_out = None
                transport.write(slices[0] if len(slices) == 1 else b"".join(slices))
        if bad:
            # Frames before the bad one are forwarded; the rest is not read.
            self._buffer = b""
            self.transport.abortConnection()
            return
        self._buffer = buf[offset:] if offset < size else b""

    def _gather(self, pending: list, target, piece: bytes) -> None:
        """
        Add the slice C{piece} to what C{target} gets at the end of the
        read: a transport, or every transport of a group's list but this
        connection's.
        """
        me = self.transport if type(target) is list else None
        for member in target if me is not None else (target,):
            if member is me:
                continue
            out = member.relay_out
            if out is None:
                member.relay_out = [piece]
                pending.append(member)
            else:
                out.append(piece)


class RelayFactory(_WritePerFrameFactory):
    protocol = RelayProtocol

    def __init__(self, cache_header: bool = True):
        super().__init__()
        #: False: every frame takes the full check and a lookup (to see what
        #: the header comparison saves).
        self.cache_header = cache_header


def main(argv: list[str] | None = None) -> None:
    parser = relay_options(__doc__)
    parser.add_argument(
        "--lookup-every-frame",
        action="store_true",
        help="no header comparison: every frame is unpacked and its destination looked up",
    )
    args = parser.parse_args(argv)
    serve(RelayFactory(cache_header=not args.lookup_every_frame), args, "coalescing relay")


if __name__ == "__main__":
    sys.exit(main())
