"""
The JavaScript client's own tests (C{tests/js/*.test.mjs}), run with node's
test runner: its codec against the Python codec's golden vectors, its
client logic on a fake WebSocket and clock, its exports against its
declarations and the docs.  Then the client under node against a real
C{twistd esf --offline} (C{tests/js/offline.server.mjs}), and the npm
package: installed from the checkout, imported by name, its TypeScript
declarations checked by C{tsc} over C{tests/js/example.ts}.  They need
C{node} (and C{npm}); without them they skip, loudly, except under CI,
where they fail (L{_real_parts.missing}).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
JS = HERE / "js"
sys.path.insert(0, str(JS))

import export_vectors
from _real_parts import missing, need_program
from test_e2e import ServerProcess

# The wheel built from a clean copy of the checkout (tests/test_packaging.py).
from test_packaging import wheel  # noqa: F401


def test_vectors_json_is_the_python_codecs():
    """
    C{tests/js/vectors.json} is what the Python codec exports now; after
    changing a golden vector, run C{python tests/js/export_vectors.py}.
    """
    assert export_vectors.VECTORS_JSON.read_text(encoding="utf-8") == export_vectors.dumps()


def test_javascript_client_with_node():
    node = need_program("node", "the JavaScript client's tests cannot run ('.ci/run' installs it)")
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert int(version.strip().lstrip("v").split(".")[0]) >= 18, version
    result = subprocess.run(
        [node, "--test", "--test-reporter=tap", *sorted(str(p) for p in JS.glob("*.test.mjs"))],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=HERE.parent,
    )
    summary = [line for line in result.stdout.splitlines() if line.startswith("# ")]
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    counts = dict(
        line[2:].split(" ", 1) for line in summary if line[2:].split(" ")[0] in ("pass", "fail")
    )
    assert int(counts["fail"]) == 0
    assert int(counts["pass"]) >= 120, summary


def test_the_wheel_carries_the_web_files(wheel):
    """
    The JavaScript client and the chat page are package data: in the wheel,
    where C{--web-demo} finds them; with the npm package's C{package.json}
    and declarations, so that C{npm install} takes the installed folder.
    """
    import zipfile

    from esf.server._web_demo import WEB_FILES

    names = set(zipfile.ZipFile(wheel).namelist())
    for name, _ in WEB_FILES.values():
        assert f"esf/web/{name}" in names, name
    assert {n for n in names if n.startswith("esf/web/")} == {
        f"esf/web/{name}" for name, _ in WEB_FILES.values()
    } | {"esf/web/package.json", "esf/web/esf.d.ts"}


def _node_with_websocket(node: str) -> list[str]:
    """
    The command that runs C{node} with a global C{WebSocket}: node 22 has
    one, node 20.10 and later with C{--experimental-websocket}.
    """
    probe = "process.exit(typeof WebSocket === 'function' ? 0 : 1)"
    for flags in ([], ["--experimental-websocket"]):
        if subprocess.run([node, *flags, "-e", probe], capture_output=True).returncode == 0:
            return [node, *flags]
    missing(f"{node} has no WebSocket (node 22, or 20.10 and later, has one)")


@pytest.mark.e2e
def test_javascript_client_with_the_offline_store(tmp_path):
    """
    C{tests/js/offline.server.mjs}: esf.js under node against a real
    C{twistd esf --websocket ... --offline sqlite:...}.
    """
    node = need_program("node", "the JavaScript client's tests cannot run ('.ci/run' installs it)")
    command = _node_with_websocket(node)
    server = ServerProcess(
        tmp_path / "server.log",
        [
            "--websocket",
            "tcp:0:interface=127.0.0.1",
            "--offline",
            f"sqlite:{tmp_path / 'offline.db'}",
        ],
    )
    try:
        server.wait_listening()
        server.wait_for_log(r"WebSocketFactory starting on \d+")
        port = re.search(r"WebSocketFactory starting on (\d+)", server.log()).group(1)
        result = subprocess.run(
            [*command, "--test", "--test-reporter=tap", str(JS / "offline.server.mjs")],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=HERE.parent,
            env={**os.environ, "ESF_URL": f"ws://127.0.0.1:{port}/esf"},
        )
    finally:
        server.stop()
    assert result.returncode == 0, (
        result.stdout[-6000:] + result.stderr[-2000:] + server.log()[-4000:]
    )
    assert re.search(r"^# pass 1$", result.stdout, re.M), result.stdout
    assert "Traceback" not in server.log()


WEB = HERE.parent / "esf" / "web"


def test_the_npm_package_version_is_the_python_packages():
    """
    C{esf/web/package.json} makes esf.js an npm package; its version is
    esf's, so that both are released together.
    """
    import json

    import esf

    package = json.loads((WEB / "package.json").read_text(encoding="utf-8"))
    assert package["version"] == esf.__version__
    assert package["type"] == "module"
    assert package["exports"]["."] == {"types": "./esf.d.ts", "default": "./esf.js"}
    assert set(package["files"]) == {"esf.js", "esf.d.ts"}


def _npm_install(npm: str) -> None:
    """
    Install C{tests/js/package.json}'s devDependencies into
    C{tests/js/node_modules}: the esf package from the checkout (as a web
    developer installs it) and the TypeScript compiler.
    """
    result = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--no-package-lock"],
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        missing(
            f"npm install in tests/js failed (the npm registry is needed once):\n{result.stderr[-2000:]}"
        )


def test_the_package_installs_and_its_declarations_check():
    """
    The esf package, installed with npm from the checkout, imports by its
    name under node, and C{tests/js/example.ts} passes C{tsc --noEmit}
    against its declarations (esf.d.ts), including the lines it must
    refuse.
    """
    node = need_program("node", "the JavaScript client's tests cannot run ('.ci/run' installs it)")
    npm = need_program("npm", "the TypeScript check cannot run (Debian's npm, or node's own)")
    _npm_install(npm)
    assert (JS / "node_modules" / "esf" / "esf.js").resolve() == (WEB / "esf.js").resolve()
    imported = subprocess.run(
        [
            node,
            "--input-type=module",
            "-e",
            "import { EsfClient, SUBPROTOCOL } from 'esf'; "
            "console.log(typeof EsfClient, SUBPROTOCOL)",
        ],
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert imported.stdout.split() == ["function", "esf.v1"], imported.stderr
    tsc = JS / "node_modules" / "typescript" / "bin" / "tsc"
    checked = subprocess.run(
        [node, str(tsc), "--noEmit", "-p", str(JS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stdout[-4000:] + checked.stderr[-2000:]
