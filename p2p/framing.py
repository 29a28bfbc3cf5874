# Length-prefixed msgpack frames for direct streams.
# Lives here (sans-IO): encoding a frame, and an incremental decoder that enforces the maximum
# frame size before buffering. Must not live here: reading from or writing to streams.
from __future__ import annotations

import struct
from typing import Any

import msgpack

_LENGTH = struct.Struct(">I")
HEADER_SIZE = _LENGTH.size


class FrameError(ValueError):
    """A frame is oversized, truncated or not msgpack."""


def encode_frame(message: Any, max_size: int) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > max_size:
        raise FrameError(f"frame of {len(body)} bytes exceeds the limit of {max_size}")
    return _LENGTH.pack(len(body)) + body


def frame_length(header: bytes, max_size: int) -> int:
    """Body length announced by a 4-byte header, refusing lengths over `max_size`."""
    if len(header) != HEADER_SIZE:
        raise FrameError("truncated frame header")
    (length,) = _LENGTH.unpack(header)
    if length > max_size:
        raise FrameError(f"peer announced a frame of {length} bytes, limit is {max_size}")
    return length


def decode_body(body: bytes, max_size: int) -> Any:
    try:
        return msgpack.unpackb(
            body, raw=False, max_bin_len=max_size, max_str_len=max_size, strict_map_key=False
        )
    except Exception as exc:
        raise FrameError(f"frame is not valid msgpack ({exc.__class__.__name__})") from None
