# cython: language_level=3
"""
The compiled loops of the relay's common case: L{feed}, the loop of
L{esf.wire._decoder.FrameDecoder} (the same frames, runs and errors as the
pure-Python C{FrameDecoder._feed_python}, which stays the reference: PyPy
runs it; tests/test_wire.py checks both give the same answer on every
input); and the easy cases of L{esf.server._websocket_frames}:
L{take_messages} (ESF frames in masked binary WebSocket messages, unmasked
in C) and L{frame_messages} (the server's frames as WebSocket messages).

Written in Cython rather than compiled from the Python module because the
gain is in reading the header's bytes in place: the Python loop unpacks
every header into a tuple of new objects and hashes its ID fields; here a
header that continues a run costs two C{memcmp}s, and one whose IDs are
the guessed pair's (the next receiver, when a sender writes to its
receivers in turn) one more.  Everything that is not the common case (a
header not valid, IDs not met before, a frame cut off, a message that is
not one whole frame) is left to the Python code, which raises the errors,
remembers the IDs and judges the messages.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint64_t
from libc.string cimport memcmp, memcpy

from ._frames import Frame


cdef inline long _int32(const unsigned char* p) noexcept:
    # Little-endian, signed (the header's "i" fields).
    return <int>(<unsigned int>p[0] | (<unsigned int>p[1] << 8)
                 | (<unsigned int>p[2] << 16) | (<unsigned int>p[3] << 24))


cdef class Pair:
    """
    A pair of ID fields a decoder has checked: C{_Pair} of
    L{esf.wire._decoder} (the same fields, which both loops use), made of
    this class where the compiled loop runs, which reads them in C.
    """

    cdef public str user_id
    cdef public str dest_user_id
    cdef public bytes key
    cdef public object next

    def __init__(self, str user_id, str dest_user_id, bytes key):
        self.user_id = user_id
        self.dest_user_id = dest_user_id
        self.key = key
        self.next = self


cdef inline bytes _slice(const unsigned char* p, Py_ssize_t start, Py_ssize_t end):
    # data[start:end], without the slice object and its indices.
    return PyBytes_FromStringAndSize(<const char*>p + start, end - start)


def feed(self, bytes data not None, list frames not None, tuple run_types not None):
    """
    C{FrameDecoder._feed_python}, compiled: decode C{data} into C{frames};
    return how many frames its runs hold beyond their first.
    """
    cdef Py_ssize_t size = len(data)
    cdef Py_ssize_t offset = 0
    cdef Py_ssize_t hlen, key_len, max_body, body_length, end
    cdef Py_ssize_t run_start = 0, run_count = 0, in_runs = 0
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef const unsigned char* h
    cdef const unsigned char* first_ptr = NULL
    cdef long message_type, run_type = -1, type_a = -1, type_b = -1
    cdef bint uniform = True
    cdef bint two_types = len(run_types) <= 2
    cdef object pair, header = None, key, pairs, first_key, first_pair
    cdef object run_user = "", run_dest = ""
    # The pair of the run opened last; its next pair is guessed first, as
    # in the Python loop: a sender writing to its receivers in turn is
    # found with one comparison, no hashing.
    cdef Pair guess_from = None, guess, found
    if self._have:
        offset = self._complete_partial(data, frames)
        if offset < 0:
            return 0
    if run_types:
        type_a = run_types[0]
        type_b = run_types[-1]
    hlen = self.config.header_length
    key_len = hlen - 12
    max_body = self.max_message_size - hlen
    pairs = self._pairs
    first_key, first_pair = self._first_key, self._first_pair
    if first_key is not None:
        first_ptr = <const unsigned char*>PyBytes_AS_STRING(first_key)
        guess_from = <Pair?>first_pair
    hlen_obj = hlen
    while size - offset >= hlen:
        h = p + offset
        message_type = h[2] | (h[3] << 8)
        body_length = _int32(h + 8)
        pair = None
        if h[0] == 0xFF and 0 <= body_length <= max_body:
            if (
                run_count
                and message_type == run_type
                and memcmp(h + 12, p + run_start + 12, key_len) == 0
            ):
                # One more frame of the open run.
                end = offset + hlen + body_length
                if end > size:
                    header = (h[1], message_type, _int32(h + 4), run_user, run_dest, body_length)
                    break
                if uniform and memcmp(h, p + run_start, hlen) != 0:
                    uniform = False
                run_count += 1
                offset = end
                continue
            # IDs met before: the guess, the first pair, or one of the
            # others (looked up by their bytes).
            if guess_from is not None:
                guess = <Pair?>guess_from.next
                if (
                    PyBytes_GET_SIZE(guess.key) == key_len
                    and memcmp(h + 12, PyBytes_AS_STRING(guess.key), key_len) == 0
                ):
                    pair = guess
            if pair is None:
                if first_ptr != NULL and memcmp(h + 12, first_ptr, key_len) == 0:
                    pair = first_pair
                elif pairs:
                    key = PyBytes_FromStringAndSize(<const char*>h + 12, key_len)
                    pair = pairs.get(key)
                if pair is not None and guess_from is not None:
                    guess_from.next = pair
        if run_count:
            # (Before a bad header raises: what came before it is kept.)
            frames.append((run_type, run_user, run_dest, _slice(p, run_start, offset), run_count,
                           hlen_obj, uniform))
            in_runs += run_count - 1
            run_count = 0
        if pair is None:
            # Not the common case: the Python check judges the header (and
            # raises), and remembers the IDs.
            client_type, message_type, message_id, user_id, dest_user_id, body_length = (
                self._check_header(data, offset)
            )
            # (It remembered the pair: look there from now on.)
            pairs = self._pairs
            first_key, first_pair = self._first_key, self._first_pair
            first_ptr = <const unsigned char*>PyBytes_AS_STRING(first_key)
            key = PyBytes_FromStringAndSize(<const char*>p + offset + 12, key_len)
            found = <Pair?>(first_pair if key == first_key else pairs[key])
            if guess_from is None:
                guess_from = <Pair?>first_pair
        else:
            found = <Pair?>pair
            client_type = h[1]
            message_id = _int32(h + 4)
            user_id = found.user_id
            dest_user_id = found.dest_user_id
        end = offset + hlen + body_length
        if end > size:
            header = (client_type, message_type, message_id, user_id, dest_user_id, body_length)
            break
        if (
            (message_type == type_a or message_type == type_b)
            if two_types
            else message_type in run_types
        ):
            run_type, run_start, run_count, uniform = message_type, offset, 1, True
            run_user, run_dest = user_id, dest_user_id
            guess_from = found
        else:
            raw = _slice(p, offset, end) if (offset or end != size) else data
            frames.append(
                Frame(client_type, message_type, message_id, user_id, dest_user_id, raw, hlen_obj)
            )
        offset = end
    if run_count:
        raw = _slice(p, run_start, offset) if (run_start or offset != size) else data
        frames.append((run_type, run_user, run_dest, raw, run_count, hlen_obj, uniform))
        in_runs += run_count - 1
    if offset < size:
        # A partial frame, its header checked already when it is whole.
        self._header = header
        self._need = hlen if header is None else hlen + header[5]
        self._stash(data[offset:] if offset else data)
    return in_runs


def take_messages(
    bytes data not None, Py_ssize_t offset, Py_ssize_t limit, Py_ssize_t header_length,
    list frames not None,
):
    """
    Take the WebSocket messages from C{offset} in C{data} that are each one
    final, masked binary frame with the shortest length encoding (7 or 16
    bits), of at most C{limit} bytes, whole in C{data}, and that hold one
    whole ESF frame of C{header_length}-byte header: append each one's
    unmasked payload to C{frames}; return the offset of the first message
    not taken.

    The message there, whatever it is (cut off, refused, autobahn's), is
    left to the Python loop of C{MessageParser.feed}, which judges it
    exactly as it judges every message without this function.
    """
    cdef Py_ssize_t size = len(data), length, start, end, i, body_length
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef const unsigned char* mask
    cdef const unsigned char* src
    cdef unsigned char* out
    cdef unsigned char b[4]
    cdef uint64_t word, mask8
    cdef bytes message
    if header_length < 12 or not 0 <= offset <= size:  # (no ESF header is shorter)
        return offset  # nothing taken
    while size - offset >= 2:
        if p[offset] != 0x82:  # FIN, no RSV bits, binary
            break
        length = p[offset + 1]
        if 0x80 <= length < 0xFE:  # masked, a 7-bit length
            length &= 0x7F
            start = offset + 2
        elif length == 0xFE and size - offset >= 4:  # masked, a 16-bit length
            length = (p[offset + 2] << 8) | p[offset + 3]
            if length < 126:
                break
            start = offset + 4
        else:
            break
        end = start + 4 + length
        if length > limit or end > size or length < header_length:
            break
        mask = p + start
        src = mask + 4
        for i in range(4):
            b[i] = src[8 + i] ^ mask[i]  # (offset 8: a multiple of the mask's 4)
        body_length = _int32(b)
        if header_length + body_length != length:
            break
        message = PyBytes_FromStringAndSize(NULL, length)
        out = <unsigned char*>PyBytes_AS_STRING(message)
        memcpy(&mask8, mask, 4)
        memcpy((<unsigned char*>&mask8) + 4, mask, 4)
        i = 0
        while i + 8 <= length:
            memcpy(&word, src + i, 8)
            word ^= mask8
            memcpy(out + i, &word, 8)
            i += 8
        while i < length:
            out[i] = src[i] ^ mask[i & 3]
            i += 1
        frames.append(message)
        offset = end
    return offset


def frame_messages(bytes data not None, Py_ssize_t header_length):
    """
    C{binary_messages} of L{esf.server._websocket_frames}, compiled: the
    whole ESF frames of C{data}, each as one unmasked binary WebSocket
    message, in one string of bytes; C{None} where the Python function must
    judge (a frame cut off, or one of 64 KiB or more).
    """
    cdef Py_ssize_t size = len(data), offset = 0, length, total = 0, o = 0
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef unsigned char* out
    cdef bytes result
    if header_length < 12:  # (no ESF header is shorter)
        return None
    while offset < size:
        if size - offset < header_length:
            return None
        length = header_length + _int32(p + offset + 8)
        if length < header_length or length > 0xFFFF or length > size - offset:
            return None
        total += length + (2 if length < 126 else 4)
        offset += length
    result = PyBytes_FromStringAndSize(NULL, total)
    out = <unsigned char*>PyBytes_AS_STRING(result)
    offset = 0
    while offset < size:
        length = header_length + _int32(p + offset + 8)
        out[o] = 0x82  # FIN, binary
        if length < 126:
            out[o + 1] = <unsigned char>length
            o += 2
        else:
            out[o + 1] = 126
            out[o + 2] = <unsigned char>(length >> 8)
            out[o + 3] = <unsigned char>(length & 0xFF)
            o += 4
        memcpy(out + o, p + offset, length)
        o += length
        offset += length
    return result
