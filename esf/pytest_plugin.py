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
  - C{esf_server}: a L{esf.testing.MemoryServer} with them, closed after the
    test.
  - C{esf_logs}: a L{esf.testing.LogCapture} of esf's log events.
  - C{esf_logged_errors}: a L{esf.testing.LoggedErrors}; the test fails if
    an error it did not C{flush()} was logged, as under trial.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import pytest

from ._config import ServerConfig
from .testing import LogCapture, LoggedErrors, MemoryServer

__all__ = [
    "esf_applications",
    "esf_config",
    "esf_server",
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
def esf_server(esf_applications: Sequence[Any], esf_config: ServerConfig) -> Iterator[MemoryServer]:
    """
    An in-memory server with C{esf_applications} and C{esf_config}.
    """
    server = MemoryServer(*esf_applications, config=esf_config)
    yield server
    server.close()


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
