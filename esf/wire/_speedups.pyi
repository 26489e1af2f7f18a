from typing import Any

class Pair:
    user_id: str
    dest_user_id: str
    key: bytes
    next: Any
    def __init__(self, user_id: str, dest_user_id: str, key: bytes) -> None: ...

def feed(self: Any, data: bytes, frames: list[Any], run_types: tuple[int, ...]) -> int: ...
def take_messages(
    data: bytes, offset: int, limit: int, header_length: int, frames: list[bytes]
) -> int: ...
def frame_messages(data: bytes, header_length: int) -> bytes | None: ...
