# Tests of shard.merkle and shard.antientropy: the tree stays equal to a rebuild, an exchange finds
# exactly the differing keys and makes both replicas equal, and garbage is a ProtocolError.
from __future__ import annotations

import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crdt
from shard.antientropy import Initiator, ProtocolError, Responder, encode_partitions
from shard.keyspace import Keyspace
from shard.merkle import HashTree, entry_hash
from shard.store import Store

# Several levels above and below the partition depth, yet small enough for many examples.
KEYSPACE = Keyspace(partitions=1024, segments=64, salt=b"ae-tests")


class Replica:
    """An in-memory replica: a dict of states plus the hash tree, kept in step."""

    def __init__(self, keyspace: Keyspace = KEYSPACE) -> None:
        self.keyspace = keyspace
        self.tree = HashTree(keyspace)
        self.by_leaf: dict[int, dict[bytes, bytes]] = {}

    def put(self, key: bytes, state: bytes) -> None:
        entries = self.by_leaf.setdefault(self.keyspace.leaf_of(key), {})
        self.tree.record([(self.keyspace.prefix(key) + key, (entries.get(key), state))])
        entries[key] = state

    def merge_in(self, received: list[tuple[bytes, bytes]]) -> None:
        for key, state in received:
            self.put(key, crdt.merge_encoded(self.get(key), state))

    def get(self, key: bytes) -> bytes | None:
        return self.by_leaf.get(self.keyspace.leaf_of(key), {}).get(key)

    def read_segment(self, partition: int, segment: int) -> list[tuple[bytes, bytes]]:
        return sorted(self.by_leaf.get(partition * self.keyspace.segments + segment, {}).items())

    def contents(self) -> dict[bytes, bytes]:
        return {k: v for entries in self.by_leaf.values() for k, v in entries.items()}


def run_exchange(initiator: Initiator, responder: Responder,
                 tamper: Callable[[int, Any], Any] | None = None) -> tuple[int, int]:
    """Carry messages both ways through msgpack; return (messages, bytes)."""
    message: Any = initiator.start()
    sides = [responder, initiator]
    count = size = 0
    while message is not None:
        wire = msgpack.packb(message)
        count, size = count + 1, size + len(wire)
        received = msgpack.unpackb(wire)
        if tamper is not None:
            received = tamper(count, received)
        message = sides[0].receive(received)
        sides.reverse()
    return count, size


def gc(value: int, actor: str = "w") -> bytes:
    """An encoded G-counter holding `value` for one actor (merging two keeps the larger)."""
    return crdt.encode(crdt.GCounter({actor: value}))


def diverged(seed: int, base: int, changes: int) -> tuple[Replica, Replica]:
    rng = random.Random(seed)
    left, right = Replica(), Replica()
    for i in range(base):
        left.put(b"key-%d" % i, gc(i + 1))
        right.put(b"key-%d" % i, gc(i + 1))
    for _ in range(changes):
        side = rng.choice([left, right])
        if rng.random() < 0.5 and base:
            side.put(b"key-%d" % rng.randrange(base), gc(10**6 + rng.randrange(10**6)))
        else:
            side.put(b"new-%d" % rng.randrange(10**9), gc(rng.randrange(1, 10**6)))
    return left, right


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), base=st.integers(0, 600), changes=st.integers(0, 40))
def test_exchange_finds_exactly_the_differing_keys(seed: int, base: int, changes: int) -> None:
    left, right = diverged(seed, base, changes)
    a, b = left.contents(), right.contents()
    initiator = Initiator(left.tree, left.read_segment)
    responder = Responder(right.tree, right.read_segment)
    run_exchange(initiator, responder)
    assert initiator.done and responder.done
    assert sorted(initiator.received) == sorted((k, v) for k, v in b.items() if a.get(k) != v)
    assert sorted(responder.received) == sorted((k, v) for k, v in a.items() if b.get(k) != v)
    left.merge_in(initiator.received)
    right.merge_in(responder.received)
    assert left.contents() == right.contents()
    assert left.tree == right.tree
    again = Initiator(left.tree, left.read_segment)
    assert run_exchange(again, Responder(right.tree, right.read_segment))[0] == 2  # hi, bye
    assert again.received == []


@settings(deadline=None, max_examples=15)
@given(seed=st.integers(0, 2**32))
def test_exchange_covers_only_the_chosen_partitions(seed: int) -> None:
    left, right = diverged(seed, 300, 60)
    a, b = left.contents(), right.contents()
    chosen = set(random.Random(seed).sample(range(KEYSPACE.partitions), 400))
    initiator = Initiator(left.tree, left.read_segment, chosen)
    responder = Responder(right.tree, right.read_segment, chosen | {0, 1, 2})
    run_exchange(initiator, responder)
    inside = {k for k in a.keys() | b.keys() if KEYSPACE.partition_of(k) in chosen}
    assert sorted(initiator.received) == sorted(
        (k, v) for k, v in b.items() if k in inside and a.get(k) != v)
    assert sorted(responder.received) == sorted(
        (k, v) for k, v in a.items() if k in inside and b.get(k) != v)


def test_traffic_grows_with_divergence_not_size() -> None:
    def cost(base: int, changes: int) -> int:
        left, right = Replica(), Replica()
        for i in range(base):
            left.put(b"key-%d" % i, gc(1))
            right.put(b"key-%d" % i, gc(1))
        for i in range(changes):
            left.put(b"key-%d" % (i * 7), gc(2))
        return run_exchange(Initiator(left.tree, left.read_segment),
                            Responder(right.tree, right.read_segment))[1]

    one_small, one_large = cost(2_000, 1), cost(40_000, 1)
    assert one_large < 2_000 and one_small < 2_000
    assert cost(40_000, 100) > 5 * one_large
    full = 40_000 * (len(b"key-40000") + 8)
    assert cost(40_000, 100) < full / 4


def test_exchange_between_real_stores(tmp_path: Path) -> None:
    stores = [Store(tmp_path / name, crdt.merge_encoded, KEYSPACE) for name in ("left", "right")]
    left, right = stores
    try:
        common = [(b"key-%d" % i, gc(i + 1)) for i in range(3000)]
        left.apply_deltas(common)
        right.apply_deltas(common)
        left.apply_deltas([(b"key-5", gc(99_999)), (b"left-only", gc(1))])
        right.apply_deltas([(b"key-6", gc(99_999)), (b"key-5", gc(12_345))])
        initiator = Initiator(left.tree, left.read_segment)
        responder = Responder(right.tree, right.read_segment)
        run_exchange(initiator, responder)
        assert sorted(initiator.received) == [(b"key-5", gc(12_345)), (b"key-6", gc(99_999))]
        assert sorted(responder.received) == [
            (b"key-5", gc(99_999)), (b"key-6", gc(7)), (b"left-only", gc(1))]
        left.apply_deltas(initiator.received)
        right.apply_deltas(responder.received)
        assert left.tree == right.tree
        assert left.get(b"key-5") == right.get(b"key-5") == gc(99_999)
    finally:
        for store in stores:
            store.close()


# -- the tree ----------------------------------------------------------------------------------

operations = st.lists(st.tuples(st.sampled_from(["merge", "put", "drop"]),
                                st.integers(0, 300), st.integers(1, 10**6)), max_size=60)


@settings(deadline=None, max_examples=25)
@given(ops=operations)
def test_incremental_tree_equals_rebuild(ops: list[tuple[str, int, int]]) -> None:
    keyspace = Keyspace(partitions=16, segments=8, salt=b"tree-tests")
    with tempfile.TemporaryDirectory() as tmp, Store(tmp, crdt.merge_encoded, keyspace) as store:
        for kind, key, value in ops:
            if kind == "merge":
                store.apply_deltas([(b"k%d" % key, gc(value)), (b"k%d" % (key * 3), gc(value))])
            elif kind == "put":
                store.put_state(b"k%d" % key, gc(value))
            else:
                store.drop_partition(key % keyspace.partitions)
        stored = [(keyspace.prefix(k) + k, v) for p in range(keyspace.partitions)
                  for k, v in store.iterate(p)]
        assert store.tree == HashTree.build(keyspace, stored)


def test_entry_hash_separates_key_from_state() -> None:
    assert entry_hash(b"ab", b"c") != entry_hash(b"a", b"bc")
    assert entry_hash(b"k" * 300, b"s") != entry_hash(b"k" * 299, b"ks")
    assert entry_hash(b"a", b"b") == entry_hash(b"a", b"b")


# -- garbage and misuse ------------------------------------------------------------------------

def fresh_pair() -> tuple[Initiator, Responder]:
    left, right = diverged(7, 400, 30)
    return (Initiator(left.tree, left.read_segment),
            Responder(right.tree, right.read_segment))


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.binary(max_size=40)
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner,
                                                                   max_size=5),
    max_leaves=20)
field_names = st.sampled_from(["t", "v", "ks", "parts", "h", "d", "at", "k", "s", "want"])
type_names = st.sampled_from(["hi", "nodes", "keys", "diff", "states", "bye", "other"])
message_like = st.one_of(
    msgpack_values,
    st.dictionaries(field_names, msgpack_values, max_size=6).flatmap(
        lambda d: type_names.map(lambda t: {**d, "t": t})))


@settings(deadline=None, max_examples=150)
@given(garbage=message_like)
def test_garbage_first_message_is_a_protocol_error(garbage: Any) -> None:
    _, responder = fresh_pair()
    with pytest.raises(ProtocolError):
        responder.receive(garbage)
    with pytest.raises(ProtocolError):
        responder.receive(garbage)  # a failed session stays failed


@settings(deadline=None, max_examples=150)
@given(step=st.integers(1, 9), field=field_names, value=msgpack_values)
def test_tampered_messages_fail_only_with_protocol_error(step: int, field: str,
                                                         value: Any) -> None:
    initiator, responder = fresh_pair()

    def tamper(count: int, message: Any) -> Any:
        if count == step and isinstance(message, dict):
            message = {**message, field: value}
        return message

    try:
        run_exchange(initiator, responder, tamper)
    except ProtocolError:
        return
    # A tampered value can still be valid (another hash, an empty want list): then the run
    # ended because one side finished (the other would wait for a message that never comes).
    assert initiator.done or responder.done


def test_specific_protocol_violations() -> None:
    left, right = diverged(3, 200, 20)
    hi = Initiator(left.tree, left.read_segment).start()
    cases = [
        {**hi, "v": 2},
        {**hi, "ks": b"\x00" * 8},
        {**hi, "parts": b"not zlib"},
        {**hi, "parts": encode_partitions(Keyspace(2048, 32, salt=b"ae-tests"), [2047])},
        {**hi, "h": b"\x00" * 7},
        {**hi, "extra": 1},
        {"t": "nodes", "d": 0, "at": [0], "h": b""},
        "hi",
        None,
    ]
    for case in cases:
        with pytest.raises(ProtocolError):
            Responder(right.tree, right.read_segment).receive(case)
    restricted = Responder(right.tree, right.read_segment, partitions={1, 2, 3})
    with pytest.raises(ProtocolError, match="does not serve"):
        restricted.receive(hi)


def test_sessions_refuse_use_out_of_turn() -> None:
    initiator, responder = fresh_pair()
    with pytest.raises(ProtocolError):
        initiator.receive({"t": "bye"})
    run_exchange(initiator, responder)
    with pytest.raises(ProtocolError):
        initiator.start()
    with pytest.raises(ProtocolError):
        responder.receive({"t": "bye"})


def test_wrong_subtree_is_refused() -> None:
    initiator, responder = fresh_pair()
    reply = responder.receive(msgpack.unpackb(msgpack.packb(initiator.start())))
    assert reply is not None and reply["t"] == "nodes"
    bogus = {**reply, "at": [1]}  # the root is node 0: there is no node 1 at depth 0
    with pytest.raises(ProtocolError, match="parents"):
        initiator.receive(bogus)
