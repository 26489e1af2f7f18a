"""
The ESF v1 wire format: frames, enums and message bodies.

Sans-IO: L{FrameDecoder} turns bytes into L{Frame}s and L{encode_frame} turns
a header and a body into bytes; the body classes encode and decode
themselves.  See C{docs/protocol.md}.
"""

from ._messages import *  # noqa: F401,F403
from ._messages import __all__ as _messages_all
from ._wire import *  # noqa: F401,F403
from ._wire import __all__ as _wire_all

__all__ = sorted(set(_wire_all) | set(_messages_all))
