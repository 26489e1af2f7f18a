"""
What esf uses from Python 3.11, for the older Pythons that run a server from
a checkout for the benchmarks (Debian's PyPy implements Python 3.9).

esf supports Python 3.11 and later (C{python_requires}); this module only
keeps the server importable on PyPy 3.9 so that C{esf-bench --server-python}
can measure it there, which C{tests/test_bench.py} checks.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Callable, TypeVar

__all__ = ["StrEnum", "dataclass_transform"]

if TYPE_CHECKING or sys.version_info >= (3, 11):
    from enum import StrEnum
    from typing import dataclass_transform
else:  # pragma: no cover - Python 3.9 and 3.10 (PyPy)
    from enum import Enum

    _T = TypeVar("_T")

    class StrEnum(str, Enum):
        """
        L{enum.StrEnum} of Python 3.11: members are strings, and C{str()}
        of one is its value.
        """

        def __str__(self) -> str:
            return str(self.value)

        @staticmethod
        def _generate_next_value_(
            name: str, start: int, count: int, last_values: list[Any]
        ) -> str:
            return name.lower()

    def dataclass_transform(**kwargs: Any) -> Callable[[_T], _T]:
        """
        Only type checkers read L{typing.dataclass_transform}.
        """
        return lambda decorated: decorated
