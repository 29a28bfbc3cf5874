# Add-wins observed-remove set without tombstones (ORSWOT; Bieniusa et al., "An optimized
# conflict-free replicated set", 2012), in delta-state form (Almeida et al., "Delta State
# Replicated Data Types", 2018, add-wins set): element -> the dots of the adds that are
# still live, plus a causal context of every dot seen. A removal leaves no per-element
# tombstone: the context alone records that the removed dots are gone. Nothing but this
# type lives here.
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .causal import (
    CausalContext,
    ContextDoc,
    Dot,
    join_dot_sets,
    unseen,
)
from .codec import (
    MAX_UINT64,
    CausalState,
    Reader,
    check_actor,
    dots_doc,
)
from .errors import DecodeError
from .values import pack_value, packed_ok, unpack_value

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
    if depth < reader.max_depth:  # hot path: well-formed input
        fast = entries_doc(obj, context.doc(), reader.max_depth - depth)
        if fast is not None:
            return {element: frozenset(_dots(flat)) for element, flat in fast.items()}
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


# Merge hot path on plain wire documents: element bytes -> its flat [actor, n, ...] dots.
DocEntries = dict[bytes, list[Any]]


def entries_doc(obj: Any, context: ContextDoc, value_depth: int) -> DocEntries | None:
    """The entries of a well-formed wire entries list whose dots are all in `context`, else
    None (read_entries explains what is wrong); values may nest `value_depth` deep."""
    if type(obj) is not list or len(obj) % 2:
        return None
    vv, cloud = context
    entries: DocEntries = {}
    previous = b""
    for i in range(0, len(obj), 2):
        element, flat = obj[i], obj[i + 1]
        if type(element) is not bytes or (entries and element <= previous):
            return None
        if type(flat) is list and len(flat) == 2:  # the common case of a single dot
            actor, n = flat
            if (type(actor) is not str or actor == "" or type(n) is not int
                    or not 0 < n <= MAX_UINT64
                    or (n > vv.get(actor, 0) and (actor, n) not in cloud)):
                return None
        else:
            dots = dots_doc(flat)
            if not dots or unseen(dots, context):
                return None
        if not packed_ok(element, value_depth):
            return None
        entries[element] = flat
        previous = element
    return entries


def _dots(flat: list[Any]) -> list[Dot]:
    return list(zip(flat[::2], flat[1::2], strict=True))


def _flat(dots: Iterable[Dot]) -> list[Any]:
    flat: list[Any] = []
    for dot in dots:
        flat += dot
    return flat


def _kept(flat: list[Any], context: ContextDoc) -> list[Any] | None:
    """The dots of `flat` not in `context` (flat itself when none is), None when none is left."""
    if len(flat) == 2:
        actor, n = flat
        vv, cloud = context
        return flat if n > vv.get(actor, 0) and (actor, n) not in cloud else None
    dots = _dots(flat)
    kept = unseen(dots, context)
    if len(kept) == len(dots):
        return flat
    return _flat(kept) if kept else None


def merge_entries_docs(a: DocEntries, ca: ContextDoc, b: DocEntries, cb: ContextDoc
                       ) -> list[Any]:
    """Canonical wire entries of the join (join_entries on the wire form)."""
    out: dict[bytes, list[Any]] = {}
    for element, flat in a.items():
        other = b.get(element)
        if other is None:
            kept = _kept(flat, cb)  # the common case for a small delta: unchanged
            if kept is not None:
                out[element] = kept
        elif other == flat:
            out[element] = flat
        else:
            mine, theirs = set(_dots(flat)), set(_dots(other))
            joined = (mine & theirs).union(unseen(mine - theirs, cb), unseen(theirs - mine, ca))
            if joined:
                out[element] = _flat(sorted(joined))
    for element, flat in b.items():
        if element not in a:
            kept = _kept(flat, ca)
            if kept is not None:
                out[element] = kept
    wire: list[Any] = []
    for element in sorted(out):
        wire += (element, out[element])
    return wire


class ORSet(CausalState[Entries]):
    """Add-wins set. value() -> list of the elements in canonical (encoded-bytes) order.

    Mutators: add(actor, element) and remove(element), each -> delta (add_many and
    remove_many: one delta for many elements, in linear time). An add concurrent with
    a remove of the same element wins; a remove only removes the adds it has observed, so a
    remove of an element never seen does nothing. The remove delta carries no element, only
    the causal context of the removed dots, which is what keeps a removed element from
    coming back when an old replica merges.
    """

    TYPE_NAME = "orset"
    TAG = 5
    __slots__ = ()
    _join = staticmethod(join_entries)
    _read_entries = staticmethod(read_entries)
    _entries_to_wire = staticmethod(entries_to_wire)
    _entries_doc = staticmethod(entries_doc)
    _merge_entries_docs = staticmethod(merge_entries_docs)

    def value(self) -> list[Any]:
        return [unpack_value(element) for element in sorted(self._entries)]

    def contains(self, element: Any) -> bool:
        return pack_value(element) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, actor: str, element: Any) -> ORSet:
        """Delta adding `element` (a new dot; the element's older dots are superseded)."""
        packed = pack_value(element)
        dot = self._context.next_dot(check_actor(actor))
        old = self._entries.get(packed, _NO_DOTS)
        return ORSet._make({packed: frozenset((dot,))}, CausalContext.from_dots([dot, *old]))

    def add_many(self, actor: str, elements: Iterable[Any]) -> ORSet:
        """One delta adding every element, in order: the same as adding them one by one,
        merging each delta into the state before the next add, and joining the deltas (each
        element, repeats included, takes the next dot; an element keeps its last one), but
        in time linear in their number (plus sorting the dots), where the loop of merges is
        quadratic."""
        check_actor(actor)
        top = self._context.next_dot(actor)[1] - 1
        entries: Entries = {}
        seen: list[Dot] = []
        for element in elements:
            packed = pack_value(element)
            top += 1
            dot = (actor, top)
            seen.append(dot)
            if packed not in entries:
                seen.extend(self._entries.get(packed, _NO_DOTS))
            entries[packed] = frozenset((dot,))
        return ORSet._make(entries, CausalContext.from_dots(seen))

    def remove(self, element: Any) -> ORSet:
        """Delta removing the adds of `element` seen here (empty delta if none)."""
        dots = self._entries.get(pack_value(element), _NO_DOTS)
        return ORSet._make({}, CausalContext.from_dots(dots))

    def remove_many(self, elements: Iterable[Any]) -> ORSet:
        """One delta removing every element (the join of their remove deltas), in linear
        time."""
        removed: set[bytes] = {pack_value(element) for element in elements}
        return ORSet._make({}, CausalContext.from_dots(
            dot for packed in removed for dot in self._entries.get(packed, _NO_DOTS)))
