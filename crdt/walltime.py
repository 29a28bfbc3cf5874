# The latest wall-clock time an encoded state carries: the highest `wall` of every
# last-writer-wins write in it, registers nested (at any depth) in map fields included. A
# store uses it to refuse states from a peer whose clock ran ahead (see kv/timebound.py).
# Lives here: a walk over the plain msgpack document, cheaper than a decode (no state objects,
# no value checks: merge_encoded checks those). Must not live here: any clock or bound; the
# caller compares the answer with its own time.
from __future__ import annotations

from typing import Any

from .codec import (
    _DEFAULT_READER,
    DEFAULT_MAX_SIZE,
    MAX_DEPTH_LIMIT,
    MAX_UINT64,
    TYPE_NAMES,
    _unpack,
)
from .errors import DecodeError
from .lww import LWWRegister
from .ormap import _TAG_OF, ORMap

# What carries time: the register itself, and map fields holding registers or maps. Sets,
# multi-value registers and counters carry none (their entries are dots and plain values).
_LWW, _MAP = LWWRegister.TAG, ORMap.TAG
_FIELD_LWW, _FIELD_MAP = _TAG_OF["lww"], _TAG_OF["ormap"]
# fixarray of 7 holding [lww tag, version, wall, ...]: the bytes every written register
# starts with; its wall follows as a msgpack unsigned int (first byte, then how many more)
# tags of the types that carry no wall time (their documents start [tag, ...])
_TIMELESS_TAGS = frozenset(range(1, len(TYPE_NAMES) + 1)) - {_LWW, _MAP}
_LWW_PREFIX = bytes([0x97, _LWW, LWWRegister.VERSION])
_UINT_SIZES = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}


def latest_wall(data: bytes) -> int:
    """The greatest wall time (ms) of any last-writer-wins write in the encoded state `data`;
    0 when it holds none (an empty register, a set, a counter, a map without registers).

    Exact for every input merge_encoded accepts; any other input either raises DecodeError
    (TypeError when `data` is not bytes) or gives some number, never anything else. Only the
    shape needed to find the walls is checked: merge_encoded checks the rest."""
    if type(data) is bytes and data[:3] == _LWW_PREFIX and len(data) > 3:
        # the common case, a register: read its wall straight from the bytes
        first = data[3]
        if first < 0x80:
            return first
        size = _UINT_SIZES.get(first)
        if size is not None and len(data) >= 4 + size:
            return int.from_bytes(data[4:4 + size], "big")
    if type(data) is bytes and len(data) > 1 and 0x90 <= data[0] <= 0x9F \
            and data[1] in _TIMELESS_TAGS:
        return 0  # a set, counter or multi-value register: no wall time, no unpack needed
    doc = _unpack(data, DEFAULT_MAX_SIZE)
    cls = _DEFAULT_READER.state_class(doc, 1)
    if cls.TAG == _LWW:
        return _register_wall(doc[2:])
    if cls.TAG == _MAP:
        if len(doc) != 4:
            raise DecodeError("ormap: expected a causal context and fields")
        return _fields_wall(doc[3], 2)
    return 0


def _register_wall(body: Any) -> int:
    if type(body) is not list:
        raise DecodeError(f"lww body: expected an array, got {type(body).__name__}")
    if not body:
        return 0
    if len(body) != 5:
        raise DecodeError(f"lww body: expected 5 fields, got {len(body)}")
    wall = body[0]
    if type(wall) is not int or not 0 <= wall <= MAX_UINT64:
        raise DecodeError(f"lww wall time: expected an int in 0..2**64-1, got {wall!r:.40}")
    return wall


def _fields_wall(flat: Any, depth: int) -> int:
    """The latest wall in an ormap's fields, a flat [key, type tag, store, ...] list at
    nesting `depth`. The depth guard only keeps the recursion bounded: it is looser than
    decode()'s limit, so no state that merges is refused here."""
    if type(flat) is not list or len(flat) % 3:
        raise DecodeError("ormap fields: expected key/type tag/store triples")
    if depth > MAX_DEPTH_LIMIT:
        raise DecodeError(f"ormap fields: nested deeper than {MAX_DEPTH_LIMIT}")
    latest = 0
    for i in range(1, len(flat), 3):
        tag, store = flat[i], flat[i + 1]
        if type(tag) is not int:
            raise DecodeError(f"ormap field type tag: expected an int, got {tag!r:.40}")
        if tag == _FIELD_LWW:
            # a whole-value field: [actor, counter, register body, ...]
            if type(store) is not list or len(store) % 3:
                raise DecodeError("ormap lww field: expected actor/counter/state triples")
            for j in range(2, len(store), 3):
                wall = _register_wall(store[j])
                if wall > latest:
                    latest = wall
        elif tag == _FIELD_MAP:
            wall = _fields_wall(store, depth + 1)
            if wall > latest:
                latest = wall
    return latest
