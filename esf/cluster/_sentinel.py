"""
Finding the master Redis through Sentinel.

L{SentinelEndpoint} is the endpoint of a L{RedisLink<esf.cluster._link.RedisLink>}
whose URL is C{redis+sentinel://...}: before every connection it asks the
Sentinels, in turn, which server is the master of the service
(C{SENTINEL GET-MASTER-ADDR-BY-NAME}), each question bounded, and connects
there.  The link then checks with C{ROLE} that the server is the master,
and drops a connection whose server says it no longer is; so the link
follows a failover.  This is what Redis's guidelines for Sentinel clients
ask of a client (https://redis.io/docs/reference/sentinel-clients/).

Why not txredisapi's own C{Sentinel}: it runs on the global reactor, waits
up to 10 s for the Sentinels whatever the link's bound, keeps a lazy
connection pool to every Sentinel (which queues commands while
disconnected), and C{master_for} hands back a pool of its own rather than
an endpoint for the link's L{ClientService}.  This uses txredisapi's
protocol only, for one short exchange with one Sentinel at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

from twisted.internet import endpoints
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

__all__ = ["SentinelEndpoint", "MasterNotFound", "ready"]

log = Logger(namespace="esf.cluster")


class MasterNotFound(ConnectError):
    """
    No Sentinel named the master of the service (each one's reason is in
    the message).
    """

    def __init__(self, message: str):
        super().__init__(string=message)  # type: ignore[no-untyped-call]  # no annotations

    def __str__(self) -> str:
        return str(self.args[0])


class _AskFactory(Factory):
    """
    Builds the txredisapi protocol of one question to a Sentinel.  The
    protocol reads C{isLazy} and calls back C{stopTrying} and
    C{connectionError} on its factory when the Sentinel refuses AUTH.
    """

    isLazy = True
    noisy = False  # not two log lines per question

    def __init__(self, reactor: Any, username: str | None, password: str | None):
        self.reactor = reactor
        self.username = username
        self.password = password
        self.error: str | None = None

    def buildProtocol(self, addr: Any) -> Any:
        import txredisapi  # type: ignore[import-untyped]

        protocol = txredisapi.RedisProtocol(
            charset=None,
            replyTimeout=None,  # the endpoint bounds the whole question
            password=self.password,
            dbid=None,  # a Sentinel has no databases
            convertNumbers=False,
            username=self.username,
        )
        protocol.factory = self
        # Its parser goes on after a bulk string on the global reactor's
        # callLater otherwise: the endpoint's reactor instead.
        protocol.callLater = self.reactor.callLater
        return protocol

    def stopTrying(self) -> None:
        pass

    def connectionError(self, why: str) -> None:
        self.error = why


@implementer(IStreamClientEndpoint)
class SentinelEndpoint:
    """
    Connects to the master of C{service} that the Sentinels name at each
    connection.

    The Sentinels are asked in turn, each question (connecting, AUTH, the
    answer) bounded by C{timeout} on C{reactor}; the first that names a
    master moves to the front of the list (as Redis's guidelines for
    Sentinel clients say), and a Sentinel that does not know the service,
    or does not answer, is passed over.  When none names one, the
    connection fails with L{MasterNotFound}, and the link tries again
    after its backoff.

    @param sentinels: the Sentinels' (host, port).
    @param username: the Sentinels' user, if they have ACLs.
    @param password: the Sentinels' password (their C{requirepass}), if
        they require one; not the master's.
    @param endpoint_for: makes the endpoint of a (host, port): a Sentinel's
        or the master's (a L{HostnameEndpoint} bounded by C{timeout} by
        default).

    @ivar master: the master's (host, port) the Sentinels named last, or
        C{None}.
    """

    def __init__(
        self,
        reactor: Any,
        sentinels: Sequence[tuple[str, int]],
        service: str,
        *,
        timeout: float,
        username: str | None = None,
        password: str | None = None,
        endpoint_for: Callable[[str, int], IStreamClientEndpoint] | None = None,
    ):
        if not sentinels:
            raise ValueError("no Sentinel to ask")
        self.endpoint_for = endpoint_for or self._hostname_endpoint
        self.reactor = reactor
        self.sentinels = list(sentinels)
        self.service = service
        self.timeout = timeout
        self.username = username
        self.password = password
        self.master: tuple[str, int] | None = None
        #: What was last logged of a failure to find the master: logged
        #: again only when it changes (the link retries every 2 s at most).
        self._told: str | None = None

    def __repr__(self) -> str:
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
        return f"<SentinelEndpoint {self.service!r} via {hosts}>"

    def _hostname_endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        return endpoints.HostnameEndpoint(self.reactor, host, port, timeout=self.timeout)

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, protocolFactory: IProtocolFactory) -> IProtocol:
        host, port = await self.find_master()
        protocol: IProtocol = await self.endpoint_for(host, port).connect(protocolFactory)
        return protocol

    async def find_master(self) -> tuple[str, int]:
        """
        The master's (host, port), as the first Sentinel that knows it says.

        @raise MasterNotFound: no Sentinel named one.
        """
        reasons = []
        for sentinel in list(self.sentinels):
            host, port = sentinel
            try:
                answer = await self._ask(host, port)
            except CancelledError:
                raise  # the connection attempt was given up
            except Exception as e:
                reasons.append(f"{host}:{port}: {_reason(e)}")
                continue
            if answer is None:
                reasons.append(f"{host}:{port}: does not know {self.service!r}")
                continue
            self.sentinels.remove(sentinel)
            self.sentinels.insert(0, sentinel)
            if answer != self.master:
                log.info(
                    "Sentinel {sentinel} names {master} the master of {service}",
                    sentinel=f"{host}:{port}",
                    master=f"{answer[0]}:{answer[1]}",
                    service=self.service,
                    esf_event="cluster_sentinel_master",
                )
            self.master = answer
            self._told = None
            return answer
        failure = MasterNotFound(
            f"no Sentinel named the master of {self.service!r}: {'; '.join(reasons)}"
        )
        if str(failure) != self._told:
            self._told = str(failure)
            log.error("{failure}", failure=self._told, esf_event="cluster_redis_error")
        raise failure

    async def _ask(self, host: str, port: int) -> tuple[str, int] | None:
        """
        What the Sentinel at C{host}:C{port} says the master's address is
        (C{None}: it does not know the service), within C{timeout}.
        """
        factory = _AskFactory(self.reactor, self.username, self.password)
        protocols: list[Any] = []

        async def exchange() -> Any:
            protocol: Any = await self.endpoint_for(host, port).connect(factory)
            protocols.append(protocol)
            await ready(
                protocol, lambda: ConnectError(string=factory.error or "closed the connection")
            )
            return await protocol.execute_command(
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service
            )

        asked = Deferred.fromCoroutine(exchange())
        asked.addTimeout(self.timeout, self.reactor)
        try:
            reply = await asked
        finally:
            for protocol in protocols:
                if protocol.transport is not None:
                    protocol.transport.abortConnection()
        if reply is None:
            return None
        try:
            master_host, master_port = reply
            return master_host.decode("ascii"), int(master_port)
        except (TypeError, ValueError, UnicodeError):
            raise ValueError(f"answered {reply!r}, not an address") from None


def ready(protocol: Any, closed: Callable[[], Exception]) -> Deferred[Any]:
    """
    Fires with txredisapi's C{protocol} once it is ready (its AUTH and
    SELECT done), or fails with C{closed()} if its connection closes first
    (as it does when AUTH or SELECT fails).
    """
    d: Deferred[Any] = Deferred()

    def connected(p: Any) -> None:
        if not d.called:
            d.callback(p)

    def gone(_: Any) -> None:
        if not d.called:
            d.errback(closed())

    protocol.whenConnected().addCallback(connected)
    protocol.whenDisconnected().addCallback(gone)
    return d


def _reason(e: BaseException) -> str:
    """
    C{e} in a few words, for a log line.
    """
    if isinstance(e, TimeoutError):
        return "no answer in time"
    if isinstance(e, ConnectError):
        return e.osError if getattr(e, "osError", None) else str(e)
    return str(e) or type(e).__name__
