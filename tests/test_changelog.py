"""
The changelog: C{CHANGELOG.md} kept with towncrier news fragments, and the
version it names the same as C{esf.__version__} and the package's.
"""

import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib

import esf

REPO = Path(__file__).resolve().parent.parent
FRAGMENTS = REPO / "newsfragments"

#: A fragment's name: no issue numbers (the leading C{+} tells towncrier the
#: fragment has none), a short name, its type, Markdown.
FRAGMENT_NAME = re.compile(r"^\+[a-z0-9][a-z0-9-]*\.(?P<type>[a-z]+)\.md$")


def _towncrier_config():
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["towncrier"]


def test_fragment_types_are_twisteds():
    """
    The fragment types are Twisted's own.
    """
    types = {t["directory"] for t in _towncrier_config()["type"]}
    assert types == {"feature", "bugfix", "doc", "removal", "misc"}
    assert _towncrier_config()["directory"] == FRAGMENTS.name


def fragment_problems(directory, types):
    """
    What is wrong with the news fragments in C{directory}, one line each.
    """
    problems = []
    for path in sorted(directory.iterdir()):
        if path.name == ".gitignore":
            continue
        match = FRAGMENT_NAME.match(path.name)
        if match is None or match["type"] not in types:
            problems.append(f"{path.name}: not +NAME.TYPE.md with TYPE one of {sorted(types)}")
            continue
        text = path.read_text(encoding="utf-8").strip()
        if not text:
            problems.append(f"{path.name}: empty")
        elif "\n\n" in text:
            problems.append(f"{path.name}: more than one paragraph")
        if re.search(r"#\d|\bissues?\b", text, re.IGNORECASE):
            problems.append(f"{path.name}: names an issue")
    return problems


def test_fragments_form():
    """
    Every file in C{newsfragments/} is a fragment towncrier can place: a
    known type, one non-empty paragraph, no issue numbers.
    """
    types = {t["directory"] for t in _towncrier_config()["type"]}
    assert fragment_problems(FRAGMENTS, types) == []


def test_fragments_form_catches(tmp_path):
    """
    The check above finds each kind of bad fragment.
    """
    (tmp_path / "+ok.feature.md").write_text("Something new.\n")
    (tmp_path / "12.feature.md").write_text("Numbered.\n")
    (tmp_path / "+odd.feat.md").write_text("Unknown type.\n")
    (tmp_path / "+empty.bugfix.md").write_text("\n")
    (tmp_path / "+ref.bugfix.md").write_text("Fixes #12.\n")
    (tmp_path / "+notes.txt").write_text("x\n")
    problems = fragment_problems(tmp_path, {"feature", "bugfix"})
    assert [p.split(":")[0] for p in problems] == [
        "+empty.bugfix.md",
        "+notes.txt",
        "+odd.feat.md",
        "+ref.bugfix.md",
        "12.feature.md",
    ]


def test_newest_release_is_the_version():
    """
    The newest release in C{CHANGELOG.md} is C{esf.__version__}, which is
    also the version of the package's metadata (setup.cfg reads it from
    there), and no release is listed twice.
    """
    text = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "<!-- towncrier release notes start -->\n" in text
    releases = re.findall(r"^## esf (\S+) \(\d{4}-\d\d-\d\d\)$", text, re.MULTILINE)
    assert releases and releases[0] == esf.__version__
    assert len(set(releases)) == len(releases)
    assert re.search(r"^version = attr: esf\.__version__$", (REPO / "setup.cfg").read_text(), re.M)
    try:
        installed = metadata.version("esf")
    except metadata.PackageNotFoundError:
        pytest.skip("esf is not installed: no package metadata to compare")
    assert installed == esf.__version__


def test_towncrier_draft():
    """
    towncrier reads the configuration and the fragments and drafts the next
    release's section from them.
    """
    if (
        shutil.which("towncrier") is None
        and not (Path(sys.executable).parent / "towncrier").exists()
    ):
        pytest.fail("towncrier is not installed: it is in the test extra (pip install '.[test]')")
    towncrier = shutil.which("towncrier") or str(Path(sys.executable).parent / "towncrier")
    result = subprocess.run(
        [towncrier, "build", "--draft", "--version", "99.0.0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "## esf 99.0.0" in result.stdout
    for path in FRAGMENTS.glob("+*.md"):
        if not path.name.endswith(".misc.md"):
            assert path.read_text(encoding="utf-8").strip() in result.stdout
