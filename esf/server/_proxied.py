"""
Connections through a load balancer that speaks the PROXY protocol
(HAProxy's C{send-proxy} and C{send-proxy-v2}): C{twistd esf --port
haproxy:tcp:4530}.

Twisted's C{haproxy:} endpoint wrapper reads the PROXY header and then
answers C{getPeer} with the client's address, but it connects the wrapped
protocol at once, before the header has arrived: whatever reads the
peer's address when the connection is made (the session's address, which
GetMyIPE answers and the logs, the audit and the admin API show; a
WebSocket endpoint's refusal of a flooding host; autobahn's peer) would
read the balancer's.  L{ProxiedEndpoint} wraps an endpoint with a
L{ProxiedFactory} whose connections are made known to the wrapped
protocol only once the header has been read; a connection whose header
has not come within the deadline is aborted.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone

# Twisted exports only proxyEndpoint; its wrapper classes (and their
# _proxyInfo) are used here so that the parsing of both header versions stays
# Twisted's.  tests/test_proxied.py pins what is relied on.
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

__all__ = ["PREFIX", "ProxiedEndpoint", "ProxiedFactory", "proxied_description"]

#: How an endpoint description asks for the PROXY protocol (Twisted's own).
PREFIX = "haproxy:"


def proxied_description(description: str) -> str | None:
    """
    The wrapped endpoint's description if C{description} asks for the
    PROXY protocol (C{haproxy:tcp:4530} gives C{tcp:4530}), else C{None}.
    """
    return description[len(PREFIX) :] if description.startswith(PREFIX) else None


class _Held(Protocol):
    """
    Takes what the PROXY parser passes on while the header is being read:
    the bytes that followed the header in the same read.
    """

    def __init__(self) -> None:
        self.data: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)


class ProxiedConnection(HAProxyProtocolWrapper):
    """
    One connection through the balancer: the wrapped protocol is connected
    once the PROXY header has been read, so that it sees the client's
    address from the start.
    """

    factory: ProxiedFactory
    _deadline: IDelayedCall | None = None
    _connected = False

    def makeConnection(self, transport: Any) -> None:
        # ProtocolWrapper.makeConnection without connecting the wrapped
        # protocol, which waits for the header.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)  # type: ignore[no-untyped-call]
        self._deadline = self.factory.clock.callLater(self.factory.timeout, self._too_late)

    def dataReceived(self, data: bytes) -> None:
        if self._connected:
            self.wrappedProtocol.dataReceived(data)
            return
        wrapped, held = self.wrappedProtocol, _Held()
        self.wrappedProtocol = held
        try:
            super().dataReceived(data)  # parses; closes on a bad header
        finally:
            self.wrappedProtocol = wrapped
        if self._proxyInfo is None or self.disconnecting:
            return
        self._cancel_deadline()
        self._connected = True
        # This wrapper is the protocol's transport, as for every ProtocolWrapper.
        wrapped.makeConnection(self)  # type: ignore[arg-type]
        for rest in held.data:
            if self._connected:
                wrapped.dataReceived(rest)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        if self._connected:
            self._connected = False
            super().connectionLost(reason)  # type: ignore[no-untyped-call]
        else:
            self.factory.unregisterProtocol(self)  # type: ignore[no-untyped-call]

    def _too_late(self) -> None:
        self._deadline = None
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None


class ProxiedFactory(HAProxyWrappingFactory):
    """
    Wraps a factory's protocols in L{ProxiedConnection}s.

    @ivar timeout: seconds a connection has to send its PROXY header.
    @ivar clock: what times it.
    """

    protocol = ProxiedConnection  # type: ignore[assignment]  # a subclass of the base's

    def __init__(self, wrapped: Any, timeout: float, clock: IReactorTime):
        super().__init__(wrapped)  # type: ignore[no-untyped-call]
        self.timeout = timeout
        self.clock = clock


@implementer(IStreamServerEndpoint)
class ProxiedEndpoint:
    """
    A server endpoint whose connections come from a PROXY protocol balancer.
    """

    def __init__(self, wrapped: IStreamServerEndpoint, timeout: float, clock: IReactorTime):
        self.wrapped = wrapped
        self.timeout = timeout
        self.clock = clock

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        return self.wrapped.listen(ProxiedFactory(factory, self.timeout, self.clock))
