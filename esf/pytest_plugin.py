"""
pytest fixtures for applications built on esf, on L{esf.testing}.

Nothing registers this plugin by itself; a project that wants the fixtures
names it in its C{conftest.py}::

    pytest_plugins = ["esf.pytest_plugin"]

and overrides C{esf_applications} (and C{esf_config}) there to give the
server its application::

    @pytest.fixture
    def esf_applications():
        return [SupportDesk()]

Fixtures:
  - C{esf_applications}: the application objects (none: every logon is
    accepted).
  - C{esf_config}: the L{esf.ServerConfig} (the defaults).
  - C{esf_offline_store}: the L{esf.interfaces.IOfflineStore} (none).
  - C{esf_server}: a L{esf.testing.MemoryServer} with them, closed after the
    test.
  - C{esf_twistd}: starts real C{twistd esf} processes
    (L{esf.testing.TwistdServer}) in the test's temporary directory:
    C{esf_twistd("--handler", "app:handler")}; each is stopped after the
    test, which fails if one did not stop cleanly.
  - C{esf_logs}: a L{esf.testing.LogCapture} of esf's log events.
  - C{esf_logged_errors}: a L{esf.testing.LoggedErrors}; the test fails if
    an error it did not C{flush()} was logged, as under trial.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable

import pytest

from esf.server._config import ServerConfig

from .interfaces import IOfflineStore
from .testing import LogCapture, LoggedErrors, MemoryServer, TwistdServer

__all__ = [
    "esf_applications",
    "esf_config",
    "esf_offline_store",
    "esf_server",
    "esf_twistd",
    "esf_logs",
    "esf_logged_errors",
]


@pytest.fixture
def esf_applications() -> Sequence[Any]:
    """
    The application objects of C{esf_server}; override it.
    """
    return ()


@pytest.fixture
def esf_config() -> ServerConfig:
    """
    The settings of C{esf_server}; override it.
    """
    return ServerConfig()


@pytest.fixture
def esf_offline_store() -> IOfflineStore | None:
    """
    The offline store of C{esf_server} (none); override it, e.g. with an
    L{esf.offline.MemoryOfflineStore}.
    """
    return None


@pytest.fixture
def esf_server(
    esf_applications: Sequence[Any],
    esf_config: ServerConfig,
    esf_offline_store: IOfflineStore | None,
) -> Iterator[MemoryServer]:
    """
    An in-memory server with C{esf_applications}, C{esf_config} and
    C{esf_offline_store}.
    """
    server = MemoryServer(*esf_applications, config=esf_config, offline_store=esf_offline_store)
    yield server
    server.close()


@pytest.fixture
def esf_twistd(tmp_path: Path) -> Iterator[Callable[..., TwistdServer]]:
    """
    C{esf_twistd(*args, **options)}: a started L{TwistdServer} with
    C{twistd esf}'s options C{args} (and L{TwistdServer}'s keyword
    C{options}), in a directory of its own under the test's C{tmp_path};
    every one is stopped after the test.
    """
    started: list[TwistdServer] = []

    def start(*args: str, **options: Any) -> TwistdServer:
        options.setdefault("directory", tmp_path / f"twistd-{len(started)}")
        server = TwistdServer(args, **options)
        started.append(server)
        return server.start()

    yield start
    failures = []
    for server in started:
        try:
            server.stop()
        except AssertionError as e:
            failures.append(e)
    if failures:
        raise failures[0]


@pytest.fixture
def esf_logs() -> Iterator[LogCapture]:
    """
    esf's log events during the test.
    """
    with LogCapture() as logs:
        yield logs


@pytest.fixture
def esf_logged_errors() -> Iterator[LoggedErrors]:
    """
    The errors logged during the test; any left unflushed fail it.
    """
    errors = LoggedErrors().start()
    try:
        yield errors
        errors.check()
    finally:
        errors.stop()
