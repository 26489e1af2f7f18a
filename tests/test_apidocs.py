"""
The API reference (C{docs/api/build.py}): pydoctor builds it from the
docstrings of the public modules, offline and quickly, without a warning.
"""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "docs" / "api" / "build.py"
PUBLIC = (
    "esf",
    "esf.wire",
    "esf.testing",
    "esf.cluster",
    "esf.offline",
    "esf.operations",
    "esf.interfaces",
)


def _build(output, source=None):
    try:
        import pydoctor  # noqa: F401
    except ImportError:
        pytest.fail("pydoctor is not installed: it is in the test extra (pip install '.[test]')")
    arguments = [sys.executable, str(BUILD), str(output)]
    if source is not None:
        arguments.append(str(source))
    started = time.monotonic()
    result = subprocess.run(arguments, capture_output=True, text=True, timeout=120)
    return result, time.monotonic() - started


def test_reference_builds_without_warnings(tmp_path):
    """
    The reference of the public surface builds in well under 30 s with
    nothing to warn about; each public module has its page, the names esf
    re-exports from private modules are documented where users import
    them, and no private module has a page.
    """
    result, took = _build(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", result.stdout
    assert took < 30
    pages = {p.name for p in tmp_path.glob("*.html")}
    assert {f"{module}.html" for module in PUBLIC} <= pages
    assert {"esf.ServerEngine.html", "esf.wire.FrameDecoder.html"} <= pages
    assert {"esf.testing.MemoryServer.html", "esf.interfaces.IBasicHandler.html"} <= pages
    assert [p for p in pages if p.startswith("esf._") or ("._" in p and p.endswith(".html"))] == []


def test_a_warning_fails_the_build(tmp_path):
    """
    A docstring with a link to nothing makes the build fail and say where.
    """
    source = tmp_path / "esf"
    shutil.copytree(REPO / "esf", source, ignore=shutil.ignore_patterns("__pycache__"))
    with open(source / "testing" / "__init__.py", "a") as f:
        f.write('\n\ndef broken():\n    """\n    See L{no_such_thing}.\n    """\n')
    result, _ = _build(tmp_path / "out", source)
    assert result.returncode != 0
    assert "testing/__init__.py" in result.stdout and "no_such_thing" in result.stdout
