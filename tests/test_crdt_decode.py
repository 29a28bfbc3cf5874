# Untrusted input: decoders fed random, truncated, corrupted, deeply nested, oversized or
# mislabelled bytes fail with DecodeError (a ValueError) and never any other exception.
from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt import (
    GCounter,
    LWWRegister,
    MVRegister,
    ORMap,
    ORSet,
    PNCounter,
    State,
    Timestamp,
    decode,
    encode,
    merge_encoded,
)
from crdt.errors import DecodeError


def sample_states() -> list[State]:
    s = ORSet()
    s = s.merge(s.add("a", "x")).merge(ORSet().add("b", {"k": [1, None]}))
    m = ORMap()
    m = m.merge(m.update("a", "s", "orset", lambda n: n.add("a", 1)))
    m = m.merge(m.update("a", "c", "gcounter", lambda c: c.increment("a", 2)))
    m = m.merge(m.update("a", "r", "lww", lambda r: r.assign([1], Timestamp(5, 1), "a")))
    m = m.merge(m.update("a", "v", "mvreg", lambda r: r.assign("a", b"z")))
    m = m.merge(m.update("a", "n", "ormap", lambda n: n.update(
        "a", "p", "pncounter", lambda c: c.decrement("a"))))
    g = GCounter().increment("a", 3).merge(GCounter().increment("b", 1))
    p = PNCounter().increment("a", 3).merge(PNCounter().decrement("b", 1))
    r = LWWRegister().assign({"b": 1.5, "a": True}, Timestamp(9, 2), "n1")
    v = MVRegister().assign("a", "one").merge(MVRegister().assign("b", "two"))
    return [s, m, g, p, r, v, LWWRegister().delete(Timestamp(1, 0), "a"), ORSet().remove("x")]


SAMPLES = [encode(state) for state in sample_states()]
FUZZ = settings(max_examples=300, deadline=None)


def decodes_or_refuses(data: bytes) -> State | None:
    """decode(data): a state, or None when refused with DecodeError (nothing else allowed)."""
    try:
        state = decode(data)
    except DecodeError:
        return None
    assert decode(encode(state)) == state  # whatever is accepted is a sound state
    return state


def merges_or_refuses(old: bytes | None, delta: bytes) -> None:
    try:
        merged = merge_encoded(old, delta)
    except DecodeError:
        return
    assert decode(merged).encode() == merged


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes(data: bytes) -> None:
    decodes_or_refuses(data)
    merges_or_refuses(None, data)
    for sample in SAMPLES[:3]:
        merges_or_refuses(sample, data)
        merges_or_refuses(data, sample)


@pytest.mark.parametrize("blob", SAMPLES)
def test_every_truncation_is_refused(blob: bytes) -> None:
    for end in range(len(blob)):
        with pytest.raises(DecodeError):
            decode(blob[:end])
    with pytest.raises(DecodeError, match="msgpack"):
        decode(blob + b"\x00")  # trailing garbage


@FUZZ
@given(st.sampled_from(SAMPLES), st.integers(0, 10**6), st.integers(0, 255))
def test_corrupted_bytes(blob: bytes, position: int, byte: int) -> None:
    corrupted = bytearray(blob)
    corrupted[position % len(blob)] = byte
    decodes_or_refuses(bytes(corrupted))
    merges_or_refuses(blob, bytes(corrupted))


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                    st.floats(), st.text(max_size=4), st.binary(max_size=4))
TREES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=20)


def replace_somewhere(tree: Any, path: list[int], new: Any) -> Any:
    """`tree` with the node reached by following `path` (indices, modulo) replaced."""
    if not path or type(tree) is not list or not tree:
        return new
    index = path[0] % len(tree)
    return [replace_somewhere(item, path[1:], new) if i == index else item
            for i, item in enumerate(tree)]


@FUZZ
@given(st.sampled_from(SAMPLES), st.lists(st.integers(0, 50), max_size=6), TREES)
def test_structurally_mutated_states(blob: bytes, path: list[int], new: Any) -> None:
    doc = msgpack.unpackb(blob)
    mutated = msgpack.packb(replace_somewhere(doc, path, new))
    decodes_or_refuses(mutated)
    merges_or_refuses(blob, mutated)


@FUZZ
@given(st.integers(0, 8), st.integers(0, 3), st.lists(TREES, max_size=4))
def test_random_bodies_under_real_tags(tag: int, version: int, body: list[Any]) -> None:
    decodes_or_refuses(msgpack.packb([tag, version, *body]))


def test_unknown_tag_and_version_are_named() -> None:
    with pytest.raises(DecodeError, match="unknown CRDT type tag 99"):
        decode(msgpack.packb([99, 1]))
    with pytest.raises(DecodeError, match="unsupported orset format version 2"):
        decode(msgpack.packb([5, 2, [[], []], []]))
    with pytest.raises(DecodeError, match="type tag must be an int"):
        decode(msgpack.packb(["orset", 1]))
    with pytest.raises(DecodeError, match="expected an array"):
        decode(msgpack.packb({"tag": 5}))


def test_size_limit() -> None:
    big = ORSet()
    for i in range(200):
        big = big.merge(big.add("a", f"element-{i}"))
    blob = encode(big)
    assert decode(blob, max_size=len(blob)) == big
    with pytest.raises(DecodeError, match="over the limit"):
        decode(blob, max_size=len(blob) - 1)
    with pytest.raises(DecodeError, match="over the limit"):
        merge_encoded(None, b"\x90" * (16 * 1024 * 1024 + 1))


def test_depth_limit_on_structure_and_values() -> None:
    fields: Any = []
    for _ in range(40):  # maps nested in maps: each level is one array deeper
        fields = ["k", 6, fields]
    with pytest.raises(DecodeError, match="deeper than max_depth"):
        decode(msgpack.packb([6, 1, [[], []], fields]))
    with pytest.raises(DecodeError):  # far deeper than msgpack itself accepts
        decode(b"\x91" * 5000 + b"\xc0")
    value: Any = "leaf"
    for _ in range(10):
        value = [value]
    element = msgpack.packb(value)
    blob = msgpack.packb([5, 1, [["a", 1], []], [element, ["a", 1]]])
    assert decode(blob).value() == [value]
    assert decode(blob, max_depth=12).value() == [value]  # 2 levels of arrays + 10 of value
    with pytest.raises(DecodeError, match="deeper than max_depth"):
        decode(blob, max_depth=11)
    with pytest.raises(ValueError, match="max_depth"):
        decode(blob, max_depth=0)


def test_nested_maps_count_towards_depth() -> None:
    def nest(levels: int) -> Any:
        if levels == 0:
            return lambda s: s.add("a", "leaf")
        return lambda n: n.update("a", "k", "orset" if levels == 1 else "ormap", nest(levels - 1))

    m = ORMap()
    m = m.merge(m.update("a", "k", "ormap", nest(40)))
    assert str(m.value()).count("{") > 40  # maps nested 40 deep, each one array deeper
    blob = encode(m)
    assert decode(blob, max_depth=64) == m
    with pytest.raises(DecodeError, match="deeper than max_depth"):
        decode(blob)


@pytest.mark.parametrize("element, reason", [
    (b"\xca\x3f\x80\x00\x00", "canonical"),  # float32 1.0: the canonical form is float64
    (b"\xd0\x01", "canonical"),  # int 1 in a wider encoding than needed
    (msgpack.packb({"b": 1, "a": 2}), "canonical"),  # dict keys out of order
    (msgpack.packb({1: 2}), "msgpack"),  # non-str map key
    (msgpack.packb(msgpack.ExtType(1, b"x")), "unsupported"),
    (b"\xc1", "msgpack"),  # never-used byte
    (b"\x01\x02", "msgpack"),  # two values
])
def test_values_must_be_canonical_plain_msgpack(element: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode(msgpack.packb([5, 1, [["a", 1], []], [element, ["a", 1]]]))


@pytest.mark.parametrize("doc, reason", [
    ([5, 1, [["a", 1], []], [b"\x01", ["b", 1]]], "missing from the causal context"),
    ([5, 1, [["a", 1], []], [b"\x02", ["a", 1], b"\x01", ["a", 1]]], "increasing"),
    ([5, 1, [["a", 1], []], [b"\x01", []]], "no dots"),
    ([3, 1, {"b": 1, "a": 2}], "increasing"),
    ([3, 1, {"a": 0}], "1..2"),
    ([3, 1, {"": 1}], "actor"),
    ([3, 1, [["a", 1]]], "expected a map"),
    ([1, 1, 1, 2, "a", True, b"\x01"], "deleted register"),
    ([1, 1, 1, 2, "a"], "expected 5 fields"),
    ([1, 1, -1, 2, "a", False, b"\x01"], "wall time"),
    ([2, 1, [["a", 1], []], ["a", 1]], "triples"),
    ([6, 1, [[], []], ["k", 9, []]], "unknown CRDT type tag 9"),
    ([6, 1, [["a", 1], []], ["k", 3, []]], "empty nested state"),
    ([4, 1, {}], "expected 2 fields"),
])
def test_malformed_bodies_say_what_is_wrong(doc: list[Any], reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode(msgpack.packb(doc))


def test_merge_encoded_refuses_mixed_types() -> None:
    with pytest.raises(DecodeError, match="cannot merge a gcounter delta into a lww state"):
        merge_encoded(encode(LWWRegister()), encode(GCounter().increment("a")))


def test_typed_decode_refuses_another_type() -> None:
    with pytest.raises(DecodeError, match="expected a orset state"):
        ORSet.decode(encode(GCounter()))


def test_decode_error_is_a_value_error() -> None:
    assert issubclass(DecodeError, ValueError)
    with pytest.raises(TypeError):
        decode("not bytes")  # type: ignore[arg-type]


def merge_by_objects(old: bytes | None, delta: bytes) -> bytes | None:
    """What merge_encoded must return, by way of state objects; None when it must refuse."""
    try:
        incoming = decode(delta)
        if old is None:
            return encode(incoming)
        current = decode(old)
    except DecodeError:
        return None
    if type(current) is not type(incoming):
        return None
    return encode(current.merge(incoming))


def merge_or_none(old: bytes | None, delta: bytes) -> bytes | None:
    try:
        return merge_encoded(old, delta)
    except DecodeError:
        return None


@FUZZ
@given(st.sampled_from(SAMPLES), st.sampled_from(SAMPLES), st.lists(st.integers(0, 50), max_size=6),
       TREES, st.booleans())
def test_merge_encoded_agrees_with_objects_on_mutated_input(
        blob: bytes, other: bytes, path: list[int], new: Any, mutate_stored: bool) -> None:
    # merge_encoded works on plain documents with its own fast checks: it must accept and
    # refuse exactly what decode() does, and give the canonical bytes of the object merge.
    mutated = msgpack.packb(replace_somewhere(msgpack.unpackb(blob), path, new))
    old, delta = (mutated, other) if mutate_stored else (other, mutated)
    assert merge_or_none(old, delta) == merge_by_objects(old, delta)
    assert merge_or_none(None, mutated) == merge_by_objects(None, mutated)


@pytest.mark.parametrize("doc", [
    [5, 1, [["a", 1], ["a", 2, "a", 4, "b", 1]], [b"\x01", ["a", 4]]],  # cloud dots to fold
    [2, 1, [[], ["a", 1, "a", 3]], ["a", 3, b"\x01"]],
    [6, 1, [["a", 2], ["a", 3]], ["k", 3, ["a", 3, [{"a": 1}]]]],
    [5, 1, [["a", 2], ["a", 1]], []],  # a cloud dot the version vector covers
])
def test_merge_encoded_compacts_contexts(doc: list[Any]) -> None:
    blob = msgpack.packb(doc)
    expected = encode(decode(blob))
    assert expected != blob
    assert merge_encoded(None, blob) == expected
    assert merge_encoded(blob, blob) == expected
    assert merge_encoded(encode(type(decode(blob))()), blob) == expected


ACTOR_NAMES = st.one_of(st.sampled_from(["", "a", "b", "m", "z"]), st.integers(-1, 2),
                        st.booleans(), st.none())
COUNTS = st.one_of(st.integers(-2, 5), st.sampled_from([2**64 - 1, True, 1.0, None]))


@FUZZ
@given(st.lists(st.tuples(ACTOR_NAMES, COUNTS), max_size=4), ACTOR_NAMES, COUNTS,
       st.booleans(), st.booleans())
def test_gcounter_single_actor_delta_fast_path_agrees_with_objects(
        stored: list[tuple[Any, Any]], actor: Any, n: Any, sort_stored: bool,
        valid_stored: bool) -> None:
    # merge_encoded takes a shortcut for a G-counter delta of one actor (the common one):
    # whatever the stored map and the delta hold, it must give what the objects give
    if valid_stored:  # a well-formed stored map (the shortcut's own checks then decide)
        stored = [(a, c) for a, c in stored if type(a) is str and a and type(c) is int
                  and 0 < c < 2**64]
    entries = dict(sorted(stored, key=repr) if sort_stored else stored)
    if valid_stored:
        entries = dict(sorted(entries.items()))
    old = msgpack.packb([GCounter.TAG, GCounter.VERSION, entries])
    delta = msgpack.packb([GCounter.TAG, GCounter.VERSION, {actor: n}])
    assert merge_or_none(old, delta) == merge_by_objects(old, delta)
