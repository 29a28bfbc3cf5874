# Unit tests of tombstone collection and hint expiry: the sans-IO policy (kv/tombstones.py),
# the store's conditional delete with hash-tree upkeep, the hint store's expiry, the config.
from __future__ import annotations

import msgpack
import plyvel
import pytest
from hypothesis import given
from hypothesis import strategies as st

import crdt
from kv import KVConfig
from kv.hints import HintStore
from kv.tombstones import Verdict, decide, deleted_at, is_candidate
from shard import Keyspace, Store

ACTOR = "node-a"


def register(wall: int, value: object = "v", deleted: bool = False) -> bytes:
    reg = crdt.LWWRegister()
    stamp = crdt.Timestamp(wall, 0)
    return crdt.encode(reg.delete(stamp, ACTOR) if deleted else reg.assign(value, stamp, ACTOR))


TOMB = register(1_000, deleted=True)


def test_candidates_are_tombstones_older_than_the_grace():
    assert deleted_at(TOMB) == 1_000
    assert is_candidate(TOMB, now_ms=1_000 + 501, grace_ms=500)
    assert not is_candidate(TOMB, now_ms=1_000 + 500, grace_ms=500)
    assert not is_candidate(register(1_000), now_ms=10**9, grace_ms=500)  # a live value
    assert deleted_at(register(1_000, value=None)) is None  # a written None is no delete
    assert deleted_at(register(1_000, value=[True, b"\xc0"])) is None
    assert deleted_at(crdt.encode(crdt.LWWRegister().delete(crdt.Timestamp(7, 3), "z" * 300))) == 7
    empty_set = crdt.encode(crdt.new("orset"))
    assert deleted_at(empty_set) is None
    assert deleted_at(b"\x97\x01garbage") is None


def test_decide_cases():
    peers = ["a", "b", "c"]
    assert decide(TOMB, peers, {"a": TOMB, "b": TOMB, "c": TOMB}) is Verdict.COLLECT
    assert decide(TOMB, peers, {"a": TOMB, "b": None, "c": TOMB}) is Verdict.COLLECT
    assert decide(TOMB, peers, {"a": TOMB, "b": TOMB}) is Verdict.KEEP  # c did not answer
    older = register(999)
    assert decide(TOMB, peers, {"a": TOMB, "b": older, "c": None}) is Verdict.REPAIR
    newer = register(1_001)
    assert decide(TOMB, peers, {"a": TOMB, "b": older, "c": newer}) is Verdict.KEEP
    assert decide(TOMB, peers, {"a": TOMB, "b": TOMB, "c": register(2_000, deleted=True)}) \
        is Verdict.KEEP
    other_type = crdt.encode(crdt.new("orset"))
    assert decide(TOMB, peers, {"a": TOMB, "b": TOMB, "c": other_type}) is Verdict.KEEP
    assert decide(TOMB, peers, {"a": TOMB, "b": TOMB, "c": b"junk"}) is Verdict.KEEP
    assert decide(TOMB, [], {}) is Verdict.KEEP


answer = st.one_of(
    st.just(None), st.just(TOMB), st.just(b"junk"),
    st.builds(register, st.integers(0, 2_000), st.integers(-100, 100), st.booleans()))


@given(st.dictionaries(st.sampled_from(["a", "b", "c"]), answer),
       st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, unique=True))
def test_decide_collects_only_when_nothing_older_or_newer_remains(answers, peers):
    verdict = decide(TOMB, peers, answers)
    if any(p not in answers for p in peers):
        assert verdict is Verdict.KEEP
    if verdict is Verdict.COLLECT:
        assert all(answers[p] in (None, TOMB) for p in peers)
    if verdict is Verdict.REPAIR:  # merging each answer into the tombstone leaves it as is
        assert all(answers[p] is None or crdt.merge_encoded(TOMB, answers[p]) == TOMB
                   for p in peers)
        assert any(answers[p] not in (None, TOMB) for p in peers)
    if all(p in answers and answers[p] in (None, TOMB) for p in peers):
        assert verdict is Verdict.COLLECT


def test_store_delete_if_keeps_the_tree_in_step(tmp_path):
    keyspace = Keyspace(64)
    with Store(tmp_path / "s", merge=crdt.merge_encoded, keyspace=keyspace) as store:
        items = [(f"k{i}".encode(), register(i, deleted=i % 2 == 0)) for i in range(200)]
        store.put_states(items)
        tombs = [(k, s) for k, s in items if deleted_at(s) is not None]
        stale = [(k, register(10**6, deleted=True)) for k, _ in items[1::2][:10]]  # not stored
        deleted = store.delete_if(tombs + stale + tombs[:3], sync=False)
        assert sorted(deleted) == sorted(k for k, _ in tombs)
        assert len(store) == 100
        assert all(store.get(k) is None for k, _ in tombs)
        assert all(store.get(k) == s for k, s in items if deleted_at(s) is None)
        live = store.tree
        store.rebuild_tree()
        assert live == store.tree  # roots, leaves and counts equal a scan from scratch


class Clock:
    def __init__(self) -> None:
        self.ms = 1_000_000

    def __call__(self) -> int:
        return self.ms


def test_hints_older_than_the_ttl_expire(tmp_path):
    clock = Clock()
    hints = HintStore(tmp_path / "h", clock=clock)
    try:
        hints.add("peer", [(b"k1", b"d1"), (b"k2", b"d2")])
        clock.ms += 5_000
        hints.add("peer", [(b"k3", b"d3")])
        hints.add("other", [(b"k4", b"d4")])
        clock.ms += 1_000
        assert hints.expire("peer", 10_000) == 0
        assert hints.expire("peer", 5_500) == 2  # the two added 6 s ago
        assert [k for _, k, _ in hints.take("peer", 10, 1 << 20)] == [b"k3"]
        assert hints.pending() == {"peer": 1, "other": 1}
        clock.ms -= 60_000  # the wall clock steps back: later hints never look older
        hints.add("peer", [(b"k5", b"d5")])
        clock.ms += 60_000 + 2_000
        assert hints.expire("peer", 2_500) == 2
        assert hints.pending() == {"other": 1}
    finally:
        hints.close()


def test_targets_whose_hints_all_went_keep_no_entry(tmp_path):
    # the count of hints per target stayed at 0 for every target ever hinted (members since
    # forgotten, sybils under the open rule): one entry each for the life of the process
    clock = Clock()
    hints = HintStore(tmp_path / "h", clock=clock)
    try:
        for i in range(50):
            hints.add(f"gone-{i}", [(b"k", b"d")])
            delivered = [hint_id for hint_id, _, _ in hints.take(f"gone-{i}", 10, 1 << 20)]
            hints.remove(f"gone-{i}", delivered)
        hints.add("expired", [(b"k", b"d")])
        clock.ms += 10_000
        assert hints.expire("expired", 5_000) == 1
        assert hints.pending() == {}
        assert hints._counts == {}
    finally:
        hints.close()


def test_hints_of_the_first_format_age_from_the_upgrade(tmp_path):
    db = plyvel.DB(str(tmp_path / "h"), create_if_missing=True)
    db.put(b"peer\x00" + (7).to_bytes(8, "big"), msgpack.packb([b"k", b"d"]))
    db.close()
    clock = Clock()
    hints = HintStore(tmp_path / "h", clock=clock)
    try:
        assert hints.take("peer", 10, 1 << 20)[0][1:] == (b"k", b"d")
        clock.ms += 999
        assert hints.expire("peer", 1_000) == 0
        clock.ms += 2
        assert hints.expire("peer", 1_000) == 1
        hints.add("peer", [(b"k2", b"d2")])
        assert hints.take("peer", 10, 1 << 20)[0][0][-8:] == (8).to_bytes(8, "big")
    finally:
        hints.close()


def test_config_refuses_hints_outliving_the_grace():
    KVConfig(tombstone_grace_s=10, hint_ttl_s=10)
    with pytest.raises(ValueError):
        KVConfig(tombstone_grace_s=10, hint_ttl_s=11)
    with pytest.raises(ValueError):
        KVConfig(hint_ttl_s=0)


def test_hint_sequences_continue_after_the_highest_of_any_target(tmp_path):
    clock = Clock()
    hints = HintStore(tmp_path / "h", clock=clock)
    try:
        hints.add("a-peer", [(b"k1", b"d1"), (b"k2", b"d2")])
        hints.add("b-peer", [(b"k3", b"d3")])
        hints.add("a-peer", [(b"k4", b"d4")])
    finally:
        hints.close()
    hints = HintStore(tmp_path / "h", clock=clock)  # "b-peer" sorts last but has not seq 4
    try:
        hints.add("a-peer", [(b"k5", b"d5")])
        assert [k for _, k, _ in hints.take("a-peer", 10, 1 << 20)] == [b"k1", b"k2", b"k4",
                                                                          b"k5"]
        assert hints.pending() == {"a-peer": 4, "b-peer": 1}
    finally:
        hints.close()
