"""
The typed part of the public API passes C{mypy --strict}.

Checked are the modules whose annotations are complete: every module of
the package except those in C{UNTYPED} and esf/examples/, which are not
yet covered.  A new module is checked as soon as it exists; imports of
the uncovered ones are checked only where the others use them.
"""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Every module of the package but these, so that a new module is checked
# from its first commit rather than when someone remembers to list it.
UNTYPED = {
    "esf/bench/_cluster.py",
    "esf/bench/_coordinator.py",
    "esf/bench/_figures.py",
    "esf/bench/_load.py",
    "esf/bench/_modes.py",
    "esf/bench/_options.py",
    "esf/bench/_patterns.py",
    "esf/bench/_procs.py",
    "esf/bench/_progress.py",
    "esf/bench/_report.py",
    "esf/bench/_run.py",
    "esf/bench/_servers.py",
    "esf/bench/_wire.py",
    "esf/bench/_worker.py",
    "esf/bench/relays/bare.py",
    "esf/bench/relays/coalescing.py",
}
TYPED = sorted(
    str(path.relative_to(REPO))
    for path in (REPO / "esf").rglob("*.py")
    if str(path.relative_to(REPO)) not in UNTYPED and "examples" not in path.parts
)


def test_mypy_strict(tmp_path):
    pytest.importorskip("mypy", reason="mypy is not installed (it is in the test extra)")
    pytest.importorskip("mypy_zope", reason="mypy-zope is not installed (it is in the test extra)")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--follow-imports=silent",
            "--cache-dir",
            str(tmp_path),
            "--config-file",
            str(REPO / "pyproject.toml"),
            *TYPED,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout


def test_py_typed_marker():
    assert (REPO / "esf" / "py.typed").is_file()
