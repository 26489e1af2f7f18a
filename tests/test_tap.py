"""
Tests for C{twistd esf}: its options, the cred-backed logon handler and
the service it makes.
"""

from __future__ import annotations

import attrs
import pytest
from _helpers import ECHO, REFUSE_ALL, ROOMS
from twisted.application.service import IService
from twisted.python import usage
from zope.interface.verify import verifyObject

from esf import ClientType, LogonRefused, RelogonMode, ServerConfig, ServerService, WireConfig
from esf.interfaces import IBasicHandler
from esf.offline import OfflineBounds
from esf.server._descriptors import DESCRIPTOR_RESERVE, QuietAcceptErrors, nofile_limits
from esf.server._http import ConnectionCap, HTTPLimits, LimitedSite
from esf.tap import CheckerHandler, Options, basic_handler, makeService


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def usage_error(*argv: str) -> str:
    with pytest.raises(usage.UsageError) as raised:
        parse(*argv)
    return str(raised.value)


def outcome(d) -> object:
    """
    The result of a Deferred that has fired: its value, or its failure's
    exception.
    """
    results = []
    d.addBoth(results.append)
    assert len(results) == 1, "the Deferred has not fired"
    (result,) = results
    return result.value if hasattr(result, "value") and hasattr(result, "check") else result


# -- options -----------------------------------------------------------------------


def test_defaults():
    options = parse()
    assert options["port"] == "tcp:4530"
    assert options["relogon-mode"] is RelogonMode.REPLACE_OLD
    assert options["handlers"] == []
    assert options["admins"] == []
    config = options["config"]
    # --max-connections: what the descriptor limit leaves (no HTTP site).
    soft, _ = nofile_limits()
    expected = None if soft is None else soft - DESCRIPTOR_RESERVE
    assert config == attrs.evolve(ServerConfig(), max_connections=expected)
    assert config.wire == WireConfig(11, 1024 * 1024)
    assert (config.heartbeat_interval, config.heartbeat_timeout, config.logon_timeout) == (
        10,
        30,
        10,
    )
    assert config.client_types == frozenset(ClientType)
    assert config.system_token == ""


@pytest.mark.parametrize(
    "port, expected",
    [
        ("4600", "tcp:4600"),
        ("tcp:4601:interface=127.0.0.1", "tcp:4601:interface=127.0.0.1"),
        ("unix:/tmp/esf-test.sock", "unix:/tmp/esf-test.sock"),
    ],
)
def test_port(port, expected):
    assert parse("--port", port)["port"] == expected
    assert parse("-p", port)["port"] == expected
    assert parse("--port", port)["endpoint"] is not None


@pytest.mark.parametrize(
    "port", ["tcp:nope", "bogus:1", "ssl:4602:privateKey=/no/such/key.pem", "99999", "tcp:65536"]
)
def test_bad_port_is_a_usage_error(port):
    """
    The endpoint is parsed with the options, so a bad one (a missing TLS key
    file included) is a clear usage error rather than a traceback at start.
    """
    with pytest.raises(usage.UsageError, match="--port"):
        parse("--port", port)


def test_every_setting_reaches_the_config():
    config = parse(
        "--relogon-mode",
        "ignore-new",
        "--heartbeat-interval",
        "5",
        "--heartbeat-timeout",
        "12",
        "--logon-timeout",
        "4",
        "--max-message-size",
        "70000",
        "--max-userid-length",
        "20",
        "--system-token",
        "tok",
        "--max-connections",
        "300",
        "--max-output-buffer",
        "4096",
        "--max-blob-size",
        "8192",
        "--query-timeout",
        "7",
        "--client-types",
        "0,5, 200",
        "--websocket-flood-limit",
        "7",
    )["config"]
    assert config.relogon_mode is RelogonMode.IGNORE_NEW
    assert (config.heartbeat_interval, config.heartbeat_timeout, config.logon_timeout) == (
        5,
        12,
        4,
    )
    assert config.wire == WireConfig(20, 70000)
    assert config.wire.header_length == 56
    assert config.system_token == "tok"
    assert config.max_connections == 300
    assert config.max_output_buffer == 4096
    assert (config.max_blob_size, config.query_timeout) == (8192, 7)
    assert config.client_types == {0, 5, 200}
    assert config.websocket_flood_limit == 7


def test_admin_is_repeatable():
    options = parse("--admin", "root", "--admin", "ops")
    assert options["admins"] == ["root", "ops"]
    assert options["config"].admins == {"root", "ops"}


def test_bad_relogon_mode():
    message = usage_error("--relogon-mode", "kick-both")
    assert "--relogon-mode" in message
    assert "replace-old" in message and "ignore-new" in message
    assert "kick-both" in message


@pytest.mark.parametrize(
    "option",
    ["--heartbeat-interval", "--heartbeat-timeout", "--logon-timeout", "--max-connections"],
)
def test_non_numeric_numbers(option):
    message = usage_error(option, "ten")
    assert option in message
    assert "'ten'" in message


@pytest.mark.parametrize(
    "argv, words",
    [
        (("--heartbeat-interval", "0"), ["--heartbeat-interval", "0"]),
        (("--max-userid-length", "256"), ["--max-userid-length", "1..255"]),
        (("--max-message-size", "10"), ["--max-message-size", "10"]),
        (("--max-output-buffer", "1"), ["--max-output-buffer"]),
    ],
)
def test_numbers_out_of_range(argv, words):
    message = usage_error(*argv)
    for word in words:
        assert word in message


def test_push_back_timeout():
    assert parse()["config"].push_back_timeout == 0.05
    assert parse("--push-back-timeout", "0.2")["config"].push_back_timeout == 0.2
    assert parse("--push-back-timeout", "0")["config"].push_back_timeout == 0
    message = usage_error("--push-back-timeout", "-1")
    assert "--push-back-timeout" in message and "at least 0" in message


@pytest.mark.parametrize("timeout", ["30", "20"])
def test_heartbeat_timeout_must_exceed_the_interval(timeout):
    message = usage_error("--heartbeat-interval", "30", "--heartbeat-timeout", timeout)
    assert "--heartbeat-timeout" in message and "--heartbeat-interval" in message
    assert f"({timeout})" in message and "(30)" in message


def test_header_longer_than_the_maximum_message():
    message = usage_error("--max-userid-length", "255", "--max-message-size", "100")
    assert "max_message_size" in message


@pytest.mark.parametrize("value", ["a,b", "", "0,300", "-1"])
def test_bad_client_types(value):
    assert "--client-types" in usage_error("--client-types", value)


@pytest.mark.parametrize(
    "spec, words",
    [
        ("no_such_module_for_esf:handler", ["cannot import", "no_such_module_for_esf"]),
        ("_helpers:NO_SUCH_THING", ["has no", "NO_SUCH_THING"]),
        ("_helpers", ["module:attribute"]),
        (":thing", ["module:attribute"]),
        ("_helpers:LogCapture", ["provides none of", "IBasicHandler"]),
    ],
)
def test_bad_handler(spec, words):
    message = usage_error("--handler", spec)
    for word in words:
        assert word in message


def test_handler_is_loaded():
    options = parse("--handler", "_helpers:REFUSE_ALL")
    assert options["handlers"] == [REFUSE_ALL]
    assert options["applications"].handler is REFUSE_ALL


def test_several_handlers_each_for_what_it_provides():
    """
    --handler is repeatable: each object plays the parts its interfaces
    say, and each IEngineAware one is initialized with the engine.
    """
    options = parse(
        "--handler",
        "_helpers:REFUSE_ALL",
        "--handler",
        "_helpers:ECHO",
        "--handler",
        "_helpers:ROOMS",
    )
    service = makeService(options)
    engine = service.engine
    assert engine.handler is REFUSE_ALL
    assert engine.customize_handler is ECHO
    assert engine.group_manager is ROOMS
    assert ECHO.engines[-1] is engine and ROOMS.engines[-1] is engine


@pytest.mark.parametrize(
    "argv, words",
    [
        (
            ("--handler", "_helpers:REFUSE_ALL", "--handler", "_helpers:REFUSE_ALL"),
            ["--handler:", "given twice"],
        ),
        (
            ("--handler", "_helpers:REFUSE_ALL", "--handler", "_helpers:ACCEPT_ALL"),
            ["--handler:", "IBasicHandler is provided by both", "one object per interface"],
        ),
    ],
)
def test_two_handlers_for_one_interface_are_refused(argv, words):
    message = usage_error(*argv)
    assert "\n" not in message
    for word in words:
        assert word in message


# -- --auth and the checker handler -------------------------------------------------------


def test_auth_memory():
    options = parse("--auth", "memory:alice:pa:bob:pb")
    handler = basic_handler(options)
    assert isinstance(handler, CheckerHandler)
    assert verifyObject(IBasicHandler, handler)
    verify = handler.verify_user
    assert outcome(verify("", "alice", "pa", ClientType.DOTNET, "h:1")) is True
    assert outcome(verify("", "bob", "pb", ClientType.DOTNET, "h:1")) is True
    wrong = outcome(verify("", "alice", "pb", ClientType.DOTNET, "h:1"))
    assert isinstance(wrong, LogonRefused)
    assert wrong.cause == "invalid user ID or password"
    assert isinstance(outcome(verify("", "carol", "pa", 0, "h:1")), LogonRefused)
    assert handler.can_kick_out("alice", "bob", None) is False


def test_auth_file(tmp_path):
    passwords = tmp_path / "passwd"
    passwords.write_text("alice:pa\nbob:pb\n")
    handler = basic_handler(parse("--auth", f"file:{passwords}"))
    assert outcome(handler.verify_user("", "alice", "pa", 0, "h:1")) is True
    assert outcome(handler.verify_user("", "bob", "pb", 0, "h:1")) is True
    assert isinstance(outcome(handler.verify_user("", "alice", "nope", 0, "h:1")), LogonRefused)
    assert isinstance(outcome(handler.verify_user("", "eve", "pa", 0, "h:1")), LogonRefused)


def test_auth_with_non_ascii_names():
    handler = basic_handler(parse("--auth", "memory:zoë:pässwort"))
    assert outcome(handler.verify_user("", "zoë", "pässwort", 0, "h:1")) is True
    assert isinstance(outcome(handler.verify_user("", "zoë", "passwort", 0, "h:1")), LogonRefused)


def test_auth_then_the_applications_handler():
    handler = basic_handler(parse("--auth", "memory:alice:pa", "--handler", "_helpers:REFUSE_ALL"))
    assert isinstance(handler, CheckerHandler)
    assert handler.handler is REFUSE_ALL
    # The password is right, then the application says no.
    assert outcome(handler.verify_user("", "alice", "pa", 0, "h:1")) is False
    assert isinstance(outcome(handler.verify_user("", "alice", "x", 0, "h:1")), LogonRefused)
    assert outcome(handler.can_kick_out("alice", "bob", None)) is False


def test_handler_without_auth_is_used_as_it_is():
    assert basic_handler(parse("--handler", "_helpers:REFUSE_ALL")) is REFUSE_ALL


def test_neither_auth_nor_handler_accepts_all():
    assert basic_handler(parse()) is None


# -- the service -----------------------------------------------------------------------


def test_make_service_accept_all_warns(logs):
    service = makeService(parse("--port", "tcp:0:interface=127.0.0.1"))
    assert isinstance(service, ServerService)
    assert verifyObject(IService, service)
    assert not service.running
    (warning,) = logs.esf("accept_all_warning")
    assert warning["log_level"].name == "warn"
    assert "EVERY LOGON IS ACCEPTED" in warning["log_format"]
    options = parse()
    assert service.engine.config == options["config"]


@pytest.mark.parametrize(
    "argv",
    [("--auth", "memory:alice:pa"), ("--handler", "_helpers:REFUSE_ALL")],
)
def test_make_service_no_warning_with_auth_or_handler(argv, logs):
    service = makeService(parse(*argv))
    assert logs.esf("accept_all_warning") == []
    handler = service.engine.handler
    if argv[0] == "--auth":
        assert isinstance(handler, CheckerHandler)
    else:
        assert handler is REFUSE_ALL


def test_make_service_bad_endpoint():
    with pytest.raises(usage.UsageError) as raised:
        makeService(parse("--port", "nosuchtransport:1234"))
    assert "--port" in str(raised.value)


def test_make_service_passes_the_config():
    options = parse("--admin", "root", "--heartbeat-timeout", "40")
    service = makeService(options)
    assert service.engine.config is options["config"]
    assert service.engine.config.admins == {"root"}


def test_offline_bounds_reach_the_store(tmp_path):
    options = parse(
        "--offline",
        f"sqlite:{tmp_path / 'offline.db'}",
        "--offline-max-messages",
        "50",
        "--offline-max-bytes",
        "4096",
        "--offline-max-per-sender",
        "7",
        "--offline-max-bytes-per-sender",
        "2048",
        "--offline-max-total-messages",
        "900",
        "--offline-max-total-bytes",
        "65536",
    )
    store = makeService(options).engine.offline.store
    assert store.bounds == OfflineBounds(
        max_messages=50,
        max_bytes=4096,
        max_sender_messages=7,
        max_sender_bytes=2048,
        max_total_messages=900,
        max_total_bytes=65536,
    )


def test_offline_bounds_defaults(tmp_path):
    store = makeService(
        parse("--offline", f"sqlite:{tmp_path / 'offline.db'}")
    ).engine.offline.store
    bounds = store.bounds
    assert (bounds.max_messages, bounds.max_bytes) == (10_000, 64 * 1024 * 1024)
    assert (bounds.max_sender_messages, bounds.max_sender_bytes) == (1000, 16 * 1024 * 1024)
    assert (bounds.max_total_messages, bounds.max_total_bytes) == (1_000_000, 1024 * 1024 * 1024)
    assert bounds == OfflineBounds()


@pytest.mark.parametrize(
    "option, bound",
    [
        ("--offline-max-bytes", "max_bytes"),
        ("--offline-max-bytes-per-sender", "max_sender_bytes"),
        ("--offline-max-total-bytes", "max_total_bytes"),
    ],
)
def test_offline_byte_bounds_are_at_least_1024(option, bound):
    assert option[2:] in usage_error(option, "1023")
    assert getattr(parse(option, "1024")["offline-bounds"], bound) == 1024


@pytest.mark.parametrize("option", ["--offline-max-per-sender", "--offline-max-total-messages"])
def test_offline_bounds_must_be_positive(option):
    assert option[2:] in usage_error(option, "0")


# -- operations: --metrics, --admin-api, --admin-token-file, --audit-log ---------------


def _token_file(tmp_path, mode=0o600):
    import os

    path = tmp_path / "token"
    path.write_text("0123456789abcdef-token\n")
    os.chmod(path, mode)
    return str(path)


def test_operations_are_off_by_default():
    service = makeService(parse())
    names = {type(s).__name__ for s in service}
    # Freed memory is given back to the system by default (--malloc-trim),
    # and the GC is set for a server (--gc-threshold).
    assert names == {"_EngineService", "StreamServerEndpointService", "MemoryTrimmer", "GCTuning"}


def test_malloc_trim_option():
    from esf.operations._memory import MemoryTrimmer

    [trimmer] = [s for s in makeService(parse()) if isinstance(s, MemoryTrimmer)]
    assert trimmer.interval == 5.0
    [trimmer] = [
        s for s in makeService(parse("--malloc-trim", "0.5")) if isinstance(s, MemoryTrimmer)
    ]
    assert trimmer.interval == 0.5
    assert not [
        s for s in makeService(parse("--malloc-trim", "0")) if isinstance(s, MemoryTrimmer)
    ]
    for bad in ("-1", "soon"):
        with pytest.raises(usage.UsageError, match="--malloc-trim"):
            parse("--malloc-trim", bad)


def test_gc_threshold_option():
    from esf.operations._memory import GCTuning

    [tuning] = [s for s in makeService(parse()) if isinstance(s, GCTuning)]
    assert tuning.threshold == 10_000
    [tuning] = [
        s for s in makeService(parse("--gc-threshold", "50000")) if isinstance(s, GCTuning)
    ]
    assert tuning.threshold == 50_000
    assert not [s for s in makeService(parse("--gc-threshold", "0")) if isinstance(s, GCTuning)]
    for bad in ("-1", "many"):
        with pytest.raises(usage.UsageError, match="--gc-threshold"):
            parse("--gc-threshold", bad)


def test_operations_services(tmp_path):
    from esf.operations._admin import AdminService
    from esf.operations._audit import AuditService
    from esf.operations._metrics import MetricsService

    options = parse(
        "--metrics", "tcp:0:interface=127.0.0.1",
        "--admin-api", "tcp:0:interface=127.0.0.1",
        "--admin-token-file", _token_file(tmp_path),
        "--audit-log", str(tmp_path / "audit.jsonl"),
    )  # fmt: skip
    assert options["admin-token"] == "0123456789abcdef-token"
    service = makeService(options)
    kinds = [type(s) for s in service]
    assert AuditService in kinds and MetricsService in kinds and AdminService in kinds
    (metrics,) = [s for s in service if isinstance(s, MetricsService)]
    assert metrics.metrics.engine is service.engine


def test_audit_options(tmp_path):
    from esf.operations._audit import PER_USER, AuditService, Retention

    path = str(tmp_path / "audit.jsonl")
    [audit] = [s for s in makeService(parse("--audit-log", path)) if isinstance(s, AuditService)]
    assert (audit.per_user, audit.retention) == (PER_USER, Retention(0, 0.0))
    options = parse(
        "--audit-log", path, "--audit-max-per-user", "5",
        "--audit-keep-files", "20", "--audit-keep-days", "90",
    )  # fmt: skip
    [audit] = [s for s in makeService(options) if isinstance(s, AuditService)]
    assert (audit.per_user, audit.retention) == (5, Retention(20, 90.0))
    for option, bad in (("--audit-max-per-user", "0"), ("--audit-keep-files", "-1"),
                        ("--audit-keep-days", "-2")):  # fmt: skip
        with pytest.raises(usage.UsageError, match=option):
            parse(option, bad)


def test_admin_api_on_loopback_without_a_token_warns(logs):
    makeService(parse("--admin-api", "tcp:0:interface=127.0.0.1"))
    (warning,) = logs.esf("admin_without_token")
    assert warning["log_level"].name == "warn"
    assert "only reads" in warning["log_format"]


@pytest.mark.parametrize("endpoint", ["tcp:8530", "tcp6:8530", "tcp:8530:interface=0.0.0.0"])
def test_admin_api_open_to_the_network_needs_a_token(endpoint):
    assert "reachable from other machines" in usage_error("--admin-api", endpoint)


def test_admin_api_anywhere_with_a_token(tmp_path):
    options = parse("--admin-api", "tcp:0", "--admin-token-file", _token_file(tmp_path))
    assert options["admin-api-endpoint"] is not None


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--metrics", "bogus:1"), "--metrics 'bogus:1' is not an endpoint"),
        (("--admin-api", "tcp:nope:interface=127.0.0.1"), "--admin-api"),
        (("--admin-token-file", "/nonexistent"), "--admin-token-file is for --admin-api"),
        (("--admin-api", "tcp:0", "--admin-token-file", "/nonexistent/t"), "cannot read"),
        (("--audit-log", "/nonexistent/dir/audit.jsonl"), "--audit-log: the directory"),
    ],
)
def test_operations_usage_errors(argv, message):
    assert message in usage_error(*argv)


def test_a_token_file_others_may_read_is_refused(tmp_path):
    path = _token_file(tmp_path, 0o644)
    assert "chmod 600" in usage_error("--admin-api", "tcp:0", "--admin-token-file", path)


# -- WebSocket -------------------------------------------------------------------------


def listeners_of(service):
    from twisted.application.internet import StreamServerEndpointService

    return [s for s in service if isinstance(s, StreamServerEndpointService)]


def test_no_websocket_by_default():
    options = parse()
    assert options["websocket"] == []
    assert options["websocket-endpoints"] == []
    assert options["web-demo"] == 0
    service = makeService(options)
    assert len(listeners_of(service)) == 1  # the TCP listener


def test_websocket_endpoints_and_origins():
    from twisted.web.server import Site

    from esf import WebSocketFactory

    options = parse(
        "--websocket", "4531",
        "--websocket", "tcp:4532:interface=127.0.0.1",
        "--websocket-origin", "https://chat.example.com",
        "--websocket-origin", "https://*.example.org",
    )  # fmt: skip
    assert options["websocket"] == ["tcp:4531", "tcp:4532:interface=127.0.0.1"]
    assert len(options["websocket-endpoints"]) == 2
    service = makeService(options)
    listeners = listeners_of(service)[1:]
    # Each holds at most --websocket-max-handshakes connections in their handshake.
    assert [type(listener.factory) for listener in listeners] == [ConnectionCap] * 2
    assert [listener.factory.max_connections for listener in listeners] == [256] * 2
    factories = [listener.factory.wrappedFactory for listener in listeners]
    assert [type(factory) for factory in factories] == [WebSocketFactory] * 2
    for factory in factories:
        assert factory.engine is service.engine
        assert factory.allowed_origins == ("https://chat.example.com", "https://*.example.org")
    # (Each endpoint logs running out of descriptors once per interval.)
    assert all(isinstance(listener.endpoint, QuietAcceptErrors) for listener in listeners)
    assert [listener.endpoint.endpoint for listener in listeners] == options["websocket-endpoints"]

    demo = makeService(
        parse("--websocket", "4531", "--web-demo", "--logon-timeout", "7",
              "--websocket-max-handshakes", "9")
    )  # fmt: skip
    [listener] = listeners_of(demo)[1:]
    assert isinstance(listener.factory, LimitedSite)
    assert isinstance(listener.factory.wrappedFactory, Site)
    assert listener.factory.limits == HTTPLimits(9, 7)


def test_bad_websocket_endpoint():
    assert "--websocket 'bogus:1' is not an endpoint" in usage_error("--websocket", "bogus:1")


def test_web_demo_needs_a_websocket_endpoint():
    assert "--web-demo" in usage_error("--web-demo")


def test_admin_host_option(tmp_path):
    from esf.operations._admin import AdminApi

    options = parse(
        "--admin-api", "tcp:0:interface=127.0.0.1",
        "--admin-host", "Admin.Example", "--admin-host", "[2001:db8::1]",
    )  # fmt: skip
    assert options["admin-hosts"] == ["admin.example", "2001:db8::1"]
    (admin,) = [s for s in makeService(options) if type(s).__name__ == "AdminService"]
    api = admin.site.resource.children[b"api"]
    assert isinstance(api, AdminApi)
    assert {"admin.example", "2001:db8::1", "localhost"} == api.policy.hosts
    assert api.policy.read_only
    assert "--admin-host: 'admin.example:8530' is not a host name" in usage_error(
        "--admin-api", "tcp:0:interface=127.0.0.1", "--admin-host", "admin.example:8530"
    )
    assert "--admin-host is for --admin-api" in usage_error("--admin-host", "admin.example")


# -- start-up errors of a real twistd: one line, exit status 1 --------------------------

INITIALIZE_FAILS = """
from zope.interface import implementer
from esf.interfaces import IEngineAware

@implementer(IEngineAware)
class App:
    def initialize(self, engine):
        raise RuntimeError("no database at db.example")

app = App()
"""


def run_twistd(tmp_path, *argv: str):
    import subprocess

    from test_e2e import REPO, server_env, twistd_command

    (tmp_path / "failing_app.py").write_text(INITIALIZE_FAILS)
    (tmp_path / "broken_app.py").write_text("raise KeyError('DATABASE_URL')\n")
    return subprocess.run(
        twistd_command() + ["-n", "--pidfile=", "--logfile=-", "esf", *argv],
        cwd=REPO,
        env=server_env([tmp_path]),
        capture_output=True,
        text=True,
        timeout=60,
    )


def only_error_line(run, before_logging: bool) -> str:
    """
    The one line that reports a failed start: on stderr for what twistd
    meets before it begins logging (the options, making the service),
    in the log (here on stdout) for what it meets after (listening).
    """
    output = run.stdout + run.stderr
    assert run.returncode == 1, output
    assert "Traceback" not in output and "Usage:" not in output, output
    if before_logging:
        assert run.stdout == "", output
        lines = run.stderr.splitlines()
    else:
        assert run.stderr == "", output
        lines = [
            line for line in run.stdout.splitlines() if "#error]" in line or "#critical]" in line
        ]
    assert len(lines) == 1, output
    return lines[0]


@pytest.fixture
def taken_port():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"


@pytest.mark.e2e
@pytest.mark.parametrize("option", ["--port", "--websocket", "--metrics", "--admin-api"])
def test_a_port_in_use_is_one_line(tmp_path, taken_port, option):
    argv = [option, taken_port]
    if option != "--port":
        argv += ["--port", "tcp:0:interface=127.0.0.1"]
    line = only_error_line(run_twistd(tmp_path, *argv), before_logging=False)
    assert f"{option} '{taken_port}' cannot listen (Address already in use)" in line, line
    assert line.endswith(f"give another {option}"), line


@pytest.mark.e2e
@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--port", "99999"], "twistd esf: --port 'tcp:99999': port 99999 is not 0..65535"),
        (["--websocket", "tcp:70000"], "twistd esf: --websocket 'tcp:70000': port 70000 is not 0..65535"),
        (["--websocket", "bogus:1"], "twistd esf: --websocket 'bogus:1' is not an endpoint: Unknown endpoint type: 'bogus'"),
        (["--heartbeat-interval", "x"], "twistd esf: --heartbeat-interval takes a whole number, not 'x'"),
        (["--prot", "1"], "twistd esf: option --prot not recognized (twistd esf --help lists the options)"),
        (["--handler", "no_such_module:app"], "twistd esf: --handler: cannot import 'no_such_module': No module named 'no_such_module'"),
        (["--handler", "broken_app:app"], "twistd esf: --handler: importing 'broken_app' raised KeyError: 'DATABASE_URL'"),
        (["--handler", "failing_app:app"], "twistd esf: --handler: initialize(engine) raised RuntimeError: no database at db.example"),
        (["--cluster", "redis+sentinel://:secret@127.0.0.1:26379"], "twistd esf: --cluster: a Sentinel URL names the service: redis+sentinel://HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB]"),
        (["--cluster", "redis+sentinel://:secret@h1,h2:x/esf"], "twistd esf: --cluster: bad port in the Sentinel address 'h2:x'"),
        (["--cluster", "rediss+sentinel://h/esf"], "twistd esf: --cluster: TLS with Sentinel (rediss+sentinel://) is not supported: use redis+sentinel:// on a private network"),
        (["--admin-api", "tcp:0:interface=127.0.0.1", "--admin-token-file", "TMP"], "twistd esf: --admin-token-file: cannot read TMP: Is a directory"),
        (["--admin-api", "tcp:0:interface=127.0.0.1", "--admin-token-file", "TMP/token"], "twistd esf: --admin-token-file: TMP/token may be read by other users; chmod 600 it"),
    ],
)  # fmt: skip
def test_a_bad_option_is_one_line(tmp_path, argv, expected):
    token = tmp_path / "token"
    token.write_text("x" * 32)
    token.chmod(0o644)
    argv = [a.replace("TMP", str(tmp_path)) for a in argv]
    line = only_error_line(run_twistd(tmp_path, *argv), before_logging=True)
    assert line == expected.replace("TMP", str(tmp_path))
