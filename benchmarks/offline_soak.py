"""
Offline messages under load, against a real ``twistd esf --offline
sqlite:PATH``: M messages to U users who are offline, a server restart,
then every user logs on and must receive each of its messages once and in
order (docs/performance.md, "Offline messages").

    python benchmarks/offline_soak.py                     # 100,000 to 1,000 users
    python benchmarks/offline_soak.py --users 20 --per-user 10   # a smoke run
    python benchmarks/offline_soak.py --kill              # kill -9 instead of a clean stop

Senders send SendCertainly (205) frames, many in flight on each connection;
the server's Ack (from ``_0``) says a message is durable, so the store rate
is messages / (first send .. last Ack).  After the restart, receivers log on
(--receivers at a time), read their stored messages, acknowledge them
cumulatively and leave; the drain rate is messages / (first logon .. last
user done).  At the end the database must be empty.
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# rawclient from the tests, and esf from this checkout: the one the server
# this script starts runs.
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import rawclient as rc  # noqa: E402

from esf.bench import free_port, start_esf_server  # noqa: E402

SEND_CERTAINLY, ACK = 205, 206


def start_server(port: int, db: Path, log: Path, per_sender: int) -> subprocess.Popen:
    # Each sender has all its messages waiting at once: the bound per sender
    # (1,000 by default) is raised to that.
    return start_esf_server(
        port,
        ["--offline", f"sqlite:{db}", "--logon-rate-limit", "1000000",
         "--offline-max-per-sender", str(max(per_sender, 1))],
        log,
    )  # fmt: skip


def stop_server(process: subprocess.Popen, kill: bool) -> None:
    process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    process.wait(60)


def user_name(n: int) -> str:
    return f"u{n}"


def send_all(port: int, sender: int, jobs: list[tuple[int, int]], timeout: float) -> None:
    """
    Send (user, sequence) as SendCertainly, all at once; wait for every Ack.
    """
    client = rc.connect(port, timeout=timeout)
    assert client.logon(f"s{sender}", "")["result"] == 0
    reader_done = threading.Event()
    acked = [0]

    def read() -> None:
        while acked[0] < len(jobs):
            header, _body = client.recv_until(ACK, timeout=timeout)
            assert header["user_id"] == rc.SERVER, header  # stored, not delivered
            acked[0] += 1
        reader_done.set()

    thread = threading.Thread(target=read)
    thread.start()
    out = []
    for i, (user, seq) in enumerate(jobs, 1):
        body = struct.pack("<iii", 1, sender, seq)
        out.append(
            rc.pack_header(SEND_CERTAINLY, len(body), client.user, user_name(user), i) + body
        )
        if len(out) >= 500:
            client.sock.sendall(b"".join(out))
            out = []
    if out:
        client.sock.sendall(b"".join(out))
    thread.join(timeout)
    assert reader_done.is_set(), f"sender {sender}: {acked[0]} of {len(jobs)} acknowledged"
    client.close()


def receive(port: int, user: int, expected: list[tuple[int, int]], timeout: float) -> None:
    """
    Log on as C{user}, read every stored message, check order and count,
    acknowledge, leave.
    """
    client = rc.connect(port, timeout=timeout)
    assert client.logon(user_name(user), "")["result"] == 0
    got: list[tuple[int, int]] = []
    last_id = 0
    while len(got) < len(expected):
        header, body = client.recv_until(SEND_CERTAINLY, timeout=timeout)
        assert header["dest_user_id"] == rc.SERVER, header
        assert header["message_id"] > last_id, (user, header)
        last_id = header["message_id"]
        _, sender, seq = struct.unpack("<iii", body)
        got.append((sender, seq))
        if not client.buf:  # nothing more read yet: acknowledge what we have
            client.send(ACK, struct.pack("<i", 1), dest=rc.SERVER, msg_id=last_id)
    client.send(ACK, struct.pack("<i", 1), dest=rc.SERVER, msg_id=last_id)
    # Per sender, in the order sent; each exactly once.
    assert sorted(got) == sorted(expected), f"{user_name(user)}: wrong messages"
    for sender in {s for s, _ in expected}:
        mine = [q for s, q in got if s == sender]
        assert mine == sorted(mine), f"{user_name(user)}: out of order from s{sender}"
    client.close()


def nothing_left(port: int, user: int, timeout: float) -> None:
    """
    C{user} logs on again: no stored message comes.
    """
    client = rc.connect(port, timeout=timeout)
    assert client.logon(user_name(user), "")["result"] == 0
    try:
        extra = client.recv_frame(timeout=0.3)
    except TimeoutError:
        extra = None
    assert extra is None or extra[0]["message_type"] != SEND_CERTAINLY, extra
    client.close()


def run(
    users: int = 1000,
    per_user: int = 100,
    senders: int = 10,
    receivers: int = 20,
    kill: bool = False,
    directory: Path | None = None,
    timeout: float = 120.0,
) -> dict[str, float]:
    """
    One soak run; returns its figures.  Raises AssertionError when a
    message is lost, duplicated or out of order.
    """
    with tempfile.TemporaryDirectory() as scratch:
        where = Path(directory or scratch)
        db = where / "offline.db"
        port = free_port()
        total = users * per_user
        # Sender s sends message k (k = 0..per_user-1) to each of its users.
        jobs: dict[int, list[tuple[int, int]]] = {s: [] for s in range(senders)}
        expected: dict[int, list[tuple[int, int]]] = {u: [] for u in range(users)}
        for k in range(per_user):
            for u in range(users):
                s = (u + k) % senders
                jobs[s].append((u, k))
                expected[u].append((s, k))

        per_sender = max(len(j) for j in jobs.values())
        server = start_server(port, db, where / "server1.log", per_sender)
        try:
            started = time.perf_counter()
            with ThreadPoolExecutor(senders) as pool:
                for f in [pool.submit(send_all, port, s, jobs[s], timeout) for s in jobs]:
                    f.result()
            store_seconds = time.perf_counter() - started
        finally:
            stop_server(server, kill)

        server = start_server(port, db, where / "server2.log", per_sender)
        try:
            started = time.perf_counter()
            with ThreadPoolExecutor(receivers) as pool:
                futures = [
                    pool.submit(receive, port, u, expected[u], timeout) for u in range(users)
                ]
                for f in futures:
                    f.result()
            drain_seconds = time.perf_counter() - started
            for u in range(0, users, max(users // 20, 1)):
                nothing_left(port, u, timeout)
        finally:
            stop_server(server, False)
        with sqlite3.connect(db) as check:
            left = check.execute("SELECT count(*) FROM messages").fetchone()[0]
        assert left == 0, f"{left} messages left in the store"
        return {
            "messages": total,
            "users": users,
            "store_seconds": store_seconds,
            "store_rate": total / store_seconds,
            "drain_seconds": drain_seconds,
            "drain_rate": total / drain_seconds,
            "restart": "kill -9" if kill else "SIGTERM",
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--per-user", type=int, default=100)
    parser.add_argument("--senders", type=int, default=10)
    parser.add_argument("--receivers", type=int, default=20, help="users logged on at a time")
    parser.add_argument(
        "--kill", action="store_true", help="kill -9 the server instead of SIGTERM"
    )
    parser.add_argument(
        "--directory", type=Path, help="where the database goes [a temporary directory]"
    )
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args()
    figures = run(
        opts.users, opts.per_user, opts.senders, opts.receivers, opts.kill, opts.directory
    )
    if opts.json:
        print(json.dumps(figures))
        return
    print(
        f"{figures['messages']:,} messages to {figures['users']:,} offline users, "
        f"restart by {figures['restart']}: every one delivered once, in order\n"
        f"store: {figures['store_seconds']:.1f} s, {figures['store_rate']:,.0f} messages/s "
        f"(SendCertainly, Ack once durable)\n"
        f"drain: {figures['drain_seconds']:.1f} s, {figures['drain_rate']:,.0f} messages/s "
        f"(logon, delivery, acknowledgement)"
    )


if __name__ == "__main__":
    main()
