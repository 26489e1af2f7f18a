"""
tests/_real_parts.py: a missing real part skips its test loudly, or fails
it under CI (ESF_CI=1).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _real_parts import missing, need_program

HERE = Path(__file__).resolve().parent


def test_a_missing_part_skips_loudly(monkeypatch):
    monkeypatch.delenv("ESF_CI", raising=False)
    with pytest.raises(
        pytest.skip.Exception, match=r"^!!! SKIPPED: no-redis-server is not installed: why$"
    ):
        need_program("no-redis-server", "why")
    with pytest.raises(pytest.skip.Exception, match=r"^!!! SKIPPED: no PyPy$"):
        missing("no PyPy")


def test_a_missing_part_fails_under_ci(monkeypatch):
    monkeypatch.setenv("ESF_CI", "1")
    with pytest.raises(pytest.fail.Exception, match=r"^no-node is not installed: why$"):
        need_program("no-node", "why")
    # A part CI does not have either (glibc off Linux) still skips there.
    with pytest.raises(pytest.skip.Exception, match="no glibc"):
        missing("no glibc", ci=False)


def test_a_present_program_is_found(monkeypatch):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    assert need_program(Path(sys.executable).name, "why") == sys.executable


def test_the_skip_is_reported_at_the_test(tmp_path):
    """
    pytest's summary names the test's own file and line, not the helper's.
    """
    test = tmp_path / "test_needs_it.py"
    test.write_text(
        textwrap.dedent("""\
        from _real_parts import need_program


        def test_it():
            need_program("no-such-program-here", "the test needs it")
    """)
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", str(test)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env=dict(os.environ, ESF_CI="", PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (
        "SKIPPED [1] test_needs_it.py:5: !!! SKIPPED: no-such-program-here is not installed: the test needs it"
        in proc.stdout
    ), proc.stdout
