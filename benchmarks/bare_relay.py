#!/usr/bin/env python3
"""
The write-per-frame relay, esf-bench's second yardstick, under its former
name: it now lives in esf/bench/relays/bare.py (installed with esf), which
this file runs; its names (C{main}, C{RelayFactory}, ...) are this module's
too.

    python benchmarks/bare_relay.py --port 4600 [--interface 127.0.0.1]
"""

import sys
from pathlib import Path

# The relay's directory, as when esf-bench runs it by path: it imports
# Twisted only, not esf.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "esf" / "bench" / "relays"))

from bare import *  # noqa: F403
from bare import main

if __name__ == "__main__":
    sys.exit(main())
