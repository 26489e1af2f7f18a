"""
The cluster's link to Redis: where Redis is (L{RedisURL}), what the cluster
needs of a client (L{IRedisLink}), one connection kept up by Twisted's
L{ClientService} with every call bounded (L{RedisLink}), and the Lua
scripts, kept as files under C{esf/cluster/lua/} (L{script}).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

__all__ = ["RedisURL", "RedisUnavailable", "IRedisLink", "RedisLink", "script"]

log = Logger(namespace="esf.cluster")


def script(name: str) -> bytes:
    """
    The Lua script C{esf/cluster/lua/NAME.lua}, as Redis runs it.
    """
    return resources.files(__package__).joinpath("lua", f"{name}.lua").read_bytes()


class RedisUnavailable(Exception):
    """
    Redis cannot be reached now: not connected, or it did not answer in
    time.
    """


@attrs.frozen
class RedisURL:
    """
    Where Redis is: C{redis://[[user]:password@]host[:port][/db]}, or
    C{rediss://...} for TLS, where C{?ssl_ca_certs=PATH} names the PEM file
    of the authorities that Redis's certificate is checked against (the
    system's by default).
    """

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    password: str | None = attrs.field(default=None, repr=False)
    username: str | None = None
    tls: bool = False
    ca_file: str | None = None

    @classmethod
    def parse(cls, url: str) -> RedisURL:
        """
        @raise ValueError: C{url} is not a Redis URL.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"a Redis URL starts with redis:// or rediss://, not {url!r}")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError(f"bad port in {url!r}") from None
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"the database in {url!r} must be a number, not {path!r}")
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = set(query) - {"ssl_ca_certs"}
        if unknown:
            raise ValueError(f"unknown parameters in a Redis URL: {', '.join(sorted(unknown))}")
        ca_file = query.get("ssl_ca_certs", [None])[-1]
        if ca_file is not None and parts.scheme != "rediss":
            raise ValueError("ssl_ca_certs goes with rediss:// (TLS) only")
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=port,
            db=int(path or 0),
            password=unquote(parts.password) if parts.password is not None else None,
            username=unquote(parts.username) if parts.username else None,
            tls=parts.scheme == "rediss",
            ca_file=ca_file,
        )

    def __str__(self) -> str:
        # Never the password: this goes to logs.
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"

    def endpoint(self, reactor: Any, timeout: float) -> IStreamClientEndpoint:
        endpoint: IStreamClientEndpoint = endpoints.HostnameEndpoint(
            reactor, self.host, self.port, timeout=timeout
        )
        if self.tls:
            from twisted.internet.ssl import Certificate, optionsForClientTLS

            trust = None
            if self.ca_file is not None:
                with open(self.ca_file, "rb") as f:
                    trust = Certificate.loadPEM(f.read())
            endpoint = endpoints.wrapClientTLS(
                optionsForClientTLS(self.host, trustRoot=trust), endpoint
            )
        return endpoint


class IRedisLink(Interface):
    """
    What the cluster needs of a Redis client: one connection, kept up, that
    runs commands and scripts with a bound on each call.  Replies are
    L{bytes} (nested lists for arrays, C{None} for nil), never decoded.
    """

    connected = Attribute("""Whether commands can be sent now.""")

    def start(on_connected: Callable[[], None], on_lost: Callable[[], None]) -> None:
        """
        Connect, and reconnect whenever the connection is lost; call
        C{on_connected()} each time it is ready, C{on_lost()} each time it
        is lost.
        """

    def stop() -> Deferred[None]:
        """
        Close the connection and stop reconnecting; a Deferred.
        """

    def execute(*args: Any, timeout: float | None = None) -> Deferred[Any]:
        """
        Run one command; a Deferred of its reply.  Fails with
        L{RedisUnavailable} at once when not connected, and after
        C{timeout} seconds (the link's own by default) without an answer,
        dropping the connection then, so that no later reply is taken for
        another command's.
        """

    def eval(script: bytes, keys: Sequence[Any], args: Sequence[Any]) -> Deferred[Any]:
        """
        Run a Lua script (EVALSHA, loading it when Redis does not know it),
        bounded like L{execute}.
        """


class _LinkFactory(Factory):
    """
    Builds txredisapi protocols for a L{RedisLink}.  The protocol calls
    back C{stopTrying}, C{connectionError} and reads C{isLazy} on its
    factory when authentication or SELECT fails.
    """

    isLazy = True

    def __init__(self, link: RedisLink):
        self.link = link

    def buildProtocol(self, addr: Any) -> Any:
        # txredisapi has no annotations (nor a py.typed marker): its
        # protocol and what it returns are Any here.
        import txredisapi  # type: ignore[import-untyped]

        url = self.link.url
        protocol = txredisapi.RedisProtocol(
            charset=None,  # payloads are bytes, never decoded
            replyTimeout=None,  # the link bounds every call itself
            password=url.password,
            dbid=url.db,
            convertNumbers=False,
            username=url.username,
        )
        protocol.factory = self
        lost = protocol.connectionLost

        def connection_lost(reason: Failure) -> None:
            try:
                lost(reason)
            finally:
                self.link._lost(protocol)

        protocol.connectionLost = connection_lost
        return protocol

    def stopTrying(self) -> None:
        # Authentication or SELECT failed: keep retrying with backoff (the
        # operator may fix Redis), loudly.
        pass

    def connectionError(self, why: str) -> None:
        log.error("{link}: {why}", link=self.link, why=why, esf_event="cluster_redis_error")


@implementer(IRedisLink)
class RedisLink:
    """
    One connection to Redis through txredisapi's protocol, kept up by
    Twisted's L{ClientService} (txredisapi's own pool would queue commands
    while disconnected; here a command fails at once instead).
    """

    def __init__(self, reactor: Any, url: RedisURL, *, timeout: float = 2.0, name: str = "redis"):
        self.reactor = reactor
        self.url = url
        self.timeout = timeout
        self.name = name
        self._protocol: Any = None
        self._service: ClientService | None = None
        self._on_connected: Callable[[], None] = lambda: None
        self._on_lost: Callable[[], None] = lambda: None

    def __repr__(self) -> str:
        return f"<RedisLink {self.name} {self.url}>"

    @property
    def connected(self) -> bool:
        return self._protocol is not None

    def start(self, on_connected: Callable[[], None], on_lost: Callable[[], None]) -> None:
        self._on_connected, self._on_lost = on_connected, on_lost
        self._service = ClientService(
            self.url.endpoint(self.reactor, self.timeout),
            _LinkFactory(self),
            retryPolicy=backoffPolicy(initialDelay=0.05, maxDelay=2.0),
            clock=self.reactor,
            prepareConnection=self._prepare,
        )
        self._service.startService()

    def stop(self) -> Deferred[None]:
        service, self._service = self._service, None
        self._on_connected = self._on_lost = lambda: None
        if service is None:
            return succeed(None)
        stopped: Deferred[None] = service.stopService()
        return stopped

    def _prepare(self, protocol: Any) -> Deferred[None]:
        # Ready once AUTH and SELECT are done; a connection that fails them
        # is closed by the protocol and counts as a failed attempt.
        ready: Deferred[None] = Deferred()

        def connected(p: Any) -> None:
            if not ready.called:
                self._protocol = p
                ready.callback(None)
                self._on_connected()

        def gone(_: Any) -> None:
            if not ready.called:
                ready.errback(RedisUnavailable(f"{self}: closed while connecting"))

        protocol.whenConnected().addCallback(connected)
        protocol.whenDisconnected().addCallback(gone)
        return ready

    def _lost(self, protocol: Any) -> None:
        if protocol is self._protocol:
            self._protocol = None
            self._on_lost()

    def execute(self, *args: Any, timeout: float | None = None) -> Deferred[Any]:
        protocol = self._protocol
        if protocol is None:
            return fail(RedisUnavailable(f"not connected to Redis at {self.url}"))
        try:
            d = protocol.execute_command(*args, apply_timeout=False)
        except Exception as e:
            return fail(RedisUnavailable(f"Redis at {self.url}: {e}"))
        return self._bounded(d, protocol, args[0], timeout)

    def eval(self, script: bytes, keys: Sequence[Any], args: Sequence[Any]) -> Deferred[Any]:
        protocol = self._protocol
        if protocol is None:
            return fail(RedisUnavailable(f"not connected to Redis at {self.url}"))
        try:
            d = protocol.eval(script, list(keys), list(args))
        except Exception as e:
            return fail(RedisUnavailable(f"Redis at {self.url}: {e}"))
        return self._bounded(d, protocol, "EVAL", None)

    def _bounded(
        self, d: Deferred[Any], protocol: Any, command: Any, timeout: float | None
    ) -> Deferred[Any]:
        import txredisapi

        timeout = self.timeout if timeout is None else timeout

        def timed_out(result: Any, seconds: float) -> Any:
            # The answer may still come: drop the connection so that it is
            # never taken for the answer to a later command.
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.abortConnection()
            raise RedisUnavailable(
                f"Redis at {self.url} did not answer {command!r} within {seconds:g} s"
            )

        def translate(failure: Failure) -> Failure:
            if failure.check(txredisapi.ConnectionError):
                return Failure(
                    RedisUnavailable(f"Redis at {self.url}: {failure.getErrorMessage()}")
                )
            return failure

        d.addErrback(translate)
        d.addTimeout(timeout, self.reactor, onTimeoutCancel=timed_out)
        return d
