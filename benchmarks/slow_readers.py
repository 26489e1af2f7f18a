"""
Rounds of many slow readers at once against a real ``twistd esf``: the
server's RSS before, at the peak and after each round, to see whether memory
comes back once they are gone (docs/reliability.md, "RSS after slow readers
leave").

    python benchmarks/slow_readers.py --readers 100 --rounds 10

Each round: N readers log on with a 4 KiB receive buffer and never read; N
senders each write up to 8 MiB of 60 KB Sends to their reader (as fast as the
server takes them: a sender whose reader is backed up is held back for the
push back, 50 ms; then what its reader has no room for is refused, and a
sender that keeps on is read at --max-output-buffer bytes a second); the
server ends each reader after the drain timeout; everyone leaves.
"""

from __future__ import annotations

import argparse
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# rawclient from the tests, and esf from this checkout: the one the server
# this script starts runs.
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import rawclient as rc  # noqa: E402

from esf.bench import free_port, start_esf_server  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def start_server(port: int, drain: int, extra: list[str]) -> subprocess.Popen:
    return start_esf_server(
        port,
        ["--output-drain-timeout", str(drain), "--logon-rate-limit", "100000", *extra],
        "/dev/null",
    )


def reader(port: int, name: str) -> rc.Client:
    client = rc.Client(socket.socket())
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.sock.settimeout(30)
    client.sock.connect(("127.0.0.1", port))
    assert client.logon(name, "pw")["result"] == 0
    return client


def flood(port: int, name: str, dest: str, limit: int, until: float) -> None:
    sender = rc.connect(port)
    assert sender.logon(name, "pw")["result"] == 0
    body = struct.pack("<i", 1) + bytes(60_000)
    frame = rc.pack_header(202, len(body), name, dest) + body
    sender.sock.settimeout(0.5)
    sent = 0
    while sent < limit and time.monotonic() < until:
        try:
            sender.sock.sendall(frame)
            sent += len(frame)
        except (socket.timeout, OSError):
            break
    sender.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--readers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--drain", type=int, default=2, help="--output-drain-timeout")
    parser.add_argument(
        "--malloc-trim",
        default=None,
        help="the server's --malloc-trim (0: never give freed memory back)",
    )
    opts = parser.parse_args()
    port = free_port()
    extra = [] if opts.malloc_trim is None else ["--malloc-trim", opts.malloc_trim]
    server = start_server(port, opts.drain, extra)
    try:
        start = rss_kib(server.pid)
        print(f"start: {start / 1024:.1f} MiB")
        for n in range(opts.rounds):
            readers = [reader(port, f"r{i}") for i in range(opts.readers)]
            until = time.monotonic() + opts.drain + 8
            threads = [
                threading.Thread(target=flood, args=(port, f"s{i}", f"r{i}", 8 << 20, until))
                for i in range(opts.readers)
            ]
            peak = 0
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                peak = max(peak, rss_kib(server.pid))
                time.sleep(0.05)
            for client in readers:
                client.close()
            time.sleep(7.0)  # past the close timeout (5 s) of connections being closed
            after = rss_kib(server.pid)
            print(f"round {n + 1}: peak {peak / 1024:.1f} MiB, after {after / 1024:.1f} MiB")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
