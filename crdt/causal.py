# Dots and causal contexts (Almeida, Shoker, Baquero, "Delta State Replicated Data Types",
# 2018): the bookkeeping shared by the causal CRDTs (ORSet, MVRegister, ORMap),
# plus the join of dot sets and dot functions, and the join of contexts as plain wire documents
# (the merge hot path). Pure values; no CRDT types live here.
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from typing import Any, TypeVar

Dot = tuple[str, int]
"""One event: (actor id, that actor's event counter starting at 1)."""

V = TypeVar("V")

# A causal context as the merges of plain wire documents hold it: version vector and dot
# cloud, not necessarily compacted.
ContextDoc = tuple[dict[str, int], AbstractSet[Dot]]


class CausalContext:
    """The set of dots a replica has seen: a version vector plus a dot cloud for the gaps.

    Always kept compacted: a dot covered by the version vector is not in the cloud, and a
    cloud dot that extends an actor's contiguous prefix is folded into the vector. So two
    contexts holding the same dots have the same representation. Immutable.
    """

    __slots__ = ("_vv", "_cloud")
    _vv: dict[str, int]
    _cloud: frozenset[Dot]

    def __init__(self, vv: Mapping[str, int] | None = None, cloud: Iterable[Dot] = ()) -> None:
        vector = {actor: n for actor, n in (vv or {}).items() if n > 0}
        self._vv, self._cloud = compact(vector, cloud)

    @classmethod
    def from_dots(cls, dots: Iterable[Dot]) -> CausalContext:
        """The context holding exactly `dots`."""
        return cls(None, dots)

    @property
    def version_vector(self) -> dict[str, int]:
        """Per actor, the highest counter n such that dots 1..n are all present (a copy)."""
        return dict(self._vv)

    @property
    def cloud(self) -> frozenset[Dot]:
        """Dots present beyond the version vector (with gaps before them)."""
        return self._cloud

    def is_empty(self) -> bool:
        return not self._vv and not self._cloud

    def doc(self) -> tuple[dict[str, int], frozenset[Dot]]:
        """(version vector, cloud) as they are held (read only: for the wire-level merges)."""
        return self._vv, self._cloud

    def contains(self, dot: Dot) -> bool:
        return dot[1] <= self._vv.get(dot[0], 0) or dot in self._cloud

    def next_dot(self, actor: str) -> Dot:
        """A dot for `actor` that is not in this context (one past its highest)."""
        top = self._vv.get(actor, 0)
        for cloud_actor, n in self._cloud:
            if cloud_actor == actor and n > top:
                top = n
        return (actor, top + 1)

    def merge(self, other: CausalContext) -> CausalContext:
        if other is self or other.is_empty():
            return self
        if self.is_empty():
            return other
        vector = dict(self._vv)
        for actor, n in other._vv.items():
            if n > vector.get(actor, 0):
                vector[actor] = n
        merged = CausalContext.__new__(CausalContext)
        merged._vv, merged._cloud = compact(vector, self._cloud | other._cloud)
        return merged

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CausalContext):
            return NotImplemented
        return self._vv == other._vv and self._cloud == other._cloud

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"CausalContext({dict(sorted(self._vv.items()))!r}, {sorted(self._cloud)!r})"


def compact(vector: dict[str, int], cloud: Iterable[Dot]) -> tuple[dict[str, int], frozenset[Dot]]:
    # Sorted by (actor, counter), so each actor's contiguous run folds in one pass.
    rest = []
    for dot in sorted(cloud):
        actor, n = dot
        top = vector.get(actor, 0)
        if n <= top:
            continue
        if n == top + 1:
            vector[actor] = n
        else:
            rest.append(dot)
    return vector, frozenset(rest)


def join_dot_sets(a: frozenset[Dot], ca: CausalContext,
                  b: frozenset[Dot], cb: CausalContext) -> frozenset[Dot]:
    """Dots in both, plus dots of one side the other side has not seen (so not removed)."""
    if a == b:
        return a
    kept = a & b
    kept |= {dot for dot in a - b if not cb.contains(dot)}
    kept |= {dot for dot in b - a if not ca.contains(dot)}
    return frozenset(kept)


def join_dot_funs(a: Mapping[Dot, V], ca: CausalContext, b: Mapping[Dot, V], cb: CausalContext,
                  join_values: Callable[[V, V], V]) -> dict[Dot, V]:
    """Join of two dot -> value maps: like join_dot_sets on the keys; a dot on both sides
    keeps the join of its two values."""
    out: dict[Dot, V] = {}
    for dot, value in a.items():
        if dot in b:
            other = b[dot]
            out[dot] = value if value == other else join_values(value, other)
        elif not cb.contains(dot):
            out[dot] = value
    for dot, value in b.items():
        if dot not in a and not ca.contains(dot):
            out[dot] = value
    return out


def unseen(dots: Iterable[Dot], context: ContextDoc) -> list[Dot]:
    """The dots not in a context."""
    vv, cloud = context
    return [dot for dot in dots if dot[1] > vv.get(dot[0], 0) and dot not in cloud]


def merge_context_docs(a: ContextDoc, b: ContextDoc) -> list[Any]:
    """Canonical wire form of the join of two contexts (compacted, sorted)."""
    vv = a[0].copy()
    for actor, n in b[0].items():
        if n > vv.get(actor, 0):
            vv[actor] = n
    return context_doc_to_wire(vv, a[1] | b[1])


def context_doc_to_wire(vv: dict[str, int], cloud: Iterable[Dot]) -> list[Any]:
    """Canonical wire form of a context (compacted, sorted); compacting changes `vv` in
    place, so pass a dict nothing else holds."""
    vv, rest = compact(vv, cloud)
    flat: list[Any] = []
    for actor in sorted(vv):
        flat += (actor, vv[actor])
    cloud_flat: list[Any] = []
    for dot in sorted(rest):
        cloud_flat += dot
    return [flat, cloud_flat]
