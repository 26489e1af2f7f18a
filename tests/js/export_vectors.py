"""
Export what the JavaScript client is tested against to C{vectors.json}:
the golden frames of C{tests/test_wire.py}, the body layouts, the tables of
body classes by MessageType and the enums, all from the Python codec.

    python tests/js/export_vectors.py      # rewrite tests/js/vectors.json

C{tests/test_websocket_js.py} checks that the committed file is what this
exports now, then runs node's test runner on C{tests/js/}.
"""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VECTORS_JSON = HERE / "vectors.json"
sys.path.insert(0, str(HERE.parent))

from test_wire import VECTORS

from esf import wire


def _value(value):
    if isinstance(value, enum.Enum):
        return int(value.value)
    if isinstance(value, bool):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"hex": bytes(value).hex()}
    if isinstance(value, tuple):
        return [_value(v) for v in value]
    return value


def _kind(wire_kind, as_type):
    # The JavaScript names for the two kinds that decode as booleans.
    if wire_kind == "u8" and as_type is bool:
        return "bool"
    if wire_kind == "u8s32":
        return "bools32"
    return wire_kind


def export() -> dict:
    bodies = {}
    for table in (wire.REQUEST_BODIES, wire.REPLY_BODIES):
        for cls in table.values():
            bodies[cls.__name__] = [
                [name, _kind(kind, as_type)] for name, kind, as_type in cls._layout
            ]
    return {
        "vectors": [
            {
                "name": v.name,
                "sender": v.sender,
                "max_userid_length": v.max_userid_length,
                "message_type": v.message_type,
                "client_type": int(v.client_type),
                "message_id": v.message_id,
                "user_id": v.user_id,
                "dest_user_id": v.dest_user_id,
                "body_class": type(v.body).__name__,
                "body": {name: _value(getattr(v.body, name)) for name, _, _ in v.body._layout},
                "hex": bytes.fromhex(v.hex).hex(),
            }
            for v in VECTORS
        ],
        "bodies": bodies,
        "request_bodies": {str(int(k)): c.__name__ for k, c in wire.REQUEST_BODIES.items()},
        "reply_bodies": {str(int(k)): c.__name__ for k, c in wire.REPLY_BODIES.items()},
        "enums": {
            e.__name__: {m.name: int(m.value) for m in e}
            for e in (
                wire.ClientType,
                wire.MessageType,
                wire.LogonResult,
                wire.DisconnectedType,
                wire.ErrorCode,
            )
        },
    }


def dumps() -> str:
    return json.dumps(export(), indent=1, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    VECTORS_JSON.write_text(dumps(), encoding="utf-8")
    print(f"wrote {VECTORS_JSON}")
