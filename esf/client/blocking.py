"""
A blocking facade over L{esf.ClientEngine}, for code that runs no reactor:
scripts, GUIs, notebooks.

Every call is a plain function that returns the result or raises the error.
The Twisted reactor runs in a daemon thread, started once per process by
the first L{BlockingClient}; each call is carried over to it with
L{blockingCallFromThread}, so a L{BlockingClient} may be used from several
threads at once.  Event callbacks and the handler run in the reactor
thread: keep them short, and never call a L{BlockingClient} method from
them (that would wait for the thread that is waiting).

    from esf.client.blocking import BlockingClient

    client = BlockingClient("127.0.0.1", 4530, "alice", "secret")
    client.logon()
    print(client.get_all_online_users())
    print(client.query("_0", 4, b"echo me"))
    client.logoff()
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any, Callable, ParamSpec, TypeVar, cast, overload

from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import blockingCallFromThread

from esf.interfaces import ICustomizeHandler
from esf.wire._frames import ClientType, WireConfig

from ._calls import MAX_ONLINE_USERS
from ._engine import ClientEngine, LogonResponse

__all__ = ["BlockingClient", "call_in_reactor", "reactor_thread"]

_P = ParamSpec("_P")
_R = TypeVar("_R")

_lock = threading.Lock()
_thread: threading.Thread | None = None


def reactor_thread() -> threading.Thread | None:
    """
    The thread the facade runs the reactor in (started on demand), or
    C{None} when the reactor was already running elsewhere.
    """
    _ensure_reactor()
    return _thread


def _ensure_reactor() -> Any:
    global _thread  # noqa: PLW0603 -- the one reactor thread of the process
    from twisted.internet import reactor

    with _lock:
        if _thread is None and not reactor.running:
            _thread = threading.Thread(
                target=reactor.run,
                kwargs={"installSignalHandlers": False},
                name="esf-reactor",
                daemon=True,
            )
            _thread.start()
    return reactor


@overload
def call_in_reactor(f: Callable[_P, Deferred[_R]], *args: _P.args, **kwargs: _P.kwargs) -> _R: ...


@overload
def call_in_reactor(f: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> _R: ...


def call_in_reactor(f: Callable[_P, Any], *args: _P.args, **kwargs: _P.kwargs) -> Any:
    """
    Run C{f(*args, **kwargs)} in the reactor thread and wait for its result
    (a Deferred's result, if it returns one); raise what it raised.

    @raise RuntimeError: called from the reactor thread itself, where it
        would wait forever.
    """
    reactor = _ensure_reactor()
    if threading.current_thread() is _thread or _in_reactor_thread(reactor):
        raise RuntimeError(
            "a blocking call from the reactor thread would never return; "
            "use esf.ClientEngine there"
        )
    return blockingCallFromThread(reactor, f, *args, **kwargs)


def _in_reactor_thread(reactor: Any) -> bool:
    from twisted.python import threadable

    return bool(reactor.running and threadable.isInIOThread())


class BlockingClient:
    """
    One logged-on session, as plain functions.

    The methods are those of L{esf.ClientEngine}, with the same arguments:
    each waits for its answer and returns it, or raises
    L{esf.LogonFailed}, L{esf.RequestError}, L{esf.NotConnected} or a
    connection error.  Reconnecting and logging on again are automatic, as
    with the engine.

    @ivar engine: the L{esf.ClientEngine}; touch it only in the reactor
        thread (see L{call_in_reactor}).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 4530,
        user_id: str = "",
        password: str = "",
        client_type: int = ClientType.OTHERS,
        system_token: str = "",
        handler: ICustomizeHandler | None = None,
        timeout: float = 30.0,
        *,
        wire: WireConfig | None = None,
        retry_policy: Callable[[int], float] | None = None,
    ):
        self.host = host
        self.port = port
        self.timeout = timeout
        reactor = _ensure_reactor()

        def make() -> ClientEngine:
            endpoint = endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)
            return ClientEngine(
                endpoint,
                user_id,
                password,
                client_type,
                system_token=system_token,
                handler=handler,
                clock=reactor,
                wire=wire,
                request_timeout=timeout,
                retry_policy=retry_policy,
            )

        self.engine: ClientEngine = call_in_reactor(make)

    def __repr__(self) -> str:
        return f"<BlockingClient {self.engine.user_id} {self.host}:{self.port}>"

    # -- state -----------------------------------------------------------------

    @property
    def user_id(self) -> str:
        return self.engine.user_id

    @property
    def logged_on(self) -> bool:
        """
        Whether a session is logged on now.
        """
        return self.engine.logged_on

    @property
    def logon_response(self) -> LogonResponse | None:
        return self.engine.logon_response

    @property
    def channel_is_busy(self) -> bool:
        return self.engine.channel_is_busy

    def wait_for_drain(self, *, timeout: float | None = None) -> None:
        """
        Wait until the channel is not busy; raise L{esf.RequestError}
        (C{TIMEOUT}) if it is still busy after C{timeout} seconds (by
        default this client's C{timeout}), L{esf.NotConnected} if the
        connection is lost first.
        """
        call_in_reactor(self.engine.wait_for_drain, timeout=timeout)

    # -- events ------------------------------------------------------------------

    def subscribe(self, event: str, callback: Callable[..., object]) -> Callable[[], None]:
        """
        Call C{callback} (in the reactor thread) whenever C{event} fires;
        C{event} is the name of one of the engine's events, e.g.
        C{"being_pushed_out"} or C{"relogon_completed"}.

        @return: a function that unsubscribes (callable from any thread).
        """
        target: Any = getattr(self.engine, event, None)
        if not hasattr(target, "subscribe"):
            raise ValueError(f"{event!r} is not an event of the client engine")
        call_in_reactor(target.subscribe, callback)

        def unsubscribe() -> None:
            from twisted.internet import reactor

            cast(IReactorFromThreads, reactor).callFromThread(target.unsubscribe, callback)

        return unsubscribe

    # -- life --------------------------------------------------------------------

    def logon(self) -> LogonResponse:
        """
        Connect and log on; return the L{esf.LogonResponse}.
        """
        return call_in_reactor(self.engine.logon)

    def logoff(self) -> None:
        """
        Leave; no reconnecting afterwards.
        """
        call_in_reactor(self.engine.logoff)

    def close(self) -> None:
        """
        Close the connection without a Logoff; no reconnecting afterwards.
        """
        call_in_reactor(self.engine.close)

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- framework calls -------------------------------------------------------------

    def ping(self, *, timeout: float | None = None) -> float:
        return call_in_reactor(self.engine.ping, timeout=timeout)

    def ping_by_server(self, user_id: str, *, timeout: float | None = None) -> float:
        return call_in_reactor(self.engine.ping_by_server, user_id, timeout=timeout)

    def get_my_ipe(self) -> str:
        return call_in_reactor(self.engine.get_my_ipe)

    def get_all_online_users(self, *, limit: int = MAX_ONLINE_USERS) -> list[str]:
        return call_in_reactor(self.engine.get_all_online_users, limit=limit)

    def is_user_online(self, user_id: str) -> bool:
        return call_in_reactor(self.engine.is_user_online, user_id)

    def query_onlines(self, user_ids: Iterable[str]) -> dict[str, bool]:
        return call_in_reactor(self.engine.query_onlines, list(user_ids))

    def get_my_devices(self) -> list[ClientType | int]:
        return call_in_reactor(self.engine.get_my_devices)

    def kick_out(self, user_id: str, reason: str = "") -> None:
        call_in_reactor(self.engine.kick_out, user_id, reason)

    # -- application messages ------------------------------------------------------------

    def send(
        self,
        user_id: str,
        information_type: int,
        payload: bytes = b"",
        client_type: int | None = None,
    ) -> None:
        call_in_reactor(self.engine.send, user_id, information_type, payload, client_type)

    def query(
        self,
        user_id: str,
        information_type: int,
        payload: bytes = b"",
        *,
        client_type: int | None = None,
        timeout: float | None = None,
    ) -> bytes:
        return call_in_reactor(
            self.engine.query,
            user_id,
            information_type,
            payload,
            client_type=client_type,
            timeout=timeout,
        )

    def send_certainly(
        self,
        user_id: str,
        information_type: int,
        payload: bytes = b"",
        *,
        client_type: int | None = None,
        timeout: float | None = None,
    ) -> str | None:
        """
        Send a message the receiver acknowledges: C{None} once its handler
        has run, L{esf.STORED} once a server with an offline store has kept
        it for a receiver who is offline.
        """
        return call_in_reactor(
            self.engine.send_certainly,
            user_id,
            information_type,
            payload,
            client_type=client_type,
            timeout=timeout,
        )

    def send_blob(
        self,
        user_id: str,
        information_type: int,
        payload: bytes,
        fragment_size: int | None = None,
        *,
        timeout: float | None = None,
    ) -> str | None:
        """
        Send a payload of any size: C{None} once the receiver has it whole,
        L{esf.STORED} once the server has kept it for a receiver who is
        offline.
        """
        return call_in_reactor(
            self.engine.send_blob,
            user_id,
            information_type,
            payload,
            fragment_size,
            timeout=timeout,
        )

    def broadcast(
        self,
        group_id: str,
        information_type: int,
        payload: bytes = b"",
        *,
        timeout: float | None = None,
    ) -> None:
        call_in_reactor(
            self.engine.broadcast, group_id, information_type, payload, timeout=timeout
        )
