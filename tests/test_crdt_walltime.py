# crdt.latest_wall: the latest wall time an encoded state carries equals the maximum over the
# decoded object tree, for random nested states; anything malformed is a DecodeError.
from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_crdt_laws import histories

from crdt import (
    TYPE_NAMES,
    DecodeError,
    GCounter,
    LWWRegister,
    ORMap,
    ORSet,
    State,
    Timestamp,
    decode,
    encode,
    latest_wall,
    new,
)

WALLS = st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 300),
                  st.sampled_from([0, 127, 128, 255, 256, 2**16, 2**32, 2**64 - 1]))
ACTORS = st.sampled_from(["a", "b", "c"])


def tree_wall(state: State) -> int:
    """The expected answer, from the decoded objects: every register write the state holds."""
    if isinstance(state, LWWRegister):
        return 0 if state.timestamp is None else state.timestamp.wall
    if isinstance(state, ORMap):
        walls = [0]
        for (_, type_name), store in state._entries.items():
            if type_name == "lww":
                walls += [tree_wall(register) for register in store.values()]
            elif type_name == "ormap":
                walls.append(tree_wall(ORMap._make(store, state.context)))
        return max(walls)
    return 0


@st.composite
def nested_maps(draw: st.DrawFn, depth: int = 0) -> ORMap:
    """A map built by random updates of registers (any wall), nested maps, sets and counters,
    merged from several actors so fields hold several registers."""
    state = ORMap()
    for _ in range(draw(st.integers(0, 5))):
        actor = draw(ACTORS)
        key = draw(st.sampled_from(["r", "s", "n", "c", "q"]))
        kind = draw(st.sampled_from(["lww", "orset", "gcounter"]
                                    + (["ormap"] if depth < 3 else [])))
        if any(k == key and t != kind for k, t in state._entries):
            continue
        if kind == "lww":
            wall, logical = draw(WALLS), draw(st.integers(0, 3))
            delta = state.update(actor, key, "lww",
                                 lambda r, w=wall, lg=logical, a=actor:
                                 r.assign(w, Timestamp(w, lg), a))
        elif kind == "orset":
            delta = state.update(actor, key, "orset", lambda s, a=actor: s.add(a, 1))
        elif kind == "gcounter":
            delta = state.update(actor, key, "gcounter", lambda c, a=actor: c.increment(a, 2))
        else:
            inner = draw(nested_maps(depth + 1))
            delta = state.update(actor, key, "ormap", lambda m, i=inner: i)
        state = state.merge(delta)
        if draw(st.booleans()) and key in state.keys():
            other = draw(ACTORS)
            wall = draw(WALLS)
            if kind == "lww":  # a concurrent write of the same field by another actor
                state = state.merge(ORMap().update(
                    other, key, "lww", lambda r, w=wall, a=other: r.assign(0, Timestamp(w, 0), a)))
    return state


@settings(max_examples=200, deadline=None)
@given(state=nested_maps())
def test_latest_wall_of_nested_maps_is_the_max_over_the_tree(state: ORMap) -> None:
    data = encode(state)
    assert latest_wall(data) == tree_wall(decode(data)) == tree_wall(state)


@settings(max_examples=200, deadline=None)
@given(wall=WALLS, logical=st.integers(0, 2**64 - 1), deleted=st.booleans())
def test_latest_wall_of_a_register_is_its_wall(wall: int, logical: int, deleted: bool) -> None:
    register = LWWRegister()
    delta = (register.delete(Timestamp(wall, logical), "x") if deleted
             else register.assign({"v": [1, 2]}, Timestamp(wall, logical), "x"))
    assert latest_wall(encode(delta)) == wall


@pytest.mark.parametrize("type_name", TYPE_NAMES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_latest_wall_over_the_laws_histories(type_name: str, data: st.DataObject) -> None:
    # the states the lattice-law tests reach: removes, concurrent types, every nested type
    replicas, deltas = data.draw(histories(type_name))
    for state in replicas + deltas:
        assert latest_wall(encode(state)) == tree_wall(state)


@pytest.mark.parametrize("type_name", ["mvreg", "gcounter", "pncounter", "orset"])
def test_types_without_registers_carry_no_time(type_name: str) -> None:
    assert latest_wall(encode(new(type_name))) == 0
    assert latest_wall(encode(GCounter().increment("a", 5))) == 0
    assert latest_wall(encode(ORSet().add("a", 2**64 - 1))) == 0


def test_a_register_written_as_a_longer_int_is_read_exactly() -> None:
    # msgpack may carry a small wall as int64: the fast path must not misread it
    body = [1, 1, 5, 0, "a", False, msgpack.packb(1)]
    data = b"\x97\x01\x01\xd3" + (5).to_bytes(8, "big") + msgpack.packb(body[3:])[1:]
    assert msgpack.unpackb(data) == body
    assert latest_wall(data) == 5


@pytest.mark.parametrize("data", [
    b"", b"\xc1", b"\x97\x01\x01", msgpack.packb([1, 1, 5]), msgpack.packb([1, 1, -1, 0, "a",
                                                                         False, b"\xc0"]),
    msgpack.packb([9, 1]), msgpack.packb([True, 1]), msgpack.packb([6, 1, [[], []]]),
    msgpack.packb([6, 1, [[], []], [["k", 1]]]), msgpack.packb([6, 1, [[], []], "x"]),
    msgpack.packb([6, 1, [[], []], ["k", 1, ["a", 1, [1, 2]]]]),
    msgpack.packb([6, 1, [[], []], ["k", "lww", []]]),
    msgpack.packb({"a": 1}),
])
def test_malformed_input_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        latest_wall(data)


def test_deeply_nested_maps_are_bounded() -> None:
    doc: Any = []
    for _ in range(300):
        doc = ["k", 6, doc]
    data = msgpack.packb([6, 1, [[], []], doc])
    with pytest.raises(DecodeError):
        latest_wall(data)
