# G-counter: a grow-only counter, one entry per actor (Shapiro et al., "A comprehensive study
# of Convergent and Commutative Replicated Data Types", 2011; delta form per Almeida et al.
# 2018). State: actor -> that actor's total, all totals >= 1. Join: per-actor maximum.
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .codec import MAX_UINT64, Reader, State, check_actor, counts_ok, sorted_counts


def check_amount(n: object) -> int:
    if type(n) is not int or n < 0:
        raise ValueError(f"amount must be an int >= 0, got {n!r}")
    return n


def checked_counts(counts: Mapping[str, int] | None) -> dict[str, int]:
    """A checked copy of an actor -> count mapping, zero counts left out."""
    out: dict[str, int] = {}
    for actor, n in (counts or {}).items():
        if check_amount(n):
            out[check_actor(actor)] = n
    return out


def join_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """Per-actor maximum of two count maps; returns `a` or `b` itself when it is the join."""
    if a is b or not b:
        return a
    out = None
    for actor, n in b.items():
        if n > a.get(actor, 0):
            if out is None:
                out = a.copy()
            out[actor] = n
    if out is None:
        return a
    return b if out == b else out


def merge_wire_counts(mine: dict[str, int], theirs: dict[str, int]) -> dict[str, int]:
    """Wire form of the join of two checked wire count maps (one of them when it wins)."""
    if not theirs:
        return mine
    if not mine:
        return theirs
    if len(theirs) == 1:  # the common delta: one actor's new total
        for actor, n in theirs.items():
            held = mine.get(actor)
            if held is not None and n <= held:
                return mine
            joined = mine.copy()
            joined[actor] = n
            if held is None and actor < next(reversed(mine)):
                return sorted_counts(joined)
            return joined
    joined = join_counts(mine, theirs)
    if joined is mine or joined is theirs or len(joined) == len(mine):
        return joined  # either input, or `mine` with some counts raised: still sorted
    return sorted_counts(joined)


class GCounter(State):
    """Grow-only counter. value() -> int. Mutator: increment(actor, n=1) -> delta."""

    TYPE_NAME = "gcounter"
    TAG = 3
    __slots__ = ("_counts",)
    _counts: dict[str, int]

    def __init__(self, counts: Mapping[str, int] | None = None) -> None:
        self._counts = checked_counts(counts)

    @classmethod
    def _make(cls, counts: dict[str, int]) -> GCounter:
        state = cls.__new__(cls)
        state._counts = counts
        return state

    def value(self) -> int:
        return sum(self._counts.values())

    def counts(self) -> dict[str, int]:
        """Each actor's total (a copy)."""
        return dict(self._counts)

    def is_empty(self) -> bool:
        return not self._counts

    def increment(self, actor: str, n: int = 1) -> GCounter:
        """Delta adding n (>= 0) on behalf of `actor`: that actor's new total (n = 0: an
        empty delta)."""
        check_actor(actor)
        if check_amount(n) == 0:
            return GCounter()
        return GCounter._make({actor: self._counts.get(actor, 0) + n})

    def merge(self, other: GCounter) -> GCounter:
        self._check_same_type(other)
        counts = join_counts(self._counts, other._counts)
        if counts is self._counts:
            return self
        if counts is other._counts:
            return other
        return GCounter._make(counts)

    def wire_body(self) -> list[Any]:
        return [sorted_counts(self._counts)]

    @classmethod
    def from_wire_body(cls, body: list[Any], reader: Reader, depth: int) -> GCounter:
        (counts,) = reader.fields(body, cls.TYPE_NAME, 1)
        return cls._make(reader.counts(counts, "gcounter counts", depth + 1))

    @classmethod
    def merge_docs(cls, current: list[Any], incoming: list[Any], reader: Reader) -> list[Any]:
        if len(current) == 3 and len(incoming) == 3:
            mine, theirs = current[2], incoming[2]
            if type(theirs) is dict and len(theirs) == 1 and counts_ok(mine):
                # the common delta, one actor's new total: counts_ok and merge_wire_counts
                # inlined for it
                for actor, n in theirs.items():
                    if type(actor) is str and actor and type(n) is int and 0 < n <= MAX_UINT64:
                        held = mine.get(actor)
                        if held is not None and n <= held:
                            return current  # [TAG, VERSION, mine]: the type was checked
                        joined = mine.copy()
                        joined[actor] = n
                        if held is None and mine and actor < next(reversed(mine)):
                            joined = sorted_counts(joined)
                        return [cls.TAG, cls.VERSION, joined]
            if counts_ok(mine) and counts_ok(theirs):
                return [cls.TAG, cls.VERSION, merge_wire_counts(mine, theirs)]
        return super().merge_docs(current, incoming, reader)

    @classmethod
    def checked_doc(cls, doc: list[Any], reader: Reader) -> list[Any]:
        if len(doc) == 3 and counts_ok(doc[2]):
            return doc  # a checked wire body is canonical as it is
        return super().checked_doc(doc, reader)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GCounter):
            return NotImplemented
        return self._counts == other._counts

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"GCounter({dict(sorted(self._counts.items()))!r})"

