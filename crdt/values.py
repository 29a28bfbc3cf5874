# Canonical msgpack form of the plain values that CRDTs carry (register values, set elements).
# A value is identified by its canonical bytes: equal values give identical bytes, so states
# built in any order encode identically. No CRDT logic lives here.
from __future__ import annotations

from typing import Any

import msgpack

from .errors import DecodeError

# Nesting allowed in a value created locally (lists/dicts inside each other).
MAX_VALUE_DEPTH = 16

_SCALARS = frozenset({type(None), bool, int, float, str, bytes})
_packb = msgpack.Packer().pack  # reusable, as in codec.py
_unpackb = msgpack.unpackb


def pack_value(value: object) -> bytes:
    """Canonical msgpack bytes of a plain value.

    Plain values: None, bool, int (-2**63..2**64-1), float, str, bytes, and lists (tuples are
    taken as lists) and dicts with str keys of plain values, nested at most MAX_VALUE_DEPTH
    deep. Dict keys are written in sorted order. Raises TypeError or ValueError otherwise.
    """
    try:
        if type(value) in _SCALARS:
            return _packb(value)  # type: ignore[no-any-return]
        return _packb(_canonical(value, 1))  # type: ignore[no-any-return]
    except OverflowError as exc:
        raise ValueError(f"integer out of msgpack range in {value!r}") from exc


def _canonical(value: object, depth: int) -> object:
    kind = type(value)
    if kind in _SCALARS:
        return value
    if depth > MAX_VALUE_DEPTH:
        raise ValueError(f"value nested deeper than {MAX_VALUE_DEPTH}")
    if kind is list or kind is tuple:
        return [_canonical(item, depth + 1) for item in value]  # type: ignore[attr-defined]
    if kind is dict:
        items: dict[Any, Any] = value  # type: ignore[assignment]
        for key in items:
            if type(key) is not str:
                raise TypeError(f"dict keys in values must be str, got {key!r}")
        return {key: _canonical(items[key], depth + 1) for key in sorted(items)}
    raise TypeError(f"not a plain msgpack value: {kind.__name__}")


def unpack_value(packed: bytes) -> Any:
    """The plain value behind canonical bytes made by pack_value (or checked by check_packed)."""
    return _unpackb(packed, raw=False)


def check_packed(packed: bytes, max_depth: int) -> bool:
    """Raise DecodeError unless `packed` is the canonical encoding of a plain value nested at
    most `max_depth` deep (untrusted input: anything wrong is a DecodeError). Returns True
    when that value is a scalar (valid at any depth), False for a list or dict."""
    try:
        value = _unpackb(packed, raw=False, strict_map_key=True)
    except Exception as exc:
        raise DecodeError(f"value is not valid msgpack: {exc}") from None
    scalar = type(value) in _SCALARS
    if scalar:
        canonical = _packb(value)
    else:
        _check_plain(value, 1, max_depth)
        canonical = _packb(_canonical_trusted(value))
    if canonical != packed:
        raise DecodeError("value is not in canonical msgpack form")
    return scalar


# Canonical encodings of scalars seen by packed_ok (valid at any depth). check_packed is a pure
# function, so remembering its verdict changes nothing but the time: a stored set or register
# is re-checked on every merge into it, mostly with the same few elements.
_KNOWN_SCALARS: set[bytes] = set()
_KNOWN_LIMIT = 16_384
_KNOWN_MAX_BYTES = 256


def packed_ok(packed: object, max_depth: int) -> bool:
    """check_packed as a test (the fast check of merge hot paths), for any object."""
    if type(packed) is not bytes:
        return False
    if packed in _KNOWN_SCALARS:
        return True
    try:
        scalar = check_packed(packed, max_depth)
    except DecodeError:
        return False
    if scalar and len(packed) <= _KNOWN_MAX_BYTES:
        if len(_KNOWN_SCALARS) >= _KNOWN_LIMIT:
            _KNOWN_SCALARS.clear()
        _KNOWN_SCALARS.add(packed)
    return True


def _check_plain(value: object, depth: int, max_depth: int) -> None:
    kind = type(value)
    if kind in _SCALARS:
        return
    if depth > max_depth:
        raise DecodeError(f"value nested deeper than max_depth={max_depth}")
    if kind is list:
        for item in value:  # type: ignore[attr-defined]
            _check_plain(item, depth + 1, max_depth)
    elif kind is dict:
        items: dict[Any, Any] = value  # type: ignore[assignment]
        for key, item in items.items():
            if type(key) is not str:
                raise DecodeError(f"value has a non-str dict key of type {type(key).__name__}")
            _check_plain(item, depth + 1, max_depth)
    else:
        raise DecodeError(f"value contains unsupported msgpack type {kind.__name__}")


def _canonical_trusted(value: object) -> object:
    # Same ordering as _canonical, for values already checked by _check_plain.
    kind = type(value)
    if kind is list:
        return [_canonical_trusted(item) for item in value]  # type: ignore[attr-defined]
    if kind is dict:
        items: dict[str, Any] = value  # type: ignore[assignment]
        return {key: _canonical_trusted(items[key]) for key in sorted(items)}
    return value
