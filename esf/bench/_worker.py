"""
A load worker process (C{python -m esf.bench --load-worker}): its end of
the conversation with the coordinator.
"""

from __future__ import annotations

import argparse
import json

from twisted.internet import defer

from ._modes import Bench
from ._progress import _WorkerProgress
from ._servers import ServerAddress
from ._wire import BenchError


def worker_main() -> int:
    """
    A load worker (C{python -m esf.bench --load-worker}): runs the phases
    its coordinator sends as JSON lines on stdin, one at a time, and answers
    on stdout (C{{"at": point}}, C{{"progress": [stage, done, total, unit,
    t0]}}, C{{"result": ...}} or C{{"error": text}}).
    """
    from twisted.internet import reactor, stdio
    from twisted.protocols.basic import LineReceiver

    class Control(LineReceiver):
        delimiter = b"\n"
        MAX_LENGTH = 2**24

        bench = None
        waiting = None

        def send(self, message: dict) -> None:
            self.sendLine(json.dumps(message).encode())

        def sync(self, point: str) -> defer.Deferred:
            self.waiting = defer.Deferred()
            self.send({"at": point})
            return self.waiting

        def lineReceived(self, line: bytes) -> None:
            message = json.loads(line)
            if "init" in message:
                opts = argparse.Namespace(**message["init"])
                progress = _WorkerProgress(reactor, self.send, opts.progress)
                self.bench = Bench(reactor, opts, progress, self.sync, message["tag"])
            elif "go" in message:
                waiting, self.waiting = self.waiting, None
                waiting.callback(None)
            elif "run" in message:
                d = defer.Deferred.fromCoroutine(self.run(message))
                d.addErrback(lambda f: self.send({"error": f.getTraceback()}))

        async def run(self, message: dict) -> None:
            try:
                method = getattr(self.bench, message["run"])
                server = ServerAddress.from_json(message["server"])
                result = await method(server, message["kind"], message["part"])
            except BenchError as e:
                self.send({"error": str(e)})
            else:
                self.send({"result": result})

        def connectionLost(self, reason) -> None:
            if reactor.running:
                reactor.stop()

    stdio.StandardIO(Control())
    reactor.run()
    return 0
