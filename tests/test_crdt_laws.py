# Lattice laws for every CRDT type, over states reached by random histories of replicas that
# mutate and merge: join is commutative, associative and idempotent, mutators inflate, deltas
# are as good as full states, and the encoding round-trips canonically.
from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt import (
    TYPE_NAMES,
    LWWRegister,
    MVRegister,
    ORMap,
    ORSet,
    State,
    Timestamp,
    decode,
    encode,
    merge_encoded,
    new,
)
from crdt.values import pack_value

ACTORS = ("a", "b", "c")
# Small pool so histories collide; the two dicts are equal, built in different key orders.
VALUES: list[Any] = [None, True, 0, 1, 1.0, "x", "y", b"x", [1, "x"],
                     {"k": [1, 2], "a": None}, {"a": None, "k": [1, 2]}]
# ORMap keys and the nested type each update uses; "x" is fought over by two types.
MAP_FIELDS = [("s", "orset"), ("c", "gcounter"), ("r", "lww"), ("m", "mvreg"),
              ("p", "pncounter"), ("n", "ormap"), ("x", "orset"), ("x", "gcounter")]

Op = tuple[int, int, int, int]
OPS = st.tuples(st.integers(0, 11), st.integers(0, len(VALUES) - 1), st.integers(0, 3),
                st.integers(0, 2))

SETTINGS = settings(max_examples=60, deadline=None)


def apply_op(type_name: str, state: Any, actor: str, op: Op, depth: int = 0) -> State:
    """Run one mutator chosen by `op` on `state`; returns its delta."""
    kind, index, a, b = op
    value = VALUES[index]
    if type_name == "lww":
        if kind % 4 == 3:
            return state.delete(Timestamp(a, b), actor)
        return state.assign(value, Timestamp(a, b), actor)
    if type_name == "mvreg":
        return state.clear() if kind % 4 == 3 else state.assign(actor, value)
    if type_name == "gcounter":
        return state.increment(actor, a + 1)
    if type_name == "pncounter":
        step = state.decrement if kind % 2 else state.increment
        return step(actor, a + 1)
    if type_name == "orset":
        return state.remove(value) if kind % 3 == 2 else state.add(actor, value)
    assert type_name == "ormap"
    fields = MAP_FIELDS if depth == 0 else [f for f in MAP_FIELDS if f[1] != "ormap"]
    key, nested_type = fields[(kind + index) % len(fields)]
    if b == 2 and kind % 2:
        return state.remove(key)
    held = state.get(key)
    if held is not None and held.TYPE_NAME != nested_type:
        return ORMap()  # the key already holds another type here: nothing to do
    nested_op = ((kind + 1) % 12, index, a, b)
    return state.update(
        actor, key, nested_type,
        lambda nested: apply_op(nested_type, nested, actor, nested_op, depth + 1))


@st.composite
def histories(draw: st.DrawFn, type_name: str) -> tuple[list[State], list[State]]:
    """Replica states and every delta produced, after random mutations and merges."""
    replicas: list[State] = [new(type_name) for _ in ACTORS]
    deltas: list[State] = []
    steps = draw(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2), st.booleans(), OPS),
                          max_size=14))
    for i, j, is_merge, op in steps:
        if is_merge:
            replicas[i] = replicas[i].merge(replicas[j])
        else:
            delta = apply_op(type_name, replicas[i], ACTORS[i], op)
            deltas.append(delta)
            replicas[i] = replicas[i].merge(delta)
    return replicas, deltas


@st.composite
def state_triples(draw: st.DrawFn, type_name: str) -> tuple[State, State, State]:
    replicas, deltas = draw(histories(type_name))
    pool = replicas + deltas
    pick = st.sampled_from(pool)
    return draw(pick), draw(pick), draw(pick)


types = pytest.mark.parametrize("type_name", TYPE_NAMES)


@types
@SETTINGS
@given(data=st.data())
def test_merge_is_commutative_associative_idempotent(type_name: str, data: st.DataObject) -> None:
    x, y, z = data.draw(state_triples(type_name))
    assert x.merge(y) == y.merge(x)
    assert x.merge(y).merge(z) == x.merge(y.merge(z))
    assert x.merge(x) == x
    # Canonical: equal states, whatever their merge order, encode to identical bytes.
    assert encode(x.merge(y).merge(z)) == encode(z.merge(x).merge(y))


@types
@SETTINGS
@given(data=st.data())
def test_merge_does_not_change_its_inputs(type_name: str, data: st.DataObject) -> None:
    x, y, _ = data.draw(state_triples(type_name))
    before = encode(x), encode(y)
    x.merge(y)
    y.merge(x)
    assert (encode(x), encode(y)) == before


@types
@SETTINGS
@given(data=st.data())
def test_mutators_inflate_and_deltas_equal_full_states(type_name: str,
                                                        data: st.DataObject) -> None:
    replicas, _ = data.draw(histories(type_name))
    i = data.draw(st.integers(0, 2))
    state, op = replicas[i], data.draw(OPS)
    delta = apply_op(type_name, state, ACTORS[i], op)
    mutated = state.merge(delta)
    assert state.merge(mutated) == mutated  # inflation: state <= m(state)
    assert delta.merge(mutated) == mutated  # the delta is part of the new state
    # Delta law: any replica that already has `state` gets the same from the delta as from
    # the whole mutated state.
    for other in replicas:
        ahead = other.merge(state)
        assert ahead.merge(delta) == ahead.merge(mutated)
    check_effect(type_name, state, mutated, ACTORS[i], op)


def check_effect(type_name: str, before: Any, after: Any, actor: str, op: Op) -> None:
    """The sequential meaning of each mutator, seen on the replica that ran it."""
    kind, index, a, b = op
    packed = pack_value(VALUES[index])
    if type_name == "lww":
        deleting = kind % 4 == 3
        newer = before.timestamp is None or (Timestamp(a, b), actor) > (before.timestamp,
                                                                         before.actor)
        if newer:
            assert (after.timestamp, after.actor, after.deleted) == (Timestamp(a, b), actor,
                                                                      deleting)
            assert pack_value(after.value()) == (pack_value(None) if deleting else packed)
        else:
            assert (after.timestamp, after.actor) == (before.timestamp, before.actor)
    elif type_name == "mvreg":
        expected = [] if kind % 4 == 3 else [packed]
        assert [pack_value(v) for v in after.value()] == expected
    elif type_name == "gcounter":
        assert after.value() == before.value() + a + 1
    elif type_name == "pncounter":
        assert after.value() == before.value() + (-(a + 1) if kind % 2 else a + 1)
    elif type_name == "orset":
        assert after.contains(VALUES[index]) == (kind % 3 != 2)
        others = {pack_value(v) for v in before.value()} - {packed}
        assert {pack_value(v) for v in after.value()} - {packed} == others


@types
@SETTINGS
@given(data=st.data())
def test_encoding_round_trips_and_merge_encoded_agrees(type_name: str,
                                                       data: st.DataObject) -> None:
    x, y, _ = data.draw(state_triples(type_name))
    for state in (x, y):
        blob = encode(state)
        assert decode(blob) == state
        assert type(state).decode(blob) == state
        assert encode(decode(blob)) == blob
    assert merge_encoded(encode(x), encode(y)) == encode(x.merge(y))
    assert merge_encoded(None, encode(y)) == encode(y)


@types
@SETTINGS
@given(data=st.data())
def test_equal_states_from_different_delivery_orders_encode_identically(
        type_name: str, data: st.DataObject) -> None:
    _, deltas = data.draw(histories(type_name))
    shuffled = data.draw(st.permutations(deltas))
    forward, backward = new(type_name), new(type_name)
    for delta in deltas:
        forward = forward.merge(delta)
    for delta in shuffled:
        backward = backward.merge(delta)
    assert forward == backward
    assert encode(forward) == encode(backward)


def test_equal_values_built_differently_share_bytes() -> None:
    one, two = ORSet(), ORSet()
    one = one.merge(one.add("a", {"b": 1, "a": [1, {"y": 2, "x": 1}]}))
    two = two.merge(two.add("a", {"a": [1, {"x": 1, "y": 2}], "b": 1}))
    assert one == two and encode(one) == encode(two)
    reg_one = LWWRegister().assign({"q": 1, "p": 2}, Timestamp(1, 0), "a")
    reg_two = LWWRegister().assign({"p": 2, "q": 1}, Timestamp(1, 0), "a")
    assert encode(reg_one) == encode(reg_two)
    # Different msgpack types stay different values (an int is not a float or a bool).
    values = MVRegister()
    values = values.merge(values.assign("a", 1)).merge(values.assign("b", 1.0))
    assert encode(values) != encode(MVRegister().merge(MVRegister().assign("a", 1)))


@types
def test_new_gives_the_empty_state_of_each_type(type_name: str) -> None:
    empty = new(type_name)
    assert empty.TYPE_NAME == type_name and empty.is_empty()
    assert decode(encode(empty)) == empty
    with pytest.raises(ValueError, match="unknown CRDT type name"):
        new("nope")


def _one_by_one(state: Any, mutators: list[Any]) -> tuple[State, State]:
    """The join of the deltas of `mutators` run in turn, each on the state the ones before
    it left, and that final state."""
    joined = new(state.TYPE_NAME)
    for mutator in mutators:
        step = mutator(state)
        state, joined = state.merge(step), joined.merge(step)
    return joined, state


@SETTINGS
@given(data=st.data())
def test_bulk_mutators_make_the_delta_of_one_mutation_after_another(data: st.DataObject) -> None:
    # ORSet.add_many / remove_many and ORMap.remove_many (the KV store's sadd, srem and
    # delete of many members in one op) must be exactly the member-by-member joins: same
    # delta (so a valid delta: the delta law above holds for it), same state, a distinct dot
    # per add, repeats included
    sets, _ = data.draw(histories("orset"))
    maps, _ = data.draw(histories("ormap"))
    i = data.draw(st.integers(0, 2))
    actor = ACTORS[i]
    members = [VALUES[k] for k in data.draw(st.lists(st.integers(0, len(VALUES) - 1),
                                                     min_size=1, max_size=12))]
    state = sets[i]
    for bulk, mutators in (
            (state.add_many(actor, members), [lambda s, m=m: s.add(actor, m) for m in members]),
            (state.remove_many(members), [lambda s, m=m: s.remove(m) for m in members])):
        delta, mutated = _one_by_one(state, mutators)
        assert bulk == delta
        assert state.merge(bulk) == mutated
        assert encode(state.merge(bulk)) == encode(mutated)
        for other in sets:
            ahead = other.merge(state)
            assert ahead.merge(bulk) == ahead.merge(mutated)
    added = state.add_many(actor, members)  # a fresh dot for each member given
    first = state.context.next_dot(actor)[1]
    fresh = [(actor, first + k) for k in range(len(members))]
    assert all(added.context.contains(d) and not state.context.contains(d) for d in fresh)
    assert not added.context.contains((actor, first + len(members)))
    the_map = maps[i]
    keys = data.draw(st.lists(st.sampled_from([key for key, _ in MAP_FIELDS] + ["absent"]),
                              min_size=1, max_size=6))
    bulk = the_map.remove_many(keys)
    delta, mutated = _one_by_one(the_map, [lambda m, k=k: m.remove(k) for k in keys])
    assert bulk == delta and the_map.merge(bulk) == mutated
