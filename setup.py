"""
The project is described in setup.cfg; this file adds what a declarative
file cannot say: the compiled decoder loop, and a build that starts from an
empty build directory.

The compiled loop (C{esf/wire/_speedups.pyx}, Cython) is built on CPython
only, and is optional: without a C compiler, or with C{ESF_PURE_PYTHON=1}
in the environment, the install goes on without it and esf runs its
pure-Python loop (L{esf.wire.COMPILED} says which).

pip builds a wheel from a working tree in that tree's C{build/}, and
setuptools copies the packages there on top of what an earlier build left:
a module deleted from the tree since then would still be installed.
"""

import os
import platform
import shutil

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
    The extension modules to build: the decoder's loop on CPython, unless
    ESF_PURE_PYTHON is set.
    """
    if platform.python_implementation() != "CPython" or os.environ.get("ESF_PURE_PYTHON"):
        return []
    from Cython.Build import cythonize  # pyproject.toml's build requirement

    # optional: a failed compile (no compiler) skips the module, with
    # setuptools' warning, rather than failing the install.
    speedups = Extension("esf.wire._speedups", ["esf/wire/_speedups.pyx"], optional=True)
    return cythonize([speedups], language_level=3, quiet=True)


setup(cmdclass={"build_py": fresh_build_py}, ext_modules=compiled_modules())
