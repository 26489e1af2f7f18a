"""
C{esf-bench}: load and measure an esf server, next to two bare Twisted
relays.

What it measures, each on a freshly started server (when the server is
local) and then, for comparison, in the same run, on the baseline, the
coalescing relay of C{esf/bench/relays/coalescing.py} (it writes once per
destination per read), and on the write-per-frame relay of
C{esf/bench/relays/bare.py} (one write per frame), reported as a second
line under each figure (C{--no-bare} measures esf only).  Both relays are
installed with esf (L{esf.bench.relays}):

- B{send}: N sender/receiver pairs log on; each sender relays its share of
  M one-way Send (202) messages to its receiver through the server.  The
  senders keep a bounded window of messages in flight (they know how many
  their receiver has counted: both ends of a pair live in the same load
  worker).  Reported: messages per second, the server's CPU (and CPU time
  per message) and RSS.  The same relay over WebSocket (C{twistd esf
  --websocket}, one frame per binary message) is measured too, and
  reported as a ratio to TCP (C{--no-websocket} skips it).
- B{fanout} (C{--pattern fanout}, instead of the modes): C{--groups} groups
  of C{--group-size} members each; the first member of each group
  broadcasts (601, one-way) to its group, and each of the others counts
  the copies it gets.  Reported: deliveries per second and the server's
  CPU per delivery.  The esf server is given the group manager
  L{esf.bench._groups} (groups told by their names) and a work budget no
  sender spends; the relays learn each connection's group from its name
  frame and write a broadcast to every other member, the coalescing relay
  gathering each member's copies of a read into one write.
- B{request}: N pairs; each sender keeps one Request (203) outstanding, its
  receiver answers each with a Response (204); the round trip is timed at
  the sender.  Reported: p50/p90/p99/max and requests per second.
- B{logons}: K connections log on (at most C{--logon-window} at once);
  reported: logons per second from the first connect to the last Succeed.
- B{idle}: K sessions log on and stay, each sending a HeartBeat every
  C{--heartbeat} seconds, for C{--hold} seconds; reported: the server's RSS
  growth per session.

- B{cluster} (C{--mode cluster}, not part of C{all}; needs C{redis-server},
  which this run starts on a free port): esf nodes joined by C{--cluster}.
  Send and request between users on two different nodes, as a ratio to
  the same users on one node; and the aggregate send throughput of two
  nodes (each pair on one node) against one node carrying every pair.

The load is raw frames (precomputed bytes, counted at the receiver by
size; C{--check} decodes and validates every frame instead), written by
C{--load-procs} load worker processes (default: one per core but the
server's, at most 4), each with its own reactor and its share of the pairs,
logons or idle sessions; the process that runs C{esf-bench} only
coordinates them and reads the server's and the workers' CPU from
C{/proc}.  The server runs as its own process (C{python -m twisted esf
...}, or the relay script).  Each esf figure is also given as a ratio to
the baseline's, because the ratio is what survives a noisy machine; a
warning says when the load, not the server, was the bottleneck.

    esf-bench                        # every mode, 1 pair, defaults
    esf-bench --mode send --pairs 1,50 --messages 200000
    esf-bench --quick --json out.json
    esf-bench --server 127.0.0.1:4530 --mode request --no-bare
    esf-bench --mode cluster --pairs 4
    esf-bench --pattern fanout --group-size 10,1000 --messages 5000000

Performance never changes the exit status: it is 0 when every phase ran,
1 when one failed (refused logons, lost connections, a desynchronised
stream) and 2 for bad options.  A load worker that exits or stops
answering, or a phase still running after C{--phase-timeout} seconds
(default: C{--duration} + 30), ends the whole run at once, with status 1.

The parts: L{_options} (the command line), L{_procs} (the machine, the
processes and C{/proc}), L{_servers} (the servers it starts and the
relays), L{_coordinator} (the load worker processes, the sync points),
L{_worker}, L{_load}, L{_modes} and L{_patterns} (a load worker: its
connections, each measured mode, who sends to whom), L{_groups} (the
fan-out's group manager, which the esf server loads), L{_wire} (what the
load puts on the wire), L{_figures} (merging and judging what was
measured), L{_cluster}, L{_run} (a whole run) and L{_report} (the tables).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._procs import free_port, start_esf_server
    from ._run import main

__all__ = ["free_port", "main", "start_esf_server"]

#: Where each public name lives: imported on first use, so that importing
#: one part (a server on PyPy imports only L{_groups}, the group manager of
#: a fan-out run) does not import the whole harness.
_LAZY = {"free_port": "_procs", "start_esf_server": "_procs", "main": "_run"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"{__name__}.{module}"), name)
