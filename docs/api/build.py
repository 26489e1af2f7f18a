"""
Build esf's API reference with pydoctor, from the docstrings, offline.

    python docs/api/build.py [OUTPUT [SOURCE]]

writes the HTML to OUTPUT (by default C{build/apidocs}, which git
ignores) from the package in SOURCE (by default this checkout's C{esf/})
and exits non-zero on any warning.  The reference covers the
public surface: C{esf}, C{esf.wire}, C{esf.testing}, C{esf.cluster},
C{esf.offline}, C{esf.operations} and C{esf.interfaces}; the names these
re-export from private modules are documented where users import them.
Links to Python's and Twisted's names go to their documentation through a
small inventory made here from the running interpreter, so that the build
needs no network.
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

from pydoctor import astbuilder, driver, model

REPO = Path(__file__).resolve().parent.parent.parent

#: The modules of the reference.
PUBLIC = (
    "esf",
    "esf.wire",
    "esf.testing",
    "esf.cluster",
    "esf.offline",
    "esf.operations",
    "esf.interfaces",
)

#: Modules and packages of esf that are neither in the reference nor hold
#: what it re-exports: commands, the plugin's options, static files.  They
#: are not read at all.
LEFT_OUT = {
    "bench",
    "blocking",
    "cli",
    "tap",
    "pytest_plugin",
    "examples",
    "dashboard",
    "web",
}

PYTHON_DOCS = "https://docs.python.org/3/"
TWISTED_DOCS = "https://docs.twisted.org/en/stable/api/"

#: Twisted and zope.interface modules whose names esf's docstrings link to.
LINKED_MODULES = (
    "twisted.internet.defer",
    "twisted.internet.task",
    "twisted.internet.interfaces",
    "twisted.internet.protocol",
    "twisted.internet.address",
    "twisted.internet.error",
    "twisted.internet.endpoints",
    "twisted.python.failure",
    "twisted.logger",
    "twisted.application.service",
    "twisted.trial.unittest",
    "twisted.cred.credentials",
    "twisted.cred.checkers",
    "twisted.web.resource",
    "twisted.web.server",
)


class _ModuleVisitor(astbuilder.ModuleVistor):
    """
    Documents a name re-exported from a private module (one whose name
    starts with C{_}) where it is re-exported, even when the private module
    lists it in its own C{__all__}: esf's private modules do, and pydoctor
    would otherwise leave the name in the hidden module.
    """

    def _handleReExport(self, curr_mod_exports, origin_name, as_name, origin_module):
        if as_name in curr_mod_exports and origin_module.name.startswith("_"):
            saved = origin_module.all
            origin_module.all = None
            try:
                return super()._handleReExport(
                    curr_mod_exports, origin_name, as_name, origin_module
                )
            finally:
                origin_module.all = saved
        return super()._handleReExport(curr_mod_exports, origin_name, as_name, origin_module)


class _Builder(astbuilder.ASTBuilder):
    ModuleVistor = _ModuleVisitor


class System(model.System):
    """
    pydoctor's system with esf's re-exports and privacy.
    """

    defaultBuilder = _Builder

    def addPackage(self, package_path, parent=None, is_namespace_package=False):
        if parent is None or package_path.name not in LEFT_OUT:
            super().addPackage(package_path, parent, is_namespace_package)

    def addModule(self, path, parent):
        if path.stem not in LEFT_OUT:
            super().addModule(path, parent)

    def privacyClass(self, ob: model.Documentable) -> model.PrivacyClass:
        module = ob if isinstance(ob, model.Module) else ob.module
        if module.fullName() not in PUBLIC and module.fullName() != "esf":
            return model.PrivacyClass.HIDDEN
        return super().privacyClass(ob)


def _inventory(path: Path) -> None:
    """
    Write a Sphinx inventory (version 2) of Python's builtins and the names
    of L{LINKED_MODULES} with their documentation's addresses.
    """
    lines = []
    for name in dir(builtins):
        if name.startswith("_"):
            continue
        value = getattr(builtins, name)
        if inspect.isclass(value) and issubclass(value, BaseException):
            lines.append(f"{name} py:exception 1 library/exceptions.html#$ -")
        elif inspect.isclass(value):
            lines.append(f"{name} py:class 1 library/stdtypes.html#$ -")
        else:
            lines.append(f"{name} py:function 1 library/functions.html#$ -")
    for name in ("None", "True", "False"):
        lines.append(f"{name} py:data 1 library/constants.html#$ -")
    python = "".join(line + "\n" for line in lines)
    twisted = []
    for module_name in LINKED_MODULES:
        module = importlib.import_module(module_name)
        twisted.append(f"{module_name} py:module 1 {module_name}.html -")
        names = getattr(module, "__all__", None)
        if names is None:
            names = [
                name
                for name, value in vars(module).items()
                if getattr(value, "__module__", None) == module_name
            ]
        for name in names:
            if name.startswith("_"):
                continue
            with warnings.catch_warnings():  # names Twisted deprecates
                warnings.simplefilter("ignore")
                value = getattr(module, name)
            kind = "py:class" if inspect.isclass(value) else "py:function"
            twisted.append(f"{module_name}.{name} {kind} 1 {module_name}.{name}.html -")
    _write_inventory(path / "python.inv", "Python", python)
    _write_inventory(path / "twisted.inv", "Twisted", "".join(t + "\n" for t in twisted))


def _write_inventory(path: Path, project: str, body: str) -> None:
    head = f"# Sphinx inventory version 2\n# Project: {project}\n# Version: 0\n"
    head += "# The remainder of this file is compressed using zlib.\n"
    path.write_bytes(head.encode() + zlib.compress(body.encode()))


def build(output: Path, source: Path = REPO / "esf") -> int:
    """
    Build the reference of the package in C{source} into C{output}; the
    exit status of pydoctor, which is not 0 if anything was warned about.
    """
    with tempfile.TemporaryDirectory() as inventories:
        where = Path(inventories)
        _inventory(where)
        return driver.main(
            [
                "--project-name=esf",
                f"--project-version={importlib.import_module('esf').__version__}",
                "--docformat=epytext",
                f"--system-class={__name__}.System",
                f"--html-output={output}",
                f"--intersphinx-file={where / 'python.inv'}::{PYTHON_DOCS}",
                f"--intersphinx-file={where / 'twisted.inv'}::{TWISTED_DOCS}",
                "--warnings-as-errors",
                "-q",
                str(source),
            ]
        )


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.modules.setdefault(__name__, sys.modules["__main__"])
    arguments = [Path(argument) for argument in sys.argv[1:3]]
    sys.exit(build(*(arguments or [REPO / "build" / "apidocs"])))
