"""
End-to-end tests of the HTTP sites' limits: a real C{twistd esf} with a
low descriptor limit, its HTTP sites attacked by peers that trickle their
requests one byte at a time, on 127.0.0.1.

Every attack is bounded in sockets, attempts and wall-clock time.
"""

from __future__ import annotations

import errno
import re
import resource
import socket
import time

import pytest
import rawclient as rc
from test_admin_e2e import site_port
from test_e2e import AUTH, start_server

pytestmark = pytest.mark.e2e

#: The child's descriptor limit (soft and hard).
NOFILE = 128


def low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


class Tricklers:
    """
    Up to C{count} sockets to each of C{ports}, each sending one byte of a
    request head that never ends every tick; one closed by the server is
    opened again on the next tick, as an attacker would, at most
    C{max_attempts} times in all.
    """

    def __init__(self, ports, count, max_attempts=3000):
        self.ports = ports
        self.count = count
        self.attempts = 0
        self.max_attempts = max_attempts
        self.closed_by_server = 0
        self.socks = {port: [] for port in ports}

    def _open(self, port):
        if self.attempts >= self.max_attempts:
            return None
        self.attempts += 1
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        return sock

    def _alive(self, sock) -> bool:
        try:
            data = sock.recv(4096, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError as e:
            return e.errno in (errno.ENOTCONN, errno.EINPROGRESS)  # still connecting
        # An answer (408) is followed by the close: read it next tick.
        return bool(data)

    def tick(self) -> None:
        for port, socks in self.socks.items():
            kept = []
            for sock in socks:
                if self._alive(sock):
                    try:
                        sock.send(b"G")
                        kept.append(sock)
                        continue
                    except BlockingIOError:
                        kept.append(sock)
                        continue
                    except OSError:
                        pass
                self.closed_by_server += 1
                sock.close()
            while len(kept) < self.count:
                sock = self._open(port)
                if sock is None:
                    break
                kept.append(sock)
            socks[:] = kept

    def close(self) -> None:
        for socks in self.socks.values():
            for sock in socks:
                sock.close()
            socks.clear()


def logon_within(port, timeout=5.0):
    """
    Log on as alice; the reply, or the error that stopped it.
    """
    try:
        client = rc.connect(port)
    except OSError as e:
        return e
    try:
        return client.logon("alice", "pa")
    except (OSError, TimeoutError, AssertionError) as e:  # (rawclient: EOF)
        return e
    finally:
        client.close()


def test_esf_logons_go_on_while_the_http_sites_are_flooded(tmp_path):
    """
    200 peers trickling requests to the admin API and the metrics site of a
    server limited to 128 descriptors: each site holds only its cap, closes
    what does not finish a request within --http-request-timeout, and the
    ESF port keeps its share: every logon succeeds, and the log does not
    fill with a line per refused connection.
    """
    server = start_server(
        tmp_path / "server.log",
        AUTH + [
            "--logon-timeout", "2",
            "--admin-api", "tcp:0:interface=127.0.0.1",
            "--metrics", "tcp:0:interface=127.0.0.1",
            "--admin-api-max-connections", "24",
            "--metrics-max-connections", "24",
            "--http-request-timeout", "3",
        ],
        preexec_fn=low_nofile,
    )  # fmt: skip
    attack = None
    try:
        admin, metrics = site_port(server, "admin-api"), site_port(server, "metrics")
        attack = Tricklers([admin, metrics], count=100)
        replies = []
        started = time.monotonic()
        while time.monotonic() - started < 8:
            attack.tick()
            if len(replies) < 3 and time.monotonic() - started > 2 * (len(replies) + 1):
                replies.append(logon_within(server.port))
            time.sleep(0.25)
        assert [r["result"] if isinstance(r, dict) else r for r in replies] == [0, 0, 0], replies
        # The attack went on throughout: connections were refused and timed
        # out, and made again.
        assert attack.closed_by_server > 100, attack.closed_by_server
    finally:
        if attack is not None:
            attack.close()
        server.stop()
    log = server.log()
    assert "EMFILE" not in log and "Could not accept" not in log
    # A connection over a site's cap gives its descriptor back in the
    # accept loop: the process never ran out, even for a moment.
    assert "out of file descriptors" not in log, log
    assert "Timing out client" not in log  # twisted.web's line per connection
    # At most one line per 10 s per site and kind.
    assert 1 <= len(re.findall("holds its maximum of 24 connections", log)) <= 4, log
    assert 1 <= len(re.findall("did not send a whole request within 3 s", log)) <= 4, log
    assert len(log.splitlines()) < 80, log


def test_web_demo_handshakes_that_trickle_are_dropped_at_the_logon_timeout(tmp_path):
    """
    With --web-demo, twisted.web parses the handshake; a peer trickling it
    is still dropped within --logon-timeout, as with plain --websocket.
    """
    server = start_server(
        tmp_path / "server.log",
        AUTH + ["--logon-timeout", "2", "--websocket", "tcp:0:interface=127.0.0.1", "--web-demo"],
    )
    attack = None
    try:
        ws_port = site_port(server, "websocket")
        attack = Tricklers([ws_port], count=20, max_attempts=20)
        started = time.monotonic()
        while time.monotonic() - started < 4.5:
            attack.tick()
            time.sleep(0.5)
        # Every one of the 20 was closed, none reopened (max_attempts).
        assert attack.closed_by_server == 20, attack.closed_by_server
    finally:
        if attack is not None:
            attack.close()
        server.stop()
