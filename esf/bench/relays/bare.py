#!/usr/bin/env python3
"""
A bare Twisted relay: the yardstick that esf-bench measures the esf server
against, on the same machine in the same run.

It does what an esf server's relay path must do at the least, and nothing
else: frame a byte stream, look the destination up in a dict, forward the
frame unchanged.  No authentication, no validation beyond the framing, no
heartbeat bookkeeping, no logging.

Frames are a 4-byte little-endian length followed by that many bytes.

- The first frame on a connection is the peer's name, optionally followed
  by a zero byte and the name of the group it joins.  The relay answers it
  with an empty frame (four zero bytes), so the peer knows it can be
  reached.
- Every later frame starts with C{u8 length} + the destination's name; the
  whole frame, length prefix included, is written unchanged to the
  connection that registered that name.  A frame for an unknown name is
  counted and dropped.  A frame may be addressed to its own sender (an echo,
  which stands in for a heartbeat).
- A frame whose destination names no connection but a group is a
  broadcast: it is written, unchanged, to every connection of that group
  but its sender's (the work of an esf Broadcast, whose server asks its
  group manager for the members where this relay learnt them at the name
  frame).
- Checks, on every frame: the length is at most L{MAX_FRAME} (and, after
  the name, at least 1) and the destination's name lies inside the frame;
  a frame that fails them aborts the connection (the frames before it are
  already forwarded).

CPython's cyclic GC is set as C{twistd esf} sets it (C{--gc-threshold}, same
default): the comparison is of the relays, not of their GC settings.

    python esf/bench/relays/bare.py --port 4600 [--interface 127.0.0.1]
"""

from __future__ import annotations

import argparse
import gc
import struct
import sys

from twisted.internet.protocol import Factory, Protocol

#: Frames longer than this close the connection (the same bound as esf's
#: default maximum message size).
MAX_FRAME = 1024 * 1024

_LENGTH = struct.Struct("<I")
_WELCOME = b"\x00\x00\x00\x00"


def register(protocol, hello: bytes) -> None:
    """
    Take the name frame of C{protocol}'s peer, whose payload C{hello} is
    its name and, after a zero byte, its group, if any: route the name to
    it, add it to its group, welcome it.
    """
    name, _, group = hello.partition(b"\x00")
    factory = protocol.factory
    protocol.name = name
    factory.routes[name] = protocol.transport
    if group:
        protocol.group = group
        factory.groups.setdefault(group, []).append(protocol.transport)
    protocol.transport.write(_WELCOME)


class RelayProtocol(Protocol):
    name: bytes | None = None
    group: bytes | None = None

    def connectionMade(self) -> None:
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:  # a TCP transport
            no_delay(True)
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        buf = self._buffer + data if self._buffer else data
        size = len(buf)
        offset = 0
        routes = self.factory.routes
        unpack = _LENGTH.unpack_from
        while size - offset >= 4:
            (length,) = unpack(buf, offset)
            if length > MAX_FRAME:
                self._abort()
                return
            end = offset + 4 + length
            if end > size:
                break
            if self.name is None:
                register(self, buf[offset + 4 : end])
            else:
                if length == 0:
                    self._abort()
                    return
                dest_end = offset + 5 + buf[offset + 4]
                if dest_end > end:
                    # The destination's name runs past the end of the frame.
                    self._abort()
                    return
                dest = buf[offset + 5 : dest_end]
                target = routes.get(dest)
                if target is not None:
                    target.write(buf[offset:end])
                else:
                    members = self.factory.groups.get(dest)
                    if members is not None:
                        frame = buf[offset:end]
                        me = self.transport
                        for member in members:
                            if member is not me:
                                member.write(frame)
                    else:
                        self.factory.dropped += 1
            offset = end
        self._buffer = buf[offset:] if offset < size else b""

    def _abort(self) -> None:
        # Frames before the bad one are forwarded; the rest is not read.
        self._buffer = b""
        self.transport.abortConnection()

    def connectionLost(self, reason) -> None:
        routes = self.factory.routes
        if self.name is not None and routes.get(self.name) is self.transport:
            del routes[self.name]
        members = self.factory.groups.get(self.group) if self.group is not None else None
        if members is not None:
            # A list, not a set: a broadcast writes to the members in the
            # order they joined, and one leaving costs one pass over them.
            members.remove(self.transport)
            if not members:
                del self.factory.groups[self.group]


class RelayFactory(Factory):
    protocol = RelayProtocol
    noisy = False

    def __init__(self):
        self.routes: dict[bytes, object] = {}
        #: Each group's connections, in the order they joined.
        self.groups: dict[bytes, list] = {}
        self.dropped = 0


def relay_options(doc: str) -> argparse.ArgumentParser:
    """
    The options of a relay script (its docstring's first paragraph as the
    description): where it listens.
    """
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument(
        "--backlog", type=int, default=50, help="listen backlog (Twisted's default)"
    )
    parser.add_argument(
        "--gc-threshold",
        type=int,
        default=10_000,
        help="as twistd esf's option: freeze start-up's objects and collect the youngest "
        "generation every this many allocations (0: CPython's settings)",
    )
    return parser


def serve(factory: Factory, args: argparse.Namespace, what: str) -> None:
    """
    Listen with C{factory} where C{args} say, say so, run the reactor.
    """
    from twisted.internet import reactor

    reactor.listenTCP(args.port, factory, backlog=args.backlog, interface=args.interface)
    print(f"{what} listening on {args.interface}:{args.port}", flush=True)
    if args.gc_threshold and hasattr(gc, "freeze"):
        gc.collect()
        gc.freeze()
        gc.set_threshold(args.gc_threshold, *gc.get_threshold()[1:])
    reactor.run()


def main(argv: list[str] | None = None) -> None:
    serve(RelayFactory(), relay_options(__doc__).parse_args(argv), "bare relay")


if __name__ == "__main__":
    sys.exit(main())
