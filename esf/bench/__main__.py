"""
C{python -m esf.bench}: the same as C{esf-bench}.
"""

import sys

from esf.bench import main

sys.exit(main())
