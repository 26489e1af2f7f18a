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


@pytest.fixture(scope="module", params=["compiled", "python", "pypy"])
def compiled_loops(request):
    """
    Run the test with the compiled loops of C{esf/wire/_speedups.pyx} (the
    frame decoder's, the WebSocket messages' in and out; L{esf.wire.COMPILED}:
    a loud skip where they were not built, a failure under CI), with the
    pure-Python code alone as CPython runs it without them, and as PyPy runs
    it (with the relay's loop of L{esf.wire._decoder.take_sends}).  (Module
    scope: a module's tests run with one, then with the next.)
    """
    from _real_parts import missing

    from esf.server import _websocket_frames
    from esf.wire import _decoder

    if request.param in ("python", "pypy"):
        patch = pytest.MonkeyPatch()
        request.addfinalizer(patch.undo)
        patch.setattr(_decoder.FrameDecoder, "_feed", _decoder.FrameDecoder._feed_python)
        patch.setattr(_decoder.FrameDecoder, "_make_pair", _decoder._Pair)
        patch.setattr(_decoder, "TAKE_SENDS", request.param == "pypy")
        patch.setattr(_websocket_frames, "_take_messages", None)
        patch.setattr(_websocket_frames, "_frame_messages", None)
    elif not _decoder.COMPILED:
        missing(
            "the compiled loops are not built (esf/wire/_speedups.pyx): "
            "pip install -e . builds them on CPython with a C compiler, "
            "unless ESF_PURE_PYTHON is set"
        )
    return request.param


@pytest.hookimpl(hookwrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    """
    Give a Hypothesis test its own inner test back after each call:
    pytest-twisted wraps it in place, so that the second call of a
    parametrized one (L{compiled_loops}) would wrap the wrapper.
    """
    hypothesis = getattr(pyfuncitem.obj, "hypothesis", None)
    inner = hypothesis.inner_test if hypothesis is not None else None
    yield
    if hypothesis is not None:
        hypothesis.inner_test = inner
