# PN-counter: a counter that goes up and down, as two G-counters (increments P, decrements N;
# value = sum P - sum N). Join: per-actor maximum on each side. Delta form per Almeida et
# al. 2018. Nothing but this type lives here.
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .codec import Reader, State, check_actor, counts_ok, sorted_counts
from .gcounter import check_amount, checked_counts, join_counts, merge_wire_counts


class PNCounter(State):
    """Counter with increment and decrement. value() -> int.

    Mutators: increment(actor, n=1) and decrement(actor, n=1), each -> delta; n >= 0.
    """

    TYPE_NAME = "pncounter"
    TAG = 4
    __slots__ = ("_up", "_down")
    _up: dict[str, int]
    _down: dict[str, int]

    def __init__(self, up: Mapping[str, int] | None = None,
                 down: Mapping[str, int] | None = None) -> None:
        self._up = checked_counts(up)
        self._down = checked_counts(down)

    @classmethod
    def _make(cls, up: dict[str, int], down: dict[str, int]) -> PNCounter:
        state = cls.__new__(cls)
        state._up = up
        state._down = down
        return state

    def value(self) -> int:
        return sum(self._up.values()) - sum(self._down.values())

    def is_empty(self) -> bool:
        return not self._up and not self._down

    def increment(self, actor: str, n: int = 1) -> PNCounter:
        check_actor(actor)
        if check_amount(n) == 0:
            return PNCounter()
        return PNCounter._make({actor: self._up.get(actor, 0) + n}, {})

    def decrement(self, actor: str, n: int = 1) -> PNCounter:
        check_actor(actor)
        if check_amount(n) == 0:
            return PNCounter()
        return PNCounter._make({}, {actor: self._down.get(actor, 0) + n})

    def merge(self, other: PNCounter) -> PNCounter:
        self._check_same_type(other)
        up = join_counts(self._up, other._up)
        down = join_counts(self._down, other._down)
        if up is self._up and down is self._down:
            return self
        if up is other._up and down is other._down:
            return other
        return PNCounter._make(up, down)

    def wire_body(self) -> list[Any]:
        return [sorted_counts(self._up), sorted_counts(self._down)]

    @classmethod
    def from_wire_body(cls, body: list[Any], reader: Reader, depth: int) -> PNCounter:
        up, down = reader.fields(body, cls.TYPE_NAME, 2)
        return cls._make(reader.counts(up, "pncounter increments", depth + 1),
                         reader.counts(down, "pncounter decrements", depth + 1))

    @classmethod
    def merge_docs(cls, current: list[Any], incoming: list[Any], reader: Reader) -> list[Any]:
        if len(current) == 4 and len(incoming) == 4:
            mine_up, mine_down, theirs_up, theirs_down = (
                current[2], current[3], incoming[2], incoming[3])
            if (counts_ok(mine_up) and counts_ok(mine_down) and counts_ok(theirs_up)
                    and counts_ok(theirs_down)):
                return [cls.TAG, cls.VERSION, merge_wire_counts(mine_up, theirs_up),
                        merge_wire_counts(mine_down, theirs_down)]
        return super().merge_docs(current, incoming, reader)

    @classmethod
    def checked_doc(cls, doc: list[Any], reader: Reader) -> list[Any]:
        if len(doc) == 4 and counts_ok(doc[2]) and counts_ok(doc[3]):
            return doc  # checked wire bodies are canonical as they are
        return super().checked_doc(doc, reader)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PNCounter):
            return NotImplemented
        return self._up == other._up and self._down == other._down

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"PNCounter({dict(sorted(self._up.items()))!r}, "
                f"{dict(sorted(self._down.items()))!r})")
