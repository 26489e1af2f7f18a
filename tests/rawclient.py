"""
A tiny blocking ESF v1 client, written from the wire contract alone.

It deliberately does not import C{esf}: the end-to-end tests use it to check
that the server speaks the documented bytes, not merely what the package's
own encoder produces.  Default header layout only (maximum UserID length 11,
36-byte header), little-endian throughout.
"""

import socket
import struct
import time

# StartToken u8, ClientType u8, MessageType u16, MessageID i32, BodyLength i32,
# UserIDLength u8, UserID 11s, DestUserIDLength u8, DestUserID 11s.
HEADER = struct.Struct("<BBHiiB11sB11s")
assert HEADER.size == 36

START_TOKEN = 0xFF
SERVER = "_0"

# Message types used by the tests.
GET_MY_IPE, PING, PING_ACK, HEARTBEAT = 101, 102, 103, 104
PUSHED_OUT, DISCONNECT, LOGOFF, KICK_OUT, KICKED_OUT = 105, 106, 107, 108, 109
GET_ALL_ONLINE_USERS, QUERY_ONLINE, LOGON, ERROR = 110, 111, 112, 120
MY_DEVICE_ONLINE, MY_DEVICE_OFFLINE = 117, 118
#: Frames that may arrive at any time and that recv_until passes over.
UNSOLICITED = (HEARTBEAT, MY_DEVICE_ONLINE, MY_DEVICE_OFFLINE)


def pack_str(text):
    data = text.encode("utf-8")
    return struct.pack("<H", len(data)) + data


def unpack_str(body, offset=0):
    """Return (text, offset after it)."""
    (n,) = struct.unpack_from("<H", body, offset)
    end = offset + 2 + n
    if end > len(body):
        raise ValueError("str runs past the end of the body")
    return body[offset + 2 : end].decode("utf-8"), end


def pack_header(msg_type, body_length, user="", dest="", msg_id=0, client_type=0):
    uid, did = user.encode("utf-8"), dest.encode("utf-8")
    return HEADER.pack(
        START_TOKEN, client_type, msg_type, msg_id, body_length, len(uid), uid, len(did), did
    )


def parse_header(data):
    start, ctype, mtype, mid, blen, ulen, uid, dlen, did = HEADER.unpack(data)
    assert start == START_TOKEN, f"start token 0x{start:02X}"
    assert uid[ulen:] == bytes(11 - ulen) and did[dlen:] == bytes(11 - dlen), "bad padding"
    return {
        "client_type": ctype,
        "message_type": mtype,
        "message_id": mid,
        "body_length": blen,
        "user_id": uid[:ulen].decode("utf-8"),
        "dest_user_id": did[:dlen].decode("utf-8"),
    }


# -- body parsers -------------------------------------------------------------


def parse_logon_reply(body):
    result = body[0]
    cause, i = unpack_str(body, 1)
    interval, timeout, max_size = struct.unpack_from("<HHI", body, i)
    assert i + 8 == len(body), "trailing bytes in Logon reply"
    return {
        "result": result,
        "cause": cause,
        "heartbeat_interval": interval,
        "heartbeat_timeout": timeout,
        "max_message_size": max_size,
    }


def parse_disconnect_notice(body):
    text, _ = unpack_str(body, 1)
    return {"type": body[0], "text": text}


def parse_kick_out_reply(body):
    cause, _ = unpack_str(body, 1)
    return {"ok": body[0], "cause": cause}


def parse_online_users(body):
    total, count = struct.unpack_from("<II", body)
    users, i = [], 8
    for _ in range(count):
        user, i = unpack_str(body, i)
        users.append(user)
    return {"total": total, "users": users}


def parse_error(body):
    request_type, code = struct.unpack_from("<HH", body)
    text, _ = unpack_str(body, 4)
    return {"request_type": request_type, "code": code, "text": text}


def parse_kicked_out(body):
    operator, i = unpack_str(body)
    reason, _ = unpack_str(body, i)
    return {"operator": operator, "reason": reason}


def parse_pushed_out(body):
    return {"cause": unpack_str(body)[0]}


# -- the client ------------------------------------------------------------------


class Client:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        self.user = ""
        self.client_type = 0
        self.eof = False

    def send_raw(self, data):
        self.sock.sendall(data)

    def send(self, msg_type, body=b"", dest="", msg_id=0):
        header = pack_header(msg_type, len(body), self.user, dest, msg_id, self.client_type)
        self.sock.sendall(header + body)

    def logon(self, user, password, client_type=0, system_token="", version=1):
        """Log on and return the parsed Logon reply."""
        self.user, self.client_type = user, client_type
        body = struct.pack("<H", version) + pack_str(system_token) + pack_str(password)
        self.send(LOGON, body, dest=SERVER, msg_id=1)
        header, body = self.recv_until(LOGON)
        assert header["message_id"] == 1
        return parse_logon_reply(body)

    def _fill(self, n, deadline):
        """Buffer at least n bytes; False on EOF.  Nothing is consumed."""
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete frame within the timeout ({self.buf!r})")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return False
            self.buf += chunk
        return True

    def recv_frame(self, timeout=5.0):
        """(header dict, body bytes), or None on EOF; TimeoutError if slow."""
        deadline = time.monotonic() + timeout
        if not self._fill(HEADER.size, deadline):
            assert not self.buf, f"EOF inside a header: {self.buf!r}"
            self.eof = True
            return None
        header = parse_header(self.buf[: HEADER.size])
        end = HEADER.size + header["body_length"]
        assert self._fill(end, deadline), "EOF inside a body"
        body, self.buf = self.buf[HEADER.size : end], self.buf[end:]
        return header, body

    def recv_until(self, msg_type, timeout=5.0, skip=UNSOLICITED):
        """The next frame of C{msg_type}, skipping only the types in C{skip}."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.recv_frame(max(deadline - time.monotonic(), 0.001))
            assert frame is not None, f"EOF while waiting for {msg_type}"
            if frame[0]["message_type"] == msg_type:
                return frame
            assert frame[0]["message_type"] in skip, f"wanted {msg_type}, got {frame}"

    def close(self):
        self.sock.close()


def connect(port, host="127.0.0.1", timeout=5.0):
    return Client(socket.create_connection((host, port), timeout=timeout))
