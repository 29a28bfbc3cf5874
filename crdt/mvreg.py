# Multi-value register (Shapiro et al. 2011, MV-Register; delta form per Almeida et al. 2018,
# a dot -> value store with a causal context). Concurrent assignments are all kept until a
# later assignment that has seen them replaces them. Nothing but this type lives here.
from __future__ import annotations

from typing import Any

from .causal import (
    CausalContext,
    ContextDoc,
    Dot,
    join_dot_funs,
)
from .codec import (
    MAX_UINT64,
    CausalState,
    Reader,
    check_actor,
)
from .errors import DecodeError
from .values import pack_value, packed_ok, unpack_value

Entries = dict[Dot, bytes]  # dot of the assignment -> canonical bytes of the value


def join_entries(a: Entries, ca: CausalContext, b: Entries, cb: CausalContext) -> Entries:
    # Two copies of one dot always hold the same write; max() keeps the join total anyway.
    return join_dot_funs(a, ca, b, cb, max)


def values_of(entries: Entries) -> list[Any]:
    return [unpack_value(packed) for packed in sorted(set(entries.values()))]


def entries_to_wire(entries: Entries) -> list[Any]:
    flat: list[Any] = []
    for dot in sorted(entries):
        flat += (dot[0], dot[1], entries[dot])
    return flat


def read_entries(obj: Any, reader: Reader, depth: int, context: CausalContext) -> Entries:
    """Parse entries whose dots must all be in `context`; `depth` is that of the list."""
    if depth <= reader.max_depth:  # hot path: well-formed input
        fast = entries_doc(obj, context.doc(), reader.max_depth - depth)
        if fast is not None:
            return fast
    flat = reader.array(obj, "mvreg entries", depth)
    if len(flat) % 3:
        raise DecodeError("mvreg entries: expected actor/counter/value triples")
    entries: Entries = {}
    previous: Dot | None = None
    for i in range(0, len(flat), 3):
        dot = reader.dot(flat[i], flat[i + 1], "mvreg dot")
        if previous is not None and dot <= previous:
            raise DecodeError("mvreg entries: dots not in strictly increasing order")
        if not context.contains(dot):
            raise DecodeError(f"mvreg entries: dot {dot} missing from the causal context")
        entries[dot] = reader.value(flat[i + 2], "mvreg value", depth)
        previous = dot
    return entries


def entries_doc(obj: Any, context: ContextDoc, value_depth: int) -> Entries | None:
    """The entries of a well-formed wire entries list whose dots are all in `context`, else
    None (read_entries explains what is wrong); values may nest `value_depth` deep. The merge
    hot path's reading."""
    if type(obj) is not list or len(obj) % 3:
        return None
    vv, cloud = context
    entries: Entries = {}
    previous: Dot = ("", 0)
    for i in range(0, len(obj), 3):
        dot = (obj[i], obj[i + 1])
        actor, n = dot
        if (type(actor) is not str or actor == "" or type(n) is not int
                or not 0 < n <= MAX_UINT64 or dot <= previous
                or (n > vv.get(actor, 0) and dot not in cloud)):
            return None
        packed = obj[i + 2]
        if not packed_ok(packed, value_depth):
            return None
        entries[dot] = packed
        previous = dot
    return entries


def merge_entries_docs(a: Entries, ca: ContextDoc, b: Entries, cb: ContextDoc) -> list[Any]:
    """Canonical wire entries of the join (join_entries on the wire form)."""
    out: Entries = {}
    vv, cloud = cb
    for dot, packed in a.items():
        other = b.get(dot)
        if other is not None:
            out[dot] = max(packed, other)
        elif dot[1] > vv.get(dot[0], 0) and dot not in cloud:
            out[dot] = packed
    vv, cloud = ca
    for dot, packed in b.items():
        if dot not in a and dot[1] > vv.get(dot[0], 0) and dot not in cloud:
            out[dot] = packed
    return entries_to_wire(out)


class MVRegister(CausalState[Entries]):
    """Multi-value register. value() -> list of the concurrent values, distinct, in canonical
    order (empty list when unset or cleared).

    Mutators: assign(actor, value) and clear(), each -> delta. clear() removes every value
    it has seen; an assignment concurrent with it survives.
    """

    TYPE_NAME = "mvreg"
    TAG = 2
    __slots__ = ()
    _join = staticmethod(join_entries)
    _read_entries = staticmethod(read_entries)
    _entries_to_wire = staticmethod(entries_to_wire)
    _entries_doc = staticmethod(entries_doc)
    _merge_entries_docs = staticmethod(merge_entries_docs)

    def value(self) -> list[Any]:
        return values_of(self._entries)

    def assign(self, actor: str, value: Any) -> MVRegister:
        """Delta replacing every value this replica has seen with `value`."""
        packed = pack_value(value)
        dot = self._context.next_dot(check_actor(actor))
        return MVRegister._make({dot: packed}, CausalContext.from_dots([dot, *self._entries]))

    def clear(self) -> MVRegister:
        """Delta removing every value this replica has seen."""
        return MVRegister._make({}, CausalContext.from_dots(self._entries))
