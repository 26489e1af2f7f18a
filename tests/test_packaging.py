"""
The built wheel carries the C{twistd esf} plugin the way Twisted expects it.

C{twisted/} and C{twisted/plugins/} must reach the wheel without an
C{__init__.py}: one would shadow Twisted's own C{twisted.plugins} package.
"""

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "twisted" / "plugins" / "esf_plugin.py"

# Whatever a build leaves in a working tree stays out of the copy that is built.
_IGNORED = shutil.ignore_patterns(
    ".git",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.so",
    "_speedups.c",
    "*.pyc",
    ".hypothesis",
    ".pytest_cache",
    "_trial_temp",
    "dropin.cache",
    ".venv",
    ".mypy_cache",
    "node_modules",
)


def _clean_env():
    """
    The environment for a subprocess, without anything that would put this
    checkout on its C{sys.path}.
    """
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    return env


def _can_build_without_isolation():
    """
    Whether the running environment already has what C{pyproject.toml} asks
    for to build, so that the build needs no package registry.
    """
    try:
        from packaging.version import Version

        return (
            Version(metadata.version("setuptools")) >= Version("68")
            and bool(metadata.version("wheel"))
            and Version(metadata.version("Cython")) >= Version("3.0")
        )
    except (ImportError, metadata.PackageNotFoundError):
        return False


def _build_wheel(source: Path, outdir: Path, **env: str) -> Path:
    """
    Build a wheel of C{source} in place (in its own C{build/}, as
    C{pip install .} does) into C{outdir}, with C{env} added to the
    environment.
    """
    pytest.importorskip("build", reason="the build package is not installed")
    command = [sys.executable, "-m", "build", "--wheel", "--outdir", str(outdir)]
    if _can_build_without_isolation():
        command.append("--no-isolation")
    command.append(str(source))
    result = subprocess.run(
        command,
        cwd=source.parent,
        env=dict(_clean_env(), **env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = outdir.glob("esf-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """
    Build a wheel from a clean copy of this checkout.
    """
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    shutil.copytree(REPO, source, ignore=_IGNORED)
    return _build_wheel(source, tmp / "dist")


def test_wheel_contents(wheel):
    """
    The wheel holds the plugin module, and no C{__init__.py} for C{twisted}
    or C{twisted.plugins}; and the cluster's Lua scripts (package data).
    """
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/esf_plugin.py" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert "esf/__init__.py" in names
    assert "esf/tap/__init__.py" in names
    assert {"esf/py.typed", "esf/testing/__init__.py", "esf/pytest_plugin.py"} <= names
    scripts = {p.name for p in (REPO / "esf" / "cluster" / "lua").glob("*.lua")}
    assert scripts and {f"esf/cluster/lua/{name}" for name in scripts} <= names
    assert {"esf/bench/relays/bare.py", "esf/bench/relays/coalescing.py"} <= names


def test_wheel_version_is_esf_version(wheel):
    """
    The version has one source, C{esf.__version__}.
    """
    import esf

    assert wheel.name.startswith(f"esf-{esf.__version__}-")
    metadata_text = zipfile.ZipFile(wheel).read(f"esf-{esf.__version__}.dist-info/METADATA")
    assert f"Version: {esf.__version__}\n" in metadata_text.decode("utf-8")


def test_no_stale_build_directory(tmp_path):
    """
    A module deleted from the tree since the last build in it does not
    reach the next wheel: each build starts from an empty build/lib.
    """
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=_IGNORED)
    stale = source / "esf" / "_deleted_since.py"
    stale.write_text("GONE = True\n")
    first = _build_wheel(source, tmp_path / "first")
    assert "esf/_deleted_since.py" in zipfile.ZipFile(first).namelist()
    assert list((source / "build").glob("lib*/esf/_deleted_since.py"))
    stale.unlink()
    second = _build_wheel(source, tmp_path / "second")
    assert "esf/_deleted_since.py" not in zipfile.ZipFile(second).namelist()
    assert "esf/__init__.py" in zipfile.ZipFile(second).namelist()


def test_readme_quick_start_runs_in_a_virtual_environment():
    """
    Both quick-start commands make and use a virtual environment (distros
    refuse a system-wide pip), each on one line, and .ci/run runs the
    README's own test command.
    """
    readme = (REPO / "README.md").read_text()
    venv = "python3 -m venv .venv && . .venv/bin/activate && "
    server = f"{venv}pip install . && twistd -n esf --port 4530"
    tests = f"{venv}pip install -e '.[test]' && python -m pytest -n 2"
    lines = readme.splitlines()
    assert server in lines and tests in lines
    ci = (REPO / ".ci" / "run").read_text()
    pattern = re.search(r'grep -m1 -E "([^"]+)" README.md', ci).group(1)
    matching = [line for line in lines if re.search(pattern, line)]
    assert matching[0] == tests


def _install_in_venv(wheel: Path, tmp_path: Path) -> tuple[Path, Path]:
    """
    Install C{wheel} into a fresh virtual environment under C{tmp_path};
    return its python and its site-packages.

    The environment borrows Twisted and esf's other dependencies from the
    running one through a C{.pth} file, so nothing is downloaded.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"

    # Install before borrowing anything: pip then sees only this environment,
    # even where the running environment has esf installed too.
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--disable-pip-version-check",
            str(wheel),
        ],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    site_packages = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
    )

    borrowed = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site_packages / "_borrowed_for_esf_test.pth").write_text(
        "".join(f"{path}\n" for path in sorted(borrowed))
    )

    return python, site_packages


def test_the_wheel_runs_the_compiled_decoder_loop(wheel, tmp_path):
    """
    On CPython the wheel holds the decoder's compiled loop, and esf
    installed from it runs it (L{esf.wire.COMPILED}); with
    C{ESF_PURE_PYTHON=1} the same install runs the pure-Python loop.
    """
    if platform.python_implementation() != "CPython":
        pytest.skip("the compiled loop is built on CPython only")
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if n.startswith("esf/wire/_speedups.") and n.endswith(".so")]
    assert "esf/wire/_speedups.pyx" not in names
    python, _ = _install_in_venv(wheel, tmp_path)
    for pure, expected in (("", "True"), ("1", "False")):
        env = dict(_clean_env(), ESF_PURE_PYTHON=pure)
        compiled = subprocess.run(
            [str(python), "-c", "import esf.wire; print(esf.wire.COMPILED)"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert compiled.stdout.strip() == expected, compiled.stderr


def test_the_sdist_holds_the_cython_source_and_builds_the_compiled_loops(tmp_path):
    """
    C{python -m build} makes the sdist, then the wheel from it: the sdist
    carries C{_speedups.pyx} (which setup.py compiles), not the C file a
    build generates, and the wheel built from it holds the compiled module.
    """
    if platform.python_implementation() != "CPython":
        pytest.skip("the compiled loops are built on CPython only")
    pytest.importorskip("build", reason="the build package is not installed")
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=_IGNORED)
    outdir = tmp_path / "dist"
    command = [sys.executable, "-m", "build", "--outdir", str(outdir)]
    if _can_build_without_isolation():
        command.append("--no-isolation")
    result = subprocess.run(
        [*command, str(source)], cwd=tmp_path, env=_clean_env(), capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (sdist,) = outdir.glob("esf-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert "esf/wire/_speedups.pyx" in names and "MANIFEST.in" in names
    assert "esf/wire/_speedups.c" not in names
    (wheel,) = outdir.glob("esf-*.whl")
    assert [n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("esf/wire/_speedups.")
            and n.endswith(".so")]  # fmt: skip


def test_without_a_compiler_esf_installs_with_its_python_code(tmp_path):
    """
    Where no C compiler works, the build goes on without the compiled
    loops (setuptools' warning), and esf installed from that wheel runs its
    pure-Python code.
    """
    if platform.python_implementation() != "CPython":
        pytest.skip("the compiled loops are built on CPython only")
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=_IGNORED)
    wheel = _build_wheel(source, tmp_path / "dist", CC="false", LDSHARED="false")
    assert not [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".so")]
    python, _ = _install_in_venv(wheel, tmp_path)
    run = subprocess.run(
        [str(python), "-c",
         "import esf.wire as w; from esf.server._websocket_frames import binary_messages; "
         "frame = w.encode_frame(w.WireConfig(), 202, b'hi', user_id='a', dest_user_id='b'); "
         "print(w.COMPILED, len(w.FrameDecoder().feed(frame)), len(binary_messages(frame, 36)))"],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    # (A frame of 36 + 2 bytes; as a WebSocket message, 2 bytes more.)
    assert run.stdout.split() == ["False", "1", "40"], run.stdout + run.stderr


def test_twistd_lists_installed_plugin(wheel, tmp_path):
    """
    Installed from the wheel into a fresh virtual environment, esf shows up in
    C{twistd --help}, found in that environment's own C{twisted/plugins}.

    The environment borrows Twisted and esf's other dependencies from the
    running one through a C{.pth} file, so nothing is downloaded.
    """
    python, site_packages = _install_in_venv(wheel, tmp_path)
    installed_plugin = site_packages / "twisted" / "plugins" / "esf_plugin.py"
    assert installed_plugin.is_file()
    assert not (site_packages / "twisted" / "__init__.py").exists()
    assert not (site_packages / "twisted" / "plugins" / "__init__.py").exists()

    # Run from tmp_path, not the checkout, so the checkout's own
    # twisted/plugins is not on sys.path.
    help_text = subprocess.run(
        [str(python), "-c", "from twisted.scripts.twistd import run; run()", "--help"],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert help_text.returncode == 0, help_text.stdout + help_text.stderr
    commands = [
        line.split()[0]
        for line in help_text.stdout.splitlines()
        if line[:1].isspace() and line.strip()
    ]
    assert "esf" in commands, help_text.stdout

    where = subprocess.run(
        [
            str(python),
            "-c",
            textwrap.dedent(
                """
                import os, twisted.plugins
                for path in twisted.plugins.__path__:
                    if os.path.isfile(os.path.join(path, "esf_plugin.py")):
                        print(os.path.realpath(path))
                """
            ),
        ],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.returncode == 0, where.stderr
    assert str(installed_plugin.parent.resolve()) in where.stdout.splitlines()


def test_installed_esf_bench_measures_its_baselines(wheel, tmp_path):
    """
    C{esf-bench} installed from the wheel finds the two relays it compares
    with in its own install, not in a checkout, and measures them: a small
    send run (2 pairs, 2000 messages each way, over TCP) reports esf, the
    coalescing baseline and the write-per-frame relay, with no warning
    that a relay is missing.
    """
    python, site_packages = _install_in_venv(wheel, tmp_path)
    where = subprocess.run(
        [str(python), "-c",
         "from esf.bench._servers import find_relay; "
         "print(find_relay('coalescing', None)); print(find_relay('bare', None))"],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr
    relays = site_packages / "esf" / "bench" / "relays"
    assert where.stdout.split() == [str(relays / "coalescing.py"), str(relays / "bare.py")]

    run = subprocess.run(
        [str(python.parent / "esf-bench"), "--quick", "--mode", "send", "--no-websocket",
         "--load-procs", "1", "--no-progress", "--json", "-"],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "is not here" not in run.stderr
    report = json.loads(run.stdout)
    assert report["options"]["bare"] is True and report["options"]["baseline"] == "coalescing"
    (row,) = report["results"]
    for kind in ("esf", "coalescing", "bare"):
        assert "error" not in row[kind], (kind, row[kind])
        assert row[kind]["received"] == row[kind]["messages"] == 2000, kind


def test_plugin_imports_no_reactor():
    """
    Twisted imports every plugin module whenever it scans for plugins, so the
    esf plugin installs no reactor and leaves C{esf.tap} unimported.
    """
    script = textwrap.dedent(
        f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location(
            "twisted.plugins.esf_plugin", {str(PLUGIN)!r}
        )
        plugin = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(plugin)
        assert "twisted.internet.reactor" not in sys.modules, "reactor imported"
        assert "esf.tap" not in sys.modules, "esf.tap imported"
        print(plugin.esf.tapname)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "esf"
