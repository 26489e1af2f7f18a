"""
The cluster's link to Redis: where Redis is (L{RedisURL}), what the cluster
needs of a client (L{IRedisLink}), one connection kept up by Twisted's
L{ClientService} with every call bounded (L{RedisLink}), and the Lua
scripts, kept as files under C{esf/cluster/lua/} (L{script}).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from importlib import resources
from typing import Any, Callable
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

import attrs
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import endpoints
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.tcp import Client as TCPClient
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from esf.server._policy import PresenceUnavailable
from esf.server._protocol import send_now

from ._sentinel import SentinelEndpoint, ready

__all__ = ["IRedisLink", "NotSent", "RedisLink", "RedisURL", "RedisUnavailable", "script"]

log = Logger(namespace="esf.cluster")


def script(name: str) -> bytes:
    """
    The Lua script C{esf/cluster/lua/NAME.lua}, as Redis runs it: its
    comment lines left empty, which would otherwise go to Redis with every
    EVAL (the inbox's deletion goes as one with every read) and be parsed
    there.  (Emptied, not removed: Redis's errors name the file's lines.)
    """
    text = resources.files(__package__).joinpath("lua", f"{name}.lua").read_bytes()
    return b"\n".join(
        b"" if line.lstrip().startswith(b"--") else line for line in text.splitlines()
    )


class RedisUnavailable(PresenceUnavailable):
    """
    Redis cannot be reached now: not connected, or it did not answer in
    time.
    """


class NotSent(RedisUnavailable):
    """
    A command was not sent at all (no connection): unlike one that got no
    answer, it surely never runs.
    """


#: The Sentinel's port when a URL gives none.
SENTINEL_PORT = 26379


@attrs.frozen
class RedisURL:
    """
    Where Redis is: C{redis://[[user]:password@]host[:port][/db]}, or
    C{rediss://...} for TLS, where C{?ssl_ca_certs=PATH} names the PEM file
    of the authorities that Redis's certificate is checked against (the
    system's by default).

    Or, through Sentinel:
    C{redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]}:
    the Sentinels' addresses (port 26379 by default), asked in turn for the
    master of C{service} before every connection (L{SentinelEndpoint}); the
    user and password are the master's, as in C{redis://}, and
    C{?sentinel_password=...} (with C{&sentinel_username=...}) the
    Sentinels' own, when they require one.

    @ivar sentinels: the Sentinels' addresses; empty without Sentinel.
    @ivar service: the name the Sentinels know the master by; C{None}
        without Sentinel.
    """

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    password: str | None = attrs.field(default=None, repr=False)
    username: str | None = None
    tls: bool = False
    ca_file: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = attrs.field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> RedisURL:
        """
        @raise ValueError: C{url} is not a Redis URL (the message never
            holds a password).
        """
        parts = urlsplit(url)
        if parts.scheme == "redis+sentinel":
            return cls._parse_sentinel(parts)
        if parts.scheme == "rediss+sentinel":
            raise ValueError(
                "TLS with Sentinel (rediss+sentinel://) is not supported: "
                "use redis+sentinel:// on a private network"
            )
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(
                "a Redis URL starts with redis://, rediss:// or redis+sentinel://, "
                f"not {parts.scheme + '://' if parts.scheme else repr(url)}"
            )
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError(f"bad port in {parts.netloc.rpartition('@')[2]!r}") from None
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"the database must be a number, not {path!r}")
        query = _query(parts.query, {"ssl_ca_certs"})
        ca_file = query.get("ssl_ca_certs")
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

    @classmethod
    def _parse_sentinel(cls, parts: SplitResult) -> RedisURL:
        # urlsplit's hostname and port see one host only: the list of
        # Sentinels is split here, each address parsed by urlsplit.
        userinfo, _, hosts = parts.netloc.rpartition("@")
        username, colon, password = userinfo.partition(":")
        sentinels = []
        for address in hosts.split(","):
            one = urlsplit(f"//{address}")
            try:
                port = one.port or SENTINEL_PORT
            except ValueError:
                raise ValueError(f"bad port in the Sentinel address {address!r}") from None
            if not one.hostname or one.username is not None or one.path:
                raise ValueError(f"bad Sentinel address {address!r}: HOST[:PORT]")
            sentinels.append((one.hostname, port))
        path = parts.path.split("/")[1:]
        if not path or not path[0] or len(path) > 2:
            raise ValueError(
                "a Sentinel URL names the service: "
                "redis+sentinel://HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB]"
            )
        service = unquote(path[0])
        if not service.isprintable() or " " in service:
            raise ValueError(f"bad service name {service!r}")
        db = path[1] if len(path) == 2 else ""
        if db and not db.isdigit():
            raise ValueError(f"the database must be a number, not {db!r}")
        query = _query(parts.query, {"sentinel_username", "sentinel_password"})
        return cls(
            host=sentinels[0][0],
            port=sentinels[0][1],
            db=int(db or 0),
            password=unquote(password) if colon else None,
            username=unquote(username) if username else None,
            sentinels=tuple(sentinels),
            service=service,
            sentinel_username=query.get("sentinel_username"),
            sentinel_password=query.get("sentinel_password"),
        )

    def __str__(self) -> str:
        # Never the password: this goes to logs.
        if self.service is not None:
            hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
            return f"redis+sentinel://{hosts}/{self.service}/{self.db}"
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"

    def endpoint(self, reactor: Any, timeout: float) -> IStreamClientEndpoint:
        """
        Where to connect: Redis, or (with Sentinel) the master the
        Sentinels name at each connection; C{timeout} bounds each
        connection attempt and each question to a Sentinel.
        """
        if self.service is not None:
            return SentinelEndpoint(
                reactor,
                self.sentinels,
                self.service,
                timeout=timeout,
                username=self.sentinel_username,
                password=self.sentinel_password,
            )
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


def _query(query: str, known: set[str]) -> dict[str, str]:
    """
    A URL's parameters (the last of each); only C{known} ones.
    """
    values = parse_qs(query, keep_blank_values=True)
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown parameters in a Redis URL: {', '.join(sorted(unknown))}")
    return {name: given[-1] for name, given in values.items()}


class IRedisLink(Interface):
    """
    What the cluster needs of a Redis client: one connection, kept up, that
    runs commands and scripts with a bound on each call.  Replies are
    L{bytes} (nested lists for arrays, C{None} for nil), never decoded.
    """

    connected = Attribute("""Whether commands can be sent now.""")

    server = Attribute(
        """
        Which Redis server the link reached last (its C{run_id}, which a
        restart changes; its address where C{INFO} is refused), or C{None}
        before it connected: another one than before means a failover or
        a restart, which may have lost data.
        """
    )

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

    def drop() -> None:
        """
        Drop the connection now; it is made again as after any loss (with
        Sentinel, to the master the Sentinels name then).
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

    def eval_unanswered(script: bytes, keys: Sequence[Any], args: Sequence[Any]) -> None:
        """
        Send a Lua script whose reply nobody waits for, in order with the
        calls before and after it: for a script whose outcome the caller
        needs not know (a later one makes good a failed one).  Redis skips
        its reply (C{CLIENT REPLY SKIP}), which saves the node a reply to
        read, where the connection's user may ask for that.  Raises
        L{NotSent} when not connected.
        """


#: The error replies of a server that is no longer the master: a link
#: through Sentinel drops its connection on them (L{RedisLink}).
_NOT_MASTER = ("READONLY", "UNBLOCKED", "MASTERDOWN")


def _peer(protocol: Any) -> str:
    peer = protocol.transport.getPeer()
    return f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"


def encode_command(*args: Any, **ignored: Any) -> bytes:
    """
    One command in Redis's protocol (RESP): an array of bulk strings.

    Written here because txredisapi's own (C{_build_command}) encodes each
    argument, and its length, through a chain of C{isinstance} tests and
    several writes: a fifth of a node's CPU for a cross-node request, whose
    every hop takes several commands of a dozen or more arguments.  It
    takes the same arguments: bytes, text (UTF-8), numbers.
    """
    parts = [b"*%d\r\n" % len(args)]
    append = parts.append
    for arg in args:
        if type(arg) is bytes:
            value = arg
        elif type(arg) is int:
            value = b"%d" % arg
        elif isinstance(arg, str):
            value = arg.encode()
        elif isinstance(arg, float):
            value = format(arg, "f").encode()
        elif isinstance(arg, (bytes, bytearray, memoryview)):
            value = bytes(arg)
        else:
            value = str(arg).encode()
        append(b"$%d\r\n%s\r\n" % (len(value), value))
    return b"".join(parts)


#: Redis skips the reply of the command after this one.
_SKIP_REPLY = encode_command("CLIENT", "REPLY", "SKIP")


def _as_parsed(data: Any) -> Any:
    """
    A reply as Redis's protocol parser gave it (L{_LinkFactory}).
    """
    return data


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
        # Its parser goes on after a bulk string on the global reactor's
        # callLater otherwise: the link's reactor instead.
        protocol.callLater = self.link.reactor.callLater
        lost = protocol.connectionLost

        def connection_lost(reason: Failure) -> None:
            try:
                lost(reason)
            finally:
                self.link._lost(protocol)

        protocol.connectionLost = connection_lost
        made = protocol.connectionMade

        def connection_made() -> Any:
            _writes_at_once(protocol.transport)
            return made()

        protocol.connectionMade = connection_made
        # When the connection last received anything: a call past its bound
        # while answers still come is not timed out yet (L{RedisLink._bounded}).
        clock = self.link.reactor
        received = protocol.dataReceived
        protocol.esf_received_at = 0.0

        def data_received(data: bytes, *more: Any) -> None:
            protocol.esf_received_at = clock.seconds()
            received(data, *more)

        protocol.dataReceived = data_received
        protocol._build_command = encode_command
        # Its replies as the parser gives them: with no charset and no
        # number conversion, txredisapi's tryConvertData only copies every
        # list of a reply, element by element, in Python (a node mirroring
        # the presence stream spent a third of its time per entry there).
        protocol.tryConvertData = _as_parsed
        return protocol

    def stopTrying(self) -> None:
        # Authentication or SELECT failed: keep retrying with backoff (the
        # operator may fix Redis), loudly.
        pass

    def connectionError(self, why: str) -> None:
        log.error("{link}: {why}", link=self.link, why=why, esf_event="cluster_redis_error")


def _writes_at_once(transport: Any) -> None:
    """
    Have C{transport}, Twisted's TCP transport or its TLS transport over
    TCP, send each command at once, with Nagle's algorithm off, rather
    than at the reactor's next look at the socket, when it holds nothing
    ahead of it (L{send_now}).

    Then a command goes out before whatever the rest of the turn writes to
    clients, which goes out at the next turn (the write-behind): the
    deletion of the inbox entries a read delivered, sent with the next
    read, is on its way to Redis before the devices have the entries, so
    that a node killed as they arrive does not leave them in its inbox
    for the janitor to keep again.
    """
    # (A TLS transport exists only once Twisted's TLS module is loaded,
    # which needs pyOpenSSL: looked up, not imported.)
    tls_class: Any = getattr(
        sys.modules.get("twisted.protocols.tls"), "TLSMemoryBIOProtocol", None
    )
    tls = None
    if tls_class is not None and isinstance(transport, tls_class):
        tls, transport = transport, transport.transport
    if not isinstance(transport, TCPClient):
        return
    try:
        # (Else a small command sent right after another waits for the
        # first one's acknowledgement, which Redis may delay.)
        transport.setTcpNoDelay(True)
    except OSError:
        return
    buffered: Callable[[bytes], None] = transport.write
    socket = transport.socket

    def write(data: bytes) -> None:
        rest = send_now(transport, socket, data)
        if rest:
            buffered(rest)

    transport.write = write  # type: ignore[method-assign]
    if tls is not None:
        # Twisted's TLS transport gathers small writes until the reactor's
        # next turn (BufferingTLSTransport, which installs its gathering
        # write on the instance as this does).  Its unbuffered write instead:
        # each command is encrypted and handed to the TCP transport as it
        # is made (what is written before the handshake ends is kept until
        # it has, as always).
        tls.write = functools.partial(tls_class.write, tls)


@implementer(IRedisLink)
class RedisLink:
    """
    One connection to Redis through txredisapi's protocol, kept up by
    Twisted's L{ClientService} (txredisapi's own pool would queue commands
    while disconnected; here a command fails at once instead).

    With Sentinel each connection goes to the master the Sentinels name
    then, and is used only once C{ROLE} says it is the master; an answer
    that says the server is no longer the master (C{READONLY}: it was
    demoted; C{UNBLOCKED}: a blocking read ended by that; C{MASTERDOWN})
    drops the connection, like a lost one, so that the link follows a
    failover.
    """

    def __init__(
        self,
        reactor: Any,
        url: RedisURL,
        *,
        timeout: float = 2.0,
        name: str = "redis",
        endpoint: IStreamClientEndpoint | None = None,
    ):
        self.reactor = reactor
        self.url = url
        #: Where to connect (the URL's endpoint, made at start, by default).
        self.endpoint = endpoint
        self.timeout = timeout
        self.name = name
        self._protocol: Any = None
        self.server: str | None = None
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
        if self.endpoint is None:
            self.endpoint = self.url.endpoint(self.reactor, self.timeout)
        self._service = ClientService(
            self.endpoint,
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

    def drop(self) -> None:
        transport = getattr(self._protocol, "transport", None)
        if transport is not None:
            transport.abortConnection()

    def _prepare(self, protocol: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(self._ready(protocol))

    async def _ready(self, proxy: Any) -> None:
        """
        Ready once AUTH and SELECT are done (a connection that fails them is
        closed by the protocol), and, with Sentinel, C{ROLE} says master;
        this learns which server it is.  A connection that fails any of it
        is closed and counts as a failed attempt.
        """
        protocol = await ready(proxy, lambda: RedisUnavailable(f"{self}: closed while connecting"))
        try:
            if self.url.service is not None:
                role = await self._call(protocol, "ROLE")
                if not role or role[0] != b"master":
                    # A Sentinel named a server that is not the master (its
                    # view lags a failover): an error, retried with backoff.
                    raise ValueError(
                        f"{_peer(protocol)}, which a Sentinel named, is not the master of "
                        f"{self.url.service!r} (ROLE: {role[0] if role else None!r})"
                    )
            self.server = await self._identify(protocol)
            protocol.esf_skips_replies = await self._skips_replies(protocol)
        except BaseException as e:
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.abortConnection()
            if not isinstance(e, (RedisUnavailable, CancelledError)):
                log.error("{link}: {error}", link=self, error=e, esf_event="cluster_redis_error")
            raise
        self._protocol = protocol
        self._on_connected()

    async def _skips_replies(self, protocol: Any) -> bool:
        """
        Whether this connection's user may have Redis skip replies (C{CLIENT
        REPLY}, one command for Redis's ACLs whatever its argument): asked
        with C{ON}, which answers, never with C{SKIP}, whose refusal would
        be a reply that nobody waits for.
        """
        import txredisapi

        try:
            await self._call(protocol, "CLIENT", "REPLY", "ON")
        except txredisapi.ResponseError:
            return False
        return True

    async def _identify(self, protocol: Any) -> str:
        """
        The server's C{run_id}; where C{INFO} is refused, its address: with
        Sentinel the master's (which a failover changes), without it the
        URL's (the two links' peers could differ, a name having several
        addresses).
        """
        import txredisapi

        try:
            info = await self._call(protocol, "INFO", "server")
        except txredisapi.ResponseError:
            info = b""
        for line in bytes(info).splitlines():
            if line.startswith(b"run_id:"):
                return line[7:].decode("ascii", "replace").strip()
        if self.url.service is not None:
            return _peer(protocol)
        return f"{self.url.host}:{self.url.port}"

    def _call(self, protocol: Any, *args: Any) -> Deferred[Any]:
        try:
            d = protocol.execute_command(*args, apply_timeout=False)
        except Exception as e:
            return fail(NotSent(f"Redis at {self.url}: {e}"))
        return self._bounded(d, protocol, args[0], None)

    def _lost(self, protocol: Any) -> None:
        if protocol is self._protocol:
            self._protocol = None
            self._on_lost()

    def execute(self, *args: Any, timeout: float | None = None) -> Deferred[Any]:
        protocol = self._protocol
        if protocol is None:
            return fail(NotSent(f"not connected to Redis at {self.url}"))
        try:
            d = protocol.execute_command(*args, apply_timeout=False)
        except Exception as e:
            return fail(NotSent(f"Redis at {self.url}: {e}"))
        return self._bounded(d, protocol, args[0], timeout)

    def eval(self, script: bytes, keys: Sequence[Any], args: Sequence[Any]) -> Deferred[Any]:
        protocol = self._protocol
        if protocol is None:
            return fail(NotSent(f"not connected to Redis at {self.url}"))
        try:
            d = protocol.eval(script, list(keys), list(args))
        except Exception as e:
            return fail(NotSent(f"Redis at {self.url}: {e}"))
        return self._bounded(d, protocol, "EVAL", None)

    def eval_unanswered(self, script: bytes, keys: Sequence[Any], args: Sequence[Any]) -> None:
        protocol = self._protocol
        transport = getattr(protocol, "transport", None)
        if transport is None:
            raise NotSent(f"not connected to Redis at {self.url}")
        if not protocol.esf_skips_replies:
            # Its user may not (an ACL): answered, and the answer let go.
            self.eval(script, keys, args).addErrback(lambda _: None)
            return
        # Written past txredisapi's protocol, which waits for a reply to
        # every command it sends: this one has none to wait for.  EVAL, not
        # EVALSHA: a script Redis does not know (after a restart or a
        # failover) would fail unseen.
        transport.write(_SKIP_REPLY + encode_command("EVAL", script, len(keys), *keys, *args))

    def _bounded(
        self, d: Deferred[Any], protocol: Any, command: Any, timeout: float | None
    ) -> Deferred[Any]:
        import txredisapi

        timeout = self.timeout if timeout is None else timeout
        reactor = self.reactor
        sent_at = reactor.seconds()
        timer: list[Any] = []
        expired: list[bool] = []

        def arm() -> None:
            # The bound runs from the end of the reactor turn that made the
            # call, when the command is written: a turn that took longer
            # than the bound (ending 10,000 sessions at shutdown, each
            # releasing its device) must not fail the calls it made before
            # they were sent.
            nonlocal sent_at
            sent_at = reactor.seconds()
            timer[0] = reactor.callLater(timeout, expire)

        def expire() -> None:
            # Judged after the reactor's next look at the connection: one
            # that was too busy to run on time (the node overloaded) may
            # not have read an answer that came in time.
            timer[0] = reactor.callLater(0, judge)

        def judge() -> None:
            now = reactor.seconds()
            last = getattr(protocol, "esf_received_at", 0.0)
            if last > sent_at and now - last < timeout / 4 and now < sent_at + 2 * timeout:
                # Redis still answers, in order: this call's answer is
                # behind others the node has not read yet.  Up to twice
                # the bound.
                timer[0] = reactor.callLater(timeout / 4, expire)
                return
            expired.append(True)
            # The answer may still come: drop the connection so that it is
            # never taken for the answer to a later command.
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.abortConnection()
            d.cancel()

        def timed_out(failure: Failure) -> Failure:
            if expired and failure.check(CancelledError):
                return Failure(
                    RedisUnavailable(
                        f"Redis at {self.url} did not answer {command!r} within "
                        f"{reactor.seconds() - sent_at:.3g} s"
                    )
                )
            return failure

        def done(result: Any) -> Any:
            if timer and timer[0].active():
                timer[0].cancel()
            return result

        def translate(failure: Failure) -> Failure:
            if failure.check(txredisapi.ConnectionError):
                return Failure(
                    RedisUnavailable(f"Redis at {self.url}: {failure.getErrorMessage()}")
                )
            if (
                self.url.service is not None
                and failure.check(txredisapi.ResponseError)
                and str(failure.value).startswith(_NOT_MASTER)
            ):
                # Not (or no longer) the master: drop the connection, which
                # is made again to the master the Sentinels name.  (Without
                # Sentinel it would be made again to the same server.)
                transport = getattr(protocol, "transport", None)
                if transport is not None:
                    transport.abortConnection()
                return Failure(
                    RedisUnavailable(f"Redis at {self.url}: {failure.getErrorMessage()}")
                )
            return failure

        d.addErrback(translate)
        d.addErrback(timed_out)
        d.addBoth(done)
        timer.append(reactor.callLater(0, arm))
        return d
