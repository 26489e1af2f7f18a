"""
The project is described in setup.cfg; this file adds what a declarative
file cannot say: the compiled loops, and a build that starts from an empty
build directory.

The compiled loops (C{esf/wire/_speedups.pyx}, Cython) are built on CPython
only, and are optional: without a C compiler or Cython, or with
C{ESF_PURE_PYTHON=1} in the environment, the install goes on without them
and esf runs its pure-Python code alone (L{esf.wire.COMPILED} says which).

pip builds a wheel from a working tree in that tree's C{build/}, and
setuptools copies the packages there on top of what an earlier build left:
a module deleted from the tree since then would still be installed.
"""

import os
import platform
import shutil
import warnings

from setuptools import Extension, setup
from setuptools.command.build_py import build_py


class fresh_build_py(build_py):
    """
    L{build_py} that empties its output directory first.
    """

    def run(self):
        shutil.rmtree(self.build_lib, ignore_errors=True)
        super().run()


def compiled_modules():
    """
    The extension modules to build: the compiled loops on CPython, unless
    ESF_PURE_PYTHON is set.
    """
    if platform.python_implementation() != "CPython" or os.environ.get("ESF_PURE_PYTHON"):
        return []
    try:
        from Cython.Build import cythonize  # pyproject.toml's build requirement
    except ImportError:  # a build without isolation, where Cython is not installed
        warnings.warn(
            "Cython is not installed: esf is built without its compiled loops", stacklevel=1
        )
        return []

    modules = cythonize(
        [Extension("esf.wire._speedups", ["esf/wire/_speedups.pyx"])], language_level=3, quiet=True
    )
    for module in modules:
        # A failed compile (no compiler) skips the module, with setuptools'
        # warning, rather than failing the install.  (Set here: cythonize
        # does not carry it over from the Extension it is given.)
        module.optional = True
    return modules


setup(cmdclass={"build_py": fresh_build_py}, ext_modules=compiled_modules())
