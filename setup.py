"""
The project is described in setup.cfg; this file only makes every build
start from an empty build directory.

pip builds a wheel from a working tree in that tree's C{build/}, and
setuptools copies the packages there on top of what an earlier build left:
a module deleted from the tree since then would still be installed.
"""

import shutil

from setuptools import setup
from setuptools.command.build_py import build_py


class fresh_build_py(build_py):
    """
    L{build_py} that empties its output directory first.
    """

    def run(self):
        shutil.rmtree(self.build_lib, ignore_errors=True)
        super().run()


setup(cmdclass={"build_py": fresh_build_py})
