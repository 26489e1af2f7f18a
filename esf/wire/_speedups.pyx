# cython: language_level=3
"""
The compiled loop of L{esf.wire._decoder.FrameDecoder}: the same frames,
runs and errors as the pure-Python C{PyFrameDecoder._feed}, which stays the
reference (PyPy runs it; tests/test_wire.py checks both give the same
answer on every input).

Written in Cython rather than compiled from the Python module because the
gain is in reading the header's bytes in place: the Python loop unpacks
every header into a tuple of new objects and hashes its ID fields; here a
header that continues a run costs two C{memcmp}s, and one of a pair of IDs
met before a pointer comparison.  Everything that is not the common case
(a header not valid, IDs not met before, a frame cut off) is left to the
Python methods, which raise the errors and remember the IDs.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.string cimport memcmp

from ._frames import Frame


cdef inline long _int32(const unsigned char* p) noexcept:
    # Little-endian, signed (the header's "i" fields).
    return <int>(<unsigned int>p[0] | (<unsigned int>p[1] << 8)
                 | (<unsigned int>p[2] << 16) | (<unsigned int>p[3] << 24))


cdef inline bytes _slice(const unsigned char* p, Py_ssize_t start, Py_ssize_t end):
    # data[start:end], without the slice object and its indices.
    return PyBytes_FromStringAndSize(<const char*>p + start, end - start)


def feed(self, bytes data not None, list frames not None, tuple run_types not None):
    """
    C{PyFrameDecoder._feed}, compiled: decode C{data} into C{frames};
    return how many frames its runs hold beyond their first.
    """
    cdef Py_ssize_t size = len(data)
    cdef Py_ssize_t offset = 0
    cdef Py_ssize_t hlen, key_len, max_body, body_length, end
    cdef Py_ssize_t run_start = 0, run_count = 0, in_runs = 0
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef const unsigned char* h
    cdef const unsigned char* first_ptr = NULL
    cdef const unsigned char* guess_ptr = NULL
    cdef long message_type, run_type = -1, type_a = -1, type_b = -1
    cdef bint uniform = True
    cdef bint two_types = len(run_types) <= 2
    cdef object pair, header = None, key, guess = None, pairs, first_key, first_pair
    cdef object run_user = "", run_dest = ""
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
            # IDs met before: the pair of the last run, the first pair, or
            # one of the others (looked up by their bytes).
            if guess_ptr != NULL and memcmp(h + 12, guess_ptr, key_len) == 0:
                pair = guess
            elif first_ptr != NULL and memcmp(h + 12, first_ptr, key_len) == 0:
                pair = first_pair
            elif pairs:
                key = PyBytes_FromStringAndSize(<const char*>h + 12, key_len)
                pair = pairs.get(key)
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
            pairs = self._pairs
            first_key, first_pair = self._first_key, self._first_pair
            first_ptr = <const unsigned char*>PyBytes_AS_STRING(first_key)
        else:
            client_type = h[1]
            message_id = _int32(h + 4)
            user_id = pair.user_id
            dest_user_id = pair.dest_user_id
            if pair is not first_pair:
                guess = pair
                guess_ptr = <const unsigned char*>PyBytes_AS_STRING(pair.key)
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
