# Add-wins observed-remove set without tombstones (ORSWOT; Bieniusa et al., "An optimized
# conflict-free replicated set", 2012), in delta-state form (Almeida et al., "Delta State
# Replicated Data Types", 2018, add-wins set): element -> the dots of the adds that are
# still live, plus a causal context of every dot seen. A removal leaves no per-element
# tombstone: the context alone records that the removed dots are gone. Nothing but this
# type lives here.
from __future__ import annotations

from typing import Any

from .causal import CausalContext, Dot, join_dot_sets
from .codec import Reader, State, check_actor, context_to_wire
from .errors import DecodeError
from .values import pack_value, unpack_value

Entries = dict[bytes, frozenset[Dot]]  # canonical element bytes -> live add dots (non-empty)

_NO_DOTS: frozenset[Dot] = frozenset()


def join_entries(a: Entries, ca: CausalContext, b: Entries, cb: CausalContext) -> Entries:
    out: Entries = {}
    for element, dots in a.items():
        other = b.get(element)
        if other is None and not any(cb.contains(dot) for dot in dots):
            out[element] = dots  # common for a small delta: the other side never saw these
            continue
        kept = join_dot_sets(dots, ca, _NO_DOTS if other is None else other, cb)
        if kept:
            out[element] = kept
    for element, dots in b.items():
        if element not in a:
            kept = frozenset(dot for dot in dots if not ca.contains(dot))
            if kept:
                out[element] = kept
    return out


def entries_dots(entries: Entries) -> list[Dot]:
    return [dot for dots in entries.values() for dot in dots]


def entries_to_wire(entries: Entries) -> list[Any]:
    flat: list[Any] = []
    for element in sorted(entries):
        dots: list[Any] = []
        for actor, n in sorted(entries[element]):
            dots += (actor, n)
        flat += (element, dots)
    return flat


def read_entries(obj: Any, reader: Reader, depth: int, context: CausalContext) -> Entries:
    """Parse entries whose dots must all be in `context`; `depth` is that of the list."""
    flat = reader.array(obj, "orset entries", depth)
    if len(flat) % 2:
        raise DecodeError("orset entries: expected element/dots pairs")
    entries: Entries = {}
    previous: bytes | None = None
    for i in range(0, len(flat), 2):
        element = reader.value(flat[i], "orset element", depth)
        if previous is not None and element <= previous:
            raise DecodeError("orset entries: elements not in strictly increasing order")
        dots = reader.pairs(flat[i + 1], "orset dots", depth + 1, unique_actors=False)
        if not dots:
            raise DecodeError("orset entries: an element with no dots")
        for dot in dots:
            if not context.contains(dot):
                raise DecodeError(f"orset entries: dot {dot} missing from the causal context")
        entries[element] = frozenset(dots)
        previous = element
    return entries


class ORSet(State):
    """Add-wins set. value() -> list of the elements in canonical (encoded-bytes) order.

    Mutators: add(actor, element) and remove(element), each -> delta. An add concurrent with
    a remove of the same element wins; a remove only removes the adds it has observed, so a
    remove of an element never seen does nothing. The remove delta carries no element, only
    the causal context of the removed dots, which is what keeps a removed element from
    coming back when an old replica merges.
    """

    TYPE_NAME = "orset"
    TAG = 5
    __slots__ = ("_entries", "_context")
    _entries: Entries
    _context: CausalContext

    def __init__(self) -> None:
        self._entries = {}
        self._context = CausalContext()

    @classmethod
    def _make(cls, entries: Entries, context: CausalContext) -> ORSet:
        state = cls.__new__(cls)
        state._entries = entries
        state._context = context
        return state

    @property
    def context(self) -> CausalContext:
        return self._context

    def value(self) -> list[Any]:
        return [unpack_value(element) for element in sorted(self._entries)]

    def contains(self, element: Any) -> bool:
        return pack_value(element) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def is_empty(self) -> bool:
        return not self._entries and self._context.is_empty()

    def add(self, actor: str, element: Any) -> ORSet:
        """Delta adding `element` (a new dot; the element's older dots are superseded)."""
        packed = pack_value(element)
        dot = self._context.next_dot(check_actor(actor))
        old = self._entries.get(packed, _NO_DOTS)
        return ORSet._make({packed: frozenset((dot,))}, CausalContext.from_dots([dot, *old]))

    def remove(self, element: Any) -> ORSet:
        """Delta removing the adds of `element` seen here (empty delta if none)."""
        dots = self._entries.get(pack_value(element), _NO_DOTS)
        return ORSet._make({}, CausalContext.from_dots(dots))

    def merge(self, other: ORSet) -> ORSet:
        self._check_same_type(other)
        return ORSet._make(
            join_entries(self._entries, self._context, other._entries, other._context),
            self._context.merge(other._context))

    def wire_body(self) -> list[Any]:
        return [context_to_wire(self._context), entries_to_wire(self._entries)]

    @classmethod
    def from_wire_body(cls, body: list[Any], reader: Reader, depth: int) -> ORSet:
        context_obj, entries_obj = reader.fields(body, cls.TYPE_NAME, 2)
        context = reader.context(context_obj, depth + 1)
        return cls._make(read_entries(entries_obj, reader, depth + 1, context), context)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ORSet):
            return NotImplemented
        return self._entries == other._entries and self._context == other._context

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ORSet({self.value()!r}, {self._context!r})"
