"""
Hypothesis profiles, chosen with the HYPOTHESIS_PROFILE environment variable.
"""

import os

from hypothesis import settings

settings.register_profile("default", max_examples=100, deadline=None)
settings.register_profile("ci", max_examples=200, deadline=None)
settings.register_profile("soak", max_examples=100_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


import pytest


@pytest.fixture
def redis_server(tmp_path):
    """
    A fresh redis-server of the test's own on a free 127.0.0.1 port (see
    tests/_redis.py); skipped loudly where it is not installed, failing
    under CI.
    """
    from _redis import RedisServer

    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def logs():
    """
    esf's log events during the test (L{esf.testing.LogCapture}).
    """
    from _helpers import LogCapture

    capture = LogCapture().start()
    yield capture
    capture.stop()
