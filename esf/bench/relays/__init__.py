"""
The relays C{esf-bench} measures esf against, installed with it: two bare
Twisted relays that frame a byte stream, look the destination up and
forward the frame unchanged, and nothing else.

- L{esf.bench.relays.coalescing}, the baseline: one write per destination
  per read;
- L{esf.bench.relays.bare}: one write per frame.

Each is a script that imports Twisted only (not esf): C{esf-bench} runs it
by path, as C{python .../esf/bench/relays/coalescing.py --port N}.
"""
