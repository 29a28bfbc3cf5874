# Last-writer-wins register ordered by hybrid-logical-clock timestamp, ties broken by actor id
# (Shapiro et al. 2011, LWW-Register). Deletion is a tombstone: a write with deleted=True that
# wins like any other write, so a late replica holding an older value cannot bring it back.
# Nothing but this type lives here; clocks are in hlc.py.
from __future__ import annotations

from typing import Any

from .codec import Reader, State, check_actor
from .errors import DecodeError
from .hlc import MAX_UINT64, Timestamp, check_timestamp
from .values import pack_value, packed_ok, unpack_value

_NONE = pack_value(None)

# (wall, logical, actor, deleted, canonical value bytes): compared as a tuple, so the winner
# is the highest timestamp, then the highest actor id; the last two fields only break ties
# between two different writes claiming the same (timestamp, actor), keeping merge a join.
_Write = tuple[int, int, str, bool, bytes]


def _read_write(body: list[Any], reader: Reader, depth: int) -> _Write | None:
    if not body:
        return None
    if len(body) == 5:
        # Fast path for well-formed input (what decode() mostly sees; merge_encoded checks
        # documents with _doc_ok instead); anything unusual falls through to the
        # field-by-field checks below, which say precisely what is wrong.
        wall, logical, actor, deleted, packed = body
        if (type(wall) is int and type(logical) is int and type(actor) is str and actor
                and type(deleted) is bool and type(packed) is bytes
                and 0 <= wall <= MAX_UINT64 and 0 <= logical <= MAX_UINT64
                and (packed == _NONE or not deleted)):
            return (wall, logical, actor, deleted, reader.value(packed, "lww value", depth))
    wall, logical, actor, deleted, packed = reader.fields(body, LWWRegister.TYPE_NAME, 5)
    write = (reader.uint(wall, "lww wall time"), reader.uint(logical, "lww logical time"),
             reader.actor(actor, "lww actor"), reader.flag(deleted, "lww deleted flag"),
             reader.value(packed, "lww value", depth))
    raise DecodeError(f"lww: a deleted register must carry the value None, got {write[4]!r:.40}")


def _doc_ok(doc: list[Any], max_depth: int) -> bool:
    """True if a whole document [tag, version, *body] has a well-formed body."""
    if len(doc) == 7:
        _, _, wall, logical, actor, deleted, packed = doc
        return (type(wall) is int and type(logical) is int and type(actor) is str
                and actor != "" and type(deleted) is bool and 0 <= wall <= MAX_UINT64
                and 0 <= logical <= MAX_UINT64 and (not deleted or packed == _NONE)
                and packed_ok(packed, max_depth - 1))
    return len(doc) == 2


class LWWRegister(State):
    """A register holding the write with the greatest (timestamp, actor).

    value() -> the plain value written, or None when empty or deleted (use `deleted` and
    is_empty() to tell those apart from a written None).
    Mutators: assign(value, timestamp, actor) and delete(timestamp, actor), each -> delta.
    A write only wins if its timestamp is greater than the current one (equal timestamps:
    higher actor id wins), so take timestamps from an HLC that has observed this register's
    `timestamp`. Remote timestamps should pass HLC.observe (which bounds clock drift) before
    their deltas are merged.
    """

    TYPE_NAME = "lww"
    TAG = 1
    __slots__ = ("_write",)
    _write: _Write | None

    def __init__(self) -> None:
        self._write = None

    @classmethod
    def _make(cls, write: _Write | None) -> LWWRegister:
        state = cls.__new__(cls)
        state._write = write
        return state

    def value(self) -> Any:
        write = self._write
        if write is None or write[3]:
            return None
        return unpack_value(write[4])

    @property
    def deleted(self) -> bool:
        """True when the winning write is a deletion (tombstone)."""
        return self._write is not None and self._write[3]

    @property
    def timestamp(self) -> Timestamp | None:
        """Timestamp of the winning write, None when empty."""
        return None if self._write is None else Timestamp(self._write[0], self._write[1])

    @property
    def actor(self) -> str | None:
        """Actor of the winning write, None when empty."""
        return None if self._write is None else self._write[2]

    def is_empty(self) -> bool:
        return self._write is None

    def assign(self, value: Any, timestamp: Timestamp, actor: str) -> LWWRegister:
        """Delta writing a plain msgpack-able value."""
        ts = check_timestamp(timestamp)
        return LWWRegister._make((ts.wall, ts.logical, check_actor(actor), False,
                                  pack_value(value)))

    def delete(self, timestamp: Timestamp, actor: str) -> LWWRegister:
        """Delta writing a tombstone: value() becomes None and `deleted` True."""
        ts = check_timestamp(timestamp)
        return LWWRegister._make((ts.wall, ts.logical, check_actor(actor), True, _NONE))

    def merge(self, other: LWWRegister) -> LWWRegister:
        self._check_same_type(other)
        mine, theirs = self._write, other._write
        if theirs is None or (mine is not None and mine >= theirs):
            return self
        return other

    def wire_body(self) -> list[Any]:
        write = self._write
        return [] if write is None else list(write)

    @classmethod
    def from_wire_body(cls, body: list[Any], reader: Reader, depth: int) -> LWWRegister:
        return cls._make(_read_write(body, reader, depth))

    @classmethod
    def merge_docs(cls, current: list[Any], incoming: list[Any], reader: Reader) -> list[Any]:
        if _doc_ok(current, reader.max_depth) and _doc_ok(incoming, reader.max_depth):
            # Same tag and version, then the write's fields: list order is the write order
            # (an empty register, the shorter list, loses).
            return current if current >= incoming else incoming
        return super().merge_docs(current, incoming, reader)

    @classmethod
    def checked_doc(cls, doc: list[Any], reader: Reader) -> list[Any]:
        if _doc_ok(doc, reader.max_depth):
            return doc  # a checked wire body is canonical as it is
        return super().checked_doc(doc, reader)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LWWRegister):
            return NotImplemented
        return self._write == other._write

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        if self._write is None:
            return "LWWRegister()"
        wall, logical, actor, deleted, _ = self._write
        shown = "<deleted>" if deleted else repr(self.value())
        return f"LWWRegister({shown}, Timestamp({wall}, {logical}), {actor!r})"
