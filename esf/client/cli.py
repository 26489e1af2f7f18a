"""
C{esf-client}: try an esf server by hand.

    esf-client [--host H] [--port P] --user U --password PW [--device N] COMMAND

Commands: C{ping [USER]}, C{online}, C{send USER TEXT [--type N]},
C{query USER TEXT [--type N]}, C{kick USER [--reason R]},
C{listen [--count N] [--seconds S]} and C{shell}.  Run C{esf-client --help}
or C{esf-client COMMAND --help} for the details.

Errors print one line on standard error and exit with status 1 (2 for a
command line that does not parse).
"""

from __future__ import annotations

import argparse
import random
import shlex
import sys
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Callable, NoReturn, cast

from twisted.application.internet import backoffPolicy
from twisted.internet import endpoints, error, task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from esf.interfaces import ICustomizeHandler
from esf.wire._frames import SERVER_ID, ClientType, LogonResult, WireConfig
from esf.wire._messages import RequestError

from ._calls import STORED
from ._engine import ClientEngine, LogonFailed, NotConnected

if TYPE_CHECKING:
    from ._state import LogonResponse

__all__ = ["main", "build_parser"]

PROG = "esf-client"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4530


class CommandFailed(Exception):
    """
    A command failed; the message is the one line to print.
    """


# -- the command line -------------------------------------------------------------


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if number < low or (high is not None and number > high):
            span = f"{low}..{high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{number} is not in {span}")
        return number

    return parse


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return number


_INFO_TYPE = _int_in(-(2**31), 2**31 - 1)


def _add_commands(
    subparsers: argparse._SubParsersAction[Any],
    interactive: bool,
    parents: tuple[argparse.ArgumentParser, ...] = (),
) -> None:
    def add_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = subparsers.add_parser(
            name, parents=list(parents), **kwargs
        )
        return parser

    p = add_parser("ping", help="round-trip time to the server, or to USER's client")
    p.add_argument("target", nargs="?", metavar="USER", help="a user to ping through the server")

    add_parser("online", help="list the users online")

    p = add_parser(
        "send",
        help=(
            "send TEXT to USER (or _0, the server); waits for the receiver's Ack, or the "
            "server's when it stores the message for a USER who is offline"
        ),
    )
    p.add_argument("target", metavar="USER")
    p.add_argument("text")
    p.add_argument("--type", type=_INFO_TYPE, default=0, help="information type [0]")
    p.add_argument("--no-ack", action="store_true", help="one-way Send: do not wait for an Ack")

    p = add_parser("query", help="ask USER (or _0, the server) and print the answer")
    p.add_argument("target", metavar="USER")
    p.add_argument("text")
    p.add_argument("--type", type=_INFO_TYPE, default=0, help="information type [0]")

    p = add_parser("kick", help="ask the server to kick USER out")
    p.add_argument("target", metavar="USER")
    p.add_argument("--reason", default="", help="the reason USER is shown")

    p = add_parser("broadcast", help="broadcast TEXT to a group (or *, everyone)")
    p.add_argument("group")
    p.add_argument("text")
    p.add_argument("--type", type=_INFO_TYPE, default=0, help="information type [0]")

    if not interactive:
        p = add_parser(
            "listen",
            help="print incoming messages, one line each: SENDER TYPE TEXT",
            description="Print one line per incoming message (SENDER TYPE TEXT); "
            "queries are answered with their own payload. Keeps listening "
            "across server restarts.",
        )
        p.add_argument("--count", type=_int_in(1), help="stop after N messages")
        p.add_argument("--seconds", type=_positive_float, help="stop after S seconds")

        add_parser("shell", help="an interactive session: commands from standard input")


def _connection_options(parser: argparse.ArgumentParser, after_command: bool) -> None:
    """
    Add the options that say where and who to log on as to C{parser}.  They
    may stand before the command or after it (C{esf-client ping --user
    alice ...}): the command's own parser takes them too (C{after_command}),
    with no defaults of its own, so that it never undoes one given before.
    """

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if after_command else value

    parser.add_argument(
        "--host", default=default(DEFAULT_HOST), help=f"server host [{DEFAULT_HOST}]"
    )
    parser.add_argument(
        "--port",
        type=_int_in(1, 65535),
        default=default(DEFAULT_PORT),
        help=f"server port [{DEFAULT_PORT}]",
    )
    # Required, but checked after parsing: argparse would ask the command's
    # parser for them again when they were given before the command.
    parser.add_argument("--user", default=default(None), help="user ID to log on as (required)")
    parser.add_argument("--password", default=default(None), help="password (required)")
    parser.add_argument(
        "--device",
        type=_int_in(0, 255),
        default=default(int(ClientType.OTHERS)),
        help="client type (device kind) [8, Others]",
    )
    parser.add_argument(
        "--system-token", default=default(""), help="system token the server expects"
    )
    parser.add_argument(
        "--max-userid-length",
        type=_int_in(1, 255),
        default=default(11),
        help="the server's maximum UserID length [11]",
    )
    parser.add_argument(
        "--max-message-size",
        type=_int_in(64, 0x7FFFFFFF),
        default=default(1024 * 1024),
        help="largest frame accepted, in bytes [1048576]",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=default(30.0),
        help="seconds to wait for a connection or an answer [30]",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default(False),
        help="log the client's events to standard error",
    )


class _Parser(argparse.ArgumentParser):
    """
    C{esf-client}'s parser: C{--user} and C{--password} are required
    wherever they stand.
    """

    def parse_args(self, *args: Any, **kwargs: Any) -> Any:
        parsed = super().parse_args(*args, **kwargs)
        missing = [f"--{name}" for name in ("user", "password") if getattr(parsed, name) is None]
        if missing:
            self.error(f"the following arguments are required: {', '.join(missing)}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    """
    The parser of C{esf-client}'s command line.
    """
    parser = _Parser(
        prog=PROG,
        description="Log on to an esf server and run one command.",
    )
    _connection_options(parser, after_command=False)
    after = argparse.ArgumentParser(add_help=False)
    _connection_options(after, after_command=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_commands(subparsers, interactive=False, parents=(after,))
    return parser


class _ShellArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CommandFailed(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            raise CommandFailed(message.strip())
        raise CommandFailed("")


def _shell_parser() -> argparse.ArgumentParser:
    parser = _ShellArgumentParser(prog="", add_help=False)
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_ShellArgumentParser
    )
    _add_commands(subparsers, interactive=True)
    return parser


SHELL_HELP = """\
commands:
  ping [USER]                       round-trip time to the server or to USER
  online                            the users online
  send USER TEXT [--type N] [--no-ack]
  query USER TEXT [--type N]        print USER's answer (_0: the server)
  kick USER [--reason R]
  broadcast GROUP TEXT [--type N]
  help                              this text
  quit                              log off and leave (or end of input)
incoming messages print as: SENDER TYPE TEXT"""


# -- running -----------------------------------------------------------------------


def _text(payload: bytes) -> str:
    return bytes(payload).decode("utf-8", errors="replace")


@implementer(ICustomizeHandler)
class _Printer:
    """
    The client-side handler of C{listen} and C{shell}: one line per
    incoming message; a query is answered with its own payload.
    """

    def __init__(self, show: Callable[[str], None]):
        self.show = show

    def handle_information(
        self, user_id: str, client_type: int, information_type: int, payload: bytes
    ) -> None:
        self.show(f"{user_id} {information_type} {_text(payload)}")

    def handle_query(
        self, user_id: str, client_type: int, information_type: int, payload: bytes
    ) -> bytes:
        self.show(f"{user_id} {information_type} {_text(payload)}")
        return payload


def _stdout(line: str) -> None:
    print(line, flush=True)


def _stderr(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


def describe(
    failure_or_exception: BaseException | Failure, args: argparse.Namespace | None = None
) -> str:
    """
    One line saying what went wrong.
    """
    e = getattr(failure_or_exception, "value", failure_or_exception)
    where = f"{args.host}:{args.port}" if args is not None else "the server"
    if isinstance(e, CommandFailed):
        return str(e)
    if isinstance(e, LogonFailed):
        return f"logon refused: {e}"
    if isinstance(e, RequestError):
        return f"request failed: {e}"
    if isinstance(e, NotConnected):
        return f"not connected: {e}"
    if isinstance(e, error.ConnectionRefusedError):
        return f"cannot connect to {where}: connection refused"
    if isinstance(e, (error.TimeoutError, error.ConnectingCancelledError)):
        return f"cannot connect to {where}: timed out"
    if isinstance(e, error.DNSLookupError):
        return f"cannot connect to {where}: host not found"
    if isinstance(e, error.ConnectError):
        return f"cannot connect to {where}: {e}".rstrip(". ")
    if isinstance(e, error.ConnectionLost):
        return "the connection to the server was lost"
    return f"{type(e).__name__}: {e}"


class Client:
    """
    A logged-on L{ClientEngine} and the commands run with it.
    """

    def __init__(self, reactor: Any, args: argparse.Namespace, show: Callable[[str], None] | None):
        self.reactor = reactor
        self.args = args
        self.show = show
        #: Fires (with an exception) when the session ends for good.
        self.ended: Deferred[CommandFailed] = Deferred()
        endpoint = endpoints.HostnameEndpoint(reactor, args.host, args.port, timeout=args.timeout)
        self.engine = ClientEngine(
            endpoint,
            args.user,
            args.password,
            args.device,
            system_token=args.system_token,
            handler=_Printer(show) if show is not None else None,
            clock=reactor,
            wire=WireConfig(args.max_userid_length, args.max_message_size),
            request_timeout=args.timeout,
            retry_policy=backoffPolicy(
                initialDelay=0.25,
                maxDelay=10.0,
                factor=2.0,
                jitter=lambda: random.random() * 0.25,
            ),
        )
        if show is not None:
            engine = self.engine
            engine.broadcast_received.subscribe(self._broadcast)
            engine.connection_interrupted.subscribe(
                lambda: _stderr("connection lost; reconnecting")
            )
            engine.relogon_completed.subscribe(self._relogon)
            engine.being_pushed_out.subscribe(lambda cause: self._end(f"pushed out: {cause}"))
            engine.being_kicked_out.subscribe(
                lambda operator, reason: self._end(
                    f"kicked out by {operator}" + (f": {reason}" if reason else "")
                )
            )
            engine.disconnected.subscribe(
                lambda kind, text: _stderr(
                    f"the server closed the connection: {getattr(kind, 'name', kind)}: {text}"
                )
            )

    def _broadcast(
        self, sender: str, group_id: str, information_type: int, payload: bytes
    ) -> None:
        show = self.show
        assert show is not None  # subscribed only when there is one
        show(f"{sender} {information_type} {_text(payload)}")

    def _relogon(self, response: LogonResponse) -> None:
        if response.succeeded:
            _stderr("logged on again")
        elif response.result == LogonResult.BUSY:
            _stderr(f"{describe(LogonFailed(response))}; trying again")
        else:
            self._end(describe(LogonFailed(response)))

    def _end(self, why: str) -> None:
        if not self.ended.called:
            self.ended.callback(CommandFailed(why))

    async def logon(self) -> None:
        await self.engine.logon()

    async def leave(self) -> None:
        if self.engine.logged_on:
            await self.engine.logoff()
        else:
            await self.engine.close()

    async def run(self, command: argparse.Namespace) -> list[str]:
        """
        Run one command; return the lines it prints.

        @raise CommandFailed: it failed (or the error of the call).
        """
        engine = self.engine
        name = command.command
        if name == "ping":
            if command.target in (None, SERVER_ID):
                rtt = await engine.ping()
                who = SERVER_ID
            else:
                rtt = await engine.ping_by_server(command.target)
                who = command.target
            return [f"{who}: {rtt * 1000:.1f} ms"]
        if name == "online":
            return list(await engine.get_all_online_users())
        if name == "send":
            payload = command.text.encode("utf-8")
            if command.no_ack:
                engine.send(command.target, command.type, payload)
                return []
            outcome = await engine.send_certainly(command.target, command.type, payload)
            if outcome == STORED:
                return [f"stored for {command.target} (offline)"]
            return [f"delivered to {command.target}"]
        if name == "query":
            answer = await engine.query(command.target, command.type, command.text.encode("utf-8"))
            return [_text(answer)]
        if name == "kick":
            try:
                await engine.kick_out(command.target, command.reason)
            except RequestError as e:
                raise CommandFailed(f"kick refused: {e.text}") from None
            return [f"kicked {command.target}"]
        if name == "broadcast":
            await engine.broadcast(command.group, command.type, command.text.encode("utf-8"))
            return [f"broadcast to {command.group}"]
        raise CommandFailed(f"unknown command {name!r}")


# -- listen --------------------------------------------------------------------------


def _succeed_once(d: Deferred[None]) -> None:
    """
    Fire C{d} with C{None} unless it has fired.
    """
    if not d.called:
        d.callback(None)


def _fail_once(d: Deferred[None], reason: BaseException) -> None:
    """
    Fail C{d} with C{reason} unless it has fired.
    """
    if not d.called:
        d.errback(reason)


async def _listen(reactor: Any, client: Client, count: int | None, seconds: float | None) -> None:
    done: Deferred[None] = Deferred()
    received = 0
    show = client.show

    def counted(line: str) -> None:
        nonlocal received
        _stdout(line)
        received += 1
        if count is not None and received >= count and not done.called:
            # After the handler has returned, so that its Ack or answer
            # goes out before the Logoff.
            reactor.callLater(0, _succeed_once, done)

    client.show = counted
    cast(_Printer, client.engine.handler).show = counted
    client.ended.addCallback(lambda e: _fail_once(done, e))
    if seconds is not None:
        timer = reactor.callLater(seconds, _succeed_once, done)
        done.addBoth(lambda r: (timer.active() and timer.cancel(), r)[1])
    try:
        await client.logon()
        _stderr(f"logged on as {client.engine.user_id}; listening")
        await done
    finally:
        client.show = show


# -- shell ---------------------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class _Shell(LineReceiver):
    """
    Reads commands from standard input, one per line, and runs them one at
    a time; the end of input (or C{quit}) ends the session once the
    commands before it have run.
    """

    delimiter = b"\n"

    def __init__(self, client: Client, done: Deferred[None]):
        self.client = client
        self.done = done
        self.closed: Deferred[None] = Deferred()
        self.parser = _shell_parser()
        self.queue: Deferred[None] = Deferred()
        self.queue.callback(None)
        self.interactive = sys.stdin.isatty()

    def out(self, line: str) -> None:
        if self.transport is not None and not self.closed.called:
            self.transport.write(line.encode("utf-8") + b"\n")

    def prompt(self) -> None:
        if self.interactive and not self.done.called:
            assert self.transport is not None  # connected
            self.transport.write(b"esf> ")

    def connectionMade(self) -> None:
        self.out(f"logged on as {self.client.engine.user_id}; type help for the commands")
        self.prompt()

    def lineReceived(self, line: bytes) -> None:
        self.queue.addCallback(lambda _: ensureDeferred(self._run(line)))

    def readConnectionLost(self) -> None:
        rest, self._buffer = self._buffer, b""
        if rest.strip():
            self.lineReceived(rest)  # a last line without its newline
        self.queue.addCallback(lambda _: _succeed_once(self.done))

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.closed.called:
            self.closed.callback(None)
        if not self.done.called:
            self.done.callback(None)

    async def _run(self, raw: bytes) -> None:
        if self.done.called:
            return
        line = raw.decode("utf-8", errors="replace").strip()
        try:
            words = shlex.split(line)
        except ValueError as e:
            _stderr(str(e))
            self.prompt()
            return
        if not words:
            self.prompt()
            return
        if words[0] in ("quit", "exit"):
            self.done.callback(None)
            return
        if words[0] in ("help", "?"):
            self.out(SHELL_HELP)
            self.prompt()
            return
        try:
            command = self.parser.parse_args(words)
            for out in await self.client.run(command):
                self.out(out)
        except Exception as e:
            message = describe(e, self.client.args)
            if message:
                _stderr(message)
        self.prompt()


async def _shell(reactor: Any, client: Client) -> None:
    from twisted.internet import stdio

    done: Deferred[None] = Deferred()
    client.ended.addCallback(lambda e: _fail_once(done, e))
    await client.logon()
    shell = _Shell(client, done)
    client.show = shell.out
    cast(_Printer, client.engine.handler).show = shell.out
    stdio.StandardIO(shell, reactor=reactor)
    try:
        await done
    finally:
        # Let what was written reach standard output before leaving.
        if not shell.closed.called:
            assert shell.transport is not None  # StandardIO connected it
            shell.transport.loseConnection()
            await shell.closed.addTimeout(5, reactor).addErrback(lambda _: None)


# -- main ----------------------------------------------------------------------------


async def _main(reactor: Any, args: argparse.Namespace) -> None:
    listening = args.command in ("listen", "shell")
    try:
        client = Client(reactor, args, _stdout if listening else None)
    except ValueError as e:
        _stderr(str(e))
        raise SystemExit(1) from None
    try:
        if args.command == "listen":
            await _listen(reactor, client, args.count, args.seconds)
        elif args.command == "shell":
            await _shell(reactor, client)
        else:
            await client.logon()
            for line in await client.run(args):
                _stdout(line)
    except Exception as e:
        _stderr(describe(e, args))
        await _quietly(client.leave())
        raise SystemExit(1) from None
    await _quietly(client.leave())


async def _quietly(coroutine: Awaitable[object]) -> None:
    try:
        await coroutine
    except Exception:
        pass


def _start_logging(verbose: bool) -> None:
    """
    Nothing from the engine's log unless C{verbose}: without it, errors
    reach the user as one line each, from the command.
    """
    observers = []
    if verbose:
        predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
        observers.append(FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate]))
    globalLogBeginner.beginLoggingTo(observers, discardBuffer=True, redirectStandardIO=False)


def main(argv: list[str] | None = None) -> None:
    """
    Run C{esf-client} with C{argv} (by default the process's arguments);
    exits the process with the command's status.
    """
    args = build_parser().parse_args(argv)
    _start_logging(args.verbose)
    task.react(lambda reactor: ensureDeferred(_main(reactor, args)))


if __name__ == "__main__":
    main()
