"""
The real parts some tests use: C{redis-server}, C{chromium} and
C{chromedriver}, C{node}, C{haproxy}, a PyPy environment, the C{selenium}
package, glibc's allocator functions.

Where one is missing its tests skip with a loud reason, except under CI
(C{ESF_CI=1}, which C{.ci/run} sets after installing them), where they
fail: a part that CI should have cannot go missing unnoticed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

__all__ = ["missing", "need_program", "pypy_python"]


def missing(reason: str, *, ci: bool = True) -> NoReturn:
    """
    A real part the test needs is missing (C{reason} says which, and how
    to get it): fail under CI, unless C{ci} is false (CI does not have it
    either), else skip, loudly.
    """
    __tracebackhide__ = True  # pytest reports the caller's line
    if ci and os.environ.get("ESF_CI") == "1":
        pytest.fail(reason)
    pytest.skip(f"!!! SKIPPED: {reason}")


def need_program(program: str, why: str) -> str:
    """
    The path of C{program}; L{missing} when it is not installed (C{why}:
    what needs it, and how to install it).
    """
    __tracebackhide__ = True
    path = shutil.which(program)
    if path is None:
        missing(f"{program} is not installed: {why}")
    return path


def pypy_python() -> str:
    """
    The PyPy of the PyPy tests (the benchmark's smoke run, the GC
    collection on PyPy): C{$ESF_PYPY}, the python of a PyPy environment
    holding esf's dependencies (.ci/run makes one with Debian's pypy3;
    docs/performance.md gives the commands).
    """
    python = os.environ.get("ESF_PYPY")
    if python and Path(python).is_file():
        return python
    message = (
        "no PyPy for the PyPy tests: set ESF_PYPY to the python of a PyPy environment with "
        "esf's dependencies (.ci/run makes one; see docs/performance.md)"
        + (
            ""
            if shutil.which("pypy3")
            else "; pypy3 is not installed either (apt-get install pypy3)"
        )
    )
    missing(message)
