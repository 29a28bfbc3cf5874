# Model test: replicas mutate at random and ship deltas over a network that loses, duplicates
# and reorders them, with occasional full-state merges. After every step each replica's value
# must equal a sequential specification computed from the events it knows of (no dots, no
# contexts: plain sets of events), and after a final full exchange all replicas are equal
# and equal the specification over every event.
from __future__ import annotations

from dataclasses import dataclass, field
from functools import reduce
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt import GCounter, MVRegister, ORMap, ORSet, PNCounter, State, decode, encode
from crdt.values import pack_value

ACTORS = ("a", "b", "c")
ELEMENTS: list[Any] = ["x", "y", 3, [1, 2]]


@dataclass(frozen=True)
class Event:
    """One mutation. `supersedes`: events it observed and replaces (adds it removed, older
    assignments it overwrote). `key` is the map key for ORMap events."""

    ident: int
    actor: str
    kind: str
    element: Any = None
    amount: int = 0
    key: str = ""
    supersedes: frozenset[int] = frozenset()
    whole: dict[str, int] = field(default_factory=dict)  # full counter state (ORMap "c")


class Model:
    """Sequential specification over known events, one per CRDT type under test."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name
        self.events: dict[int, Event] = {}

    def live(self, known: set[int], predicate: Any) -> list[Event]:
        dead: set[int] = set()
        for ident in known:
            dead |= self.events[ident].supersedes
        return [self.events[i] for i in sorted(known - dead) if predicate(self.events[i])]

    def value(self, known: set[int]) -> Any:
        events = [self.events[i] for i in sorted(known)]
        if self.type_name == "gcounter":
            return sum(e.amount for e in events)
        if self.type_name == "pncounter":
            return sum(e.amount if e.kind == "inc" else -e.amount for e in events)
        if self.type_name == "orset":
            live = self.live(known, lambda e: e.kind == "add")
            return sorted({pack_value(e.element) for e in live})
        if self.type_name == "mvreg":
            live = self.live(known, lambda e: e.kind == "assign")
            return sorted({pack_value(e.element) for e in live})
        assert self.type_name == "ormap"
        out: dict[str, Any] = {}
        elements = {pack_value(e.element)
                    for e in self.live(known, lambda e: e.key == "s" and e.kind == "add")}
        if elements:
            out["s"] = sorted(elements)
        updates = self.live(known, lambda e: e.key == "c" and e.kind == "update")
        counters = [e.whole for e in updates]
        if counters:
            out["c"] = sum(reduce(_max_counts, counters, {}).values())
        return out

    def implied(self, ident: int) -> set[int]:
        """Events a replica learns from one delta: a counter delta carries the actor's
        total, so it implies that actor's earlier events of the same kind."""
        event = self.events[ident]
        if self.type_name in ("gcounter", "pncounter"):
            return {i for i, e in self.events.items()
                    if e.actor == event.actor and e.kind == event.kind and i <= ident}
        return {ident}


def _max_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: max(a.get(k, 0), b.get(k, 0)) for k in a.keys() | b.keys()}


def observed_value(type_name: str, state: Any) -> Any:
    if type_name in ("gcounter", "pncounter"):
        return state.value()
    if type_name in ("orset", "mvreg"):
        return sorted(pack_value(v) for v in state.value())
    out = {}
    for key, value in state.value().items():
        out[key] = value if key == "c" else sorted(pack_value(v) for v in value)
    return out


def mutate(type_name: str, model: Model, state: Any, known: set[int], actor: str,
           choice: int, element: Any, amount: int) -> tuple[State, Event]:
    ident = len(model.events)

    def live_where(predicate: Any) -> frozenset[int]:
        return frozenset(e.ident for e in model.live(known, predicate))

    if type_name == "gcounter":
        return state.increment(actor, amount), Event(ident, actor, "inc", amount=amount)
    if type_name == "pncounter":
        kind = "dec" if choice % 2 else "inc"
        step = state.decrement if kind == "dec" else state.increment
        return step(actor, amount), Event(ident, actor, kind, amount=amount)
    if type_name == "orset":
        same = live_where(lambda e: e.kind == "add" and e.element == element)
        if choice % 3 == 2:
            return state.remove(element), Event(ident, actor, "remove", element, supersedes=same)
        return state.add(actor, element), Event(ident, actor, "add", element, supersedes=same)
    if type_name == "mvreg":
        seen = live_where(lambda e: e.kind == "assign")
        if choice % 4 == 3:
            return state.clear(), Event(ident, actor, "clear", supersedes=seen)
        return state.assign(actor, element), Event(ident, actor, "assign", element,
                                                   supersedes=seen)
    assert type_name == "ormap"
    if choice % 5 == 4:  # remove a key: supersedes everything live under it
        key = "s" if amount % 2 else "c"
        seen = live_where(lambda e: e.key == key)
        return state.remove(key), Event(ident, actor, "remove", key=key, supersedes=seen)
    if choice % 5 == 3:  # counter field: the updater's whole view plus its increment
        seen_events = model.live(known, lambda e: e.key == "c" and e.kind == "update")
        whole = reduce(_max_counts, [e.whole for e in seen_events], {})
        whole = {**whole, actor: whole.get(actor, 0) + amount}
        delta = state.update(actor, "c", "gcounter", lambda c: c.increment(actor, amount))
        return delta, Event(ident, actor, "update", key="c", whole=whole,
                            supersedes=frozenset(e.ident for e in seen_events))
    same = live_where(lambda e: e.key == "s" and e.element == element)
    if choice % 5 == 2:
        delta = state.update(actor, "s", "orset", lambda s: s.remove(element))
        return delta, Event(ident, actor, "remove", element, key="s", supersedes=same)
    delta = state.update(actor, "s", "orset", lambda s: s.add(actor, element))
    return delta, Event(ident, actor, "add", element, key="s", supersedes=same)


STEP = st.one_of(
    st.tuples(st.just("op"), st.integers(0, 2), st.integers(0, 9),
              st.sampled_from(ELEMENTS), st.integers(1, 3)),
    st.tuples(st.just("deliver"), st.integers(0, 10**6), st.booleans()),
    st.tuples(st.just("drop"), st.integers(0, 10**6)),
    st.tuples(st.just("sync"), st.integers(0, 2), st.integers(0, 2)),
)

EMPTY = {"gcounter": GCounter, "pncounter": PNCounter, "orset": ORSet, "mvreg": MVRegister,
         "ormap": ORMap}


@pytest.mark.parametrize("type_name", sorted(EMPTY))
@settings(max_examples=150, deadline=None)
@given(schedule=st.lists(STEP, min_size=1, max_size=60))
def test_replicas_converge_to_the_specification(type_name: str,
                                                schedule: list[tuple[Any, ...]]) -> None:
    model = Model(type_name)
    states: list[Any] = [EMPTY[type_name]() for _ in ACTORS]
    known: list[set[int]] = [set() for _ in ACTORS]
    network: list[tuple[int, bytes, int]] = []  # (destination, encoded delta, event id)
    for step in schedule:
        if step[0] == "op":
            _, i, choice, element, amount = step
            delta, event = mutate(type_name, model, states[i], known[i], ACTORS[i], choice,
                                  element, amount)
            model.events[event.ident] = event
            states[i] = states[i].merge(delta)
            known[i] |= model.implied(event.ident)
            network += [(j, encode(delta), event.ident) for j in range(3) if j != i]
        elif step[0] in ("deliver", "drop") and network:
            index = step[1] % len(network)
            destination, blob, ident = network[index]
            if step[0] == "drop" or not step[2]:
                del network[index]  # else: delivered and still queued, so it comes again
            if step[0] == "deliver":
                states[destination] = states[destination].merge(decode(blob))
                known[destination] |= model.implied(ident)
        elif step[0] == "sync":
            _, i, j = step
            states[i] = states[i].merge(decode(encode(states[j])))
            known[i] |= known[j]
        for i in range(3):
            assert observed_value(type_name, states[i]) == model.value(known[i])

    everything = reduce(lambda a, b: a.merge(b), states)
    finals = [state.merge(everything) for state in states]
    assert all(final == finals[0] for final in finals)
    assert observed_value(type_name, finals[0]) == model.value(set(model.events))
