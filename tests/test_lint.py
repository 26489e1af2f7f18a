"""
The lint rules pyproject.toml's [tool.ruff.lint] selects hold over the whole
checkout, and the code is laid out as `ruff format` lays it out: a finding
or a file the formatter would change fails the suite.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _ruff():
    beside = Path(sys.executable).with_name("ruff")
    found = str(beside) if beside.exists() else shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed: pip install '.[test]' installs it")
    return found


def test_ruff_finds_nothing():
    result = subprocess.run(
        [_ruff(), "check", "--no-cache", "--output-format", "concise", str(REPO)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_changes_nothing():
    result = subprocess.run(
        [_ruff(), "format", "--check", "--no-cache", str(REPO)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_would_find_an_unused_import(tmp_path):
    """
    The check can fail: the configuration's rules catch an unused import.
    """
    (tmp_path / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    (tmp_path / "bad.py").write_text("import os\n")
    result = subprocess.run(
        [_ruff(), "check", "--no-cache", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 1 and "F401" in result.stdout


def test_ruff_format_would_find_a_file_to_change(tmp_path):
    """
    The format check can fail: a file laid out otherwise is reported.
    """
    (tmp_path / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    (tmp_path / "ugly.py").write_text("x = [1,2 ,3]\n")
    result = subprocess.run(
        [_ruff(), "format", "--check", "--no-cache", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 1 and "ugly.py" in result.stdout
