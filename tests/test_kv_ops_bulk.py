# The store's ops over many members at once (sadd, srem, and the delete of a whole set or
# map), sans-IO: each makes exactly the delta the member-by-member loop of single mutations
# makes (Hypothesis), and check_op refuses an op naming more members than MAX_MEMBERS_PER_OP.
# Their cost is measured by benchmarks/bulk_ops.py, not here.
from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import crdt
from kv.ops import (
    MAX_KEY_BYTES,
    MAX_MEMBERS_PER_OP,
    MAX_VALUE_BYTES,
    Op,
    OpError,
    check_op,
    make_delta,
)

ACTORS = ("node-a", "node-b")
NOW_MS = 1_700_000_000_000
MEMBERS = st.one_of(st.integers(-3, 20), st.sampled_from(["x", "y", "", b"x", None, 1.5]))


def one_by_one(state: Any, members: list[Any], mutator: Any) -> tuple[Any, Any]:
    """The reference: the join of the single-member deltas, each made on the state the ones
    before it left; and that state."""
    joined = crdt.new(state.TYPE_NAME)
    for member in members:
        step = mutator(state, member)
        state, joined = state.merge(step), joined.merge(step)
    return joined, state


@st.composite
def sets(draw: st.DrawFn) -> Any:
    """A set two actors have added to and removed from, one member at a time."""
    state = crdt.ORSet()
    for actor, member, adding in draw(st.lists(st.tuples(st.sampled_from(ACTORS), MEMBERS,
                                                         st.booleans()), max_size=30)):
        state = state.merge(state.add(actor, member) if adding else state.remove(member))
    return state


@settings(max_examples=80, deadline=None)
@given(state=sets(), members=st.lists(MEMBERS, min_size=1, max_size=40),
       actor=st.sampled_from(ACTORS))
def test_sadd_and_srem_of_many_members_equal_the_member_by_member_result(
        state: Any, members: list[Any], actor: str) -> None:
    start = None if state.is_empty() else state
    for kind, mutator in (("sadd", lambda s, m: s.add(actor, m)),
                          ("srem", lambda s, m: s.remove(m))):
        delta = make_delta(Op(kind, b"k", tuple(members)), start, actor, crdt.HLC(), NOW_MS)
        if start is None and kind == "srem":
            assert delta is None  # removing from a missing key does not create it
            continue
        expected_delta, expected = one_by_one(state, members, mutator)
        assert delta == expected_delta
        merged = state.merge(delta)
        assert merged.value() == expected.value()
        # what a store does with it: merge the encoded delta into the encoded state
        assert crdt.merge_encoded(crdt.encode(state), crdt.encode(delta)) == crdt.encode(expected)


@settings(max_examples=40, deadline=None)
@given(state=sets(), fields=st.lists(st.tuples(st.sampled_from(["f", "g", "h", "i"]),
                                               st.integers(0, 9)), max_size=12))
def test_delete_of_a_whole_set_or_map_equals_removing_member_by_member(
        state: Any, fields: list[tuple[str, int]]) -> None:
    the_map = crdt.ORMap()
    for field, value in fields:
        the_map = the_map.merge(the_map.update(ACTORS[value % 2], field, "pncounter",
                                               lambda c, v=value: c.increment(ACTORS[0], v)))
    for current, mutator in ((state, lambda s, m: s.remove(m)),
                             (the_map, lambda s, k: s.remove(k))):
        delta = make_delta(Op("delete", b"k"), current, ACTORS[0], crdt.HLC(), NOW_MS)
        expected_delta, expected = one_by_one(current, list(current.value()), mutator)
        assert delta == expected_delta
        assert current.merge(delta) == expected and not expected.value()


def test_many_members_get_a_dot_each_and_the_delete_takes_them_all() -> None:
    members = tuple(f"member-{i}" for i in range(MAX_MEMBERS_PER_OP))
    delta = make_delta(Op("sadd", b"k", members + members[:3]), None, "node-a", crdt.HLC(),
                       NOW_MS)
    assert len(delta) == MAX_MEMBERS_PER_OP
    assert delta.context.version_vector == {"node-a": MAX_MEMBERS_PER_OP + 3}
    gone = make_delta(Op("delete", b"k"), delta, "node-a", crdt.HLC(), NOW_MS)
    assert delta.merge(gone).value() == []


@pytest.mark.parametrize("kind", ["sadd", "srem"])
def test_an_op_naming_more_members_than_the_cap_is_refused(kind: str) -> None:
    at_cap = Op(kind, b"tags", tuple(range(MAX_MEMBERS_PER_OP)))
    assert check_op(at_cap, MAX_KEY_BYTES, MAX_VALUE_BYTES) > 0
    over = Op(kind, b"tags", tuple(range(MAX_MEMBERS_PER_OP + 1)))
    with pytest.raises(OpError) as refused:
        check_op(over, MAX_KEY_BYTES, MAX_VALUE_BYTES)
    assert refused.value.code == "too_large"
    assert str(refused.value) == (f"{kind} of 'tags' names {MAX_MEMBERS_PER_OP + 1} members, "
                                  f"limit {MAX_MEMBERS_PER_OP} per operation")
