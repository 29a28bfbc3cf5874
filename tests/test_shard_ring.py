# Tests of shard.ring: preference lists, determinism, minimal movement, weights and balance.
from __future__ import annotations

import random
import statistics
from collections.abc import Iterable, Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shard.keyspace import Keyspace
from shard.ring import Ring, diff

NAMES = [f"node-{i}" for i in range(12)]

member_sets = st.lists(st.sampled_from(NAMES), min_size=1, max_size=9, unique=True)


def small(members: Iterable[str] | Mapping[str, float], replicas: int = 3,
          key_salt: bytes = b"ring-tests") -> Ring:
    """A cheap ring for the property tests: 256 partitions, 16 points per node."""
    return Ring(members, partitions=256, replicas=replicas, key_salt=key_salt, vnodes=16)


def without(owners: list[str] | tuple[str, ...], node: str) -> list[str]:
    return [n for n in owners if n != node]


@settings(deadline=None, max_examples=40)
@given(members=member_sets, replicas=st.integers(1, 4))
def test_every_partition_has_n_distinct_owners(members: list[str], replicas: int) -> None:
    ring = small(members, replicas=replicas)
    want = min(replicas, len(members))
    for partition in range(ring.partitions):
        owners = ring.owners(partition)
        assert len(owners) == want
        assert len(set(owners)) == want
        assert set(owners) <= set(members)


@settings(deadline=None, max_examples=30)
@given(members=member_sets, seed=st.integers(0, 2**32))
def test_member_order_does_not_matter(members: list[str], seed: int) -> None:
    shuffled = list(members)
    random.Random(seed).shuffle(shuffled)
    weights = {m: 1.0 + i % 3 for i, m in enumerate(sorted(members))}
    reordered = dict(sorted(weights.items(), key=lambda kv: shuffled.index(kv[0])))
    assert small(members) == small(shuffled)
    first, second = small(weights), small(reordered)
    assert all(first.owners(p) == second.owners(p) for p in range(first.partitions))
    assert diff(first, second) == {}


@settings(deadline=None, max_examples=40)
@given(members=member_sets, joiner=st.sampled_from(NAMES), replicas=st.integers(1, 4))
def test_join_moves_only_what_the_joiner_gains(members: list[str], joiner: str,
                                               replicas: int) -> None:
    members = [m for m in members if m != joiner]
    if not members:
        return
    before = small(members, replicas=replicas)
    after = small([*members, joiner], replicas=replicas)
    changes = diff(before, after)
    for partition in range(before.partitions):
        old, new = before.owners(partition), after.owners(partition)
        if partition not in changes:
            assert old == new
            continue
        # The new list is the old one with the joiner inserted (and the last one pushed out).
        assert joiner in new
        assert without(new, joiner) == old[:len(without(new, joiner))]
        assert changes[partition] == (tuple(old), tuple(new))
    primaries_moved = {p for p in range(before.partitions)
                       if before.primary(p) != after.primary(p)}
    assert all(after.primary(p) == joiner for p in primaries_moved)
    assert after.partitions_of(joiner) == set(changes)


@settings(deadline=None, max_examples=40)
@given(members=member_sets, replicas=st.integers(1, 4), pick=st.integers(0, 100))
def test_leave_moves_only_what_the_leaver_had(members: list[str], replicas: int,
                                              pick: int) -> None:
    if len(members) < 2:
        return
    leaver = members[pick % len(members)]
    before = small(members, replicas=replicas)
    after = small(without(members, leaver), replicas=replicas)
    changes = diff(before, after)
    assert set(changes) == before.partitions_of(leaver)
    for old, new in changes.values():
        assert leaver in old and leaver not in new
        assert list(new[:len(old) - 1]) == without(old, leaver)


def test_preference_list_extends_past_n_for_handoff() -> None:
    ring = small(NAMES[:6], replicas=3)
    for partition in range(ring.partitions):
        extended = ring.owners(partition, 5)
        assert extended[:3] == ring.owners(partition)
        assert len(set(extended)) == 5
        assert ring.fallbacks(partition, 2) == extended[3:]
    assert len(ring.owners(0, 10)) == 6  # never more than the members
    key = b"some key"
    assert ring.preference_list(key) == ring.owners(ring.partition_of(key))
    assert ring.preference_list(key, 4)[:3] == ring.preference_list(key)


def test_partition_of_is_the_keyspace_hash_and_ignores_members() -> None:
    keyspace = Keyspace(256, salt=b"net-a")
    one, other = small(["a"], key_salt=b"net-a"), small(NAMES, key_salt=b"net-a")
    salted = small(["a"], key_salt=b"net-b")
    keys = [b"key-%d" % i for i in range(2000)]
    assert [one.partition_of(k) for k in keys] == [keyspace.partition_of(k) for k in keys]
    assert [one.partition_of(k) for k in keys] == [other.partition_of(k) for k in keys]
    assert [one.partition_of(k) for k in keys] != [salted.partition_of(k) for k in keys]
    assert len({one.partition_of(k) for k in keys}) > 200  # spread over most partitions


def test_partitions_of_matches_owners() -> None:
    ring = small(NAMES[:5])
    for node in NAMES[:5]:
        held = ring.partitions_of(node)
        assert held == {p for p in range(ring.partitions) if node in ring.owners(p)}
        primary = ring.partitions_of(node, primary_only=True)
        assert primary == {p for p in range(ring.partitions) if ring.primary(p) == node}
    assert sum(ring.primary_counts().values()) == ring.partitions


def test_weights_are_respected() -> None:
    weights = {name: 1.0 for name in NAMES[:8]}
    weights["node-0"] = 2.0
    weights["node-1"] = 0.5
    counts = Ring(weights, partitions=4096).primary_counts()
    unit = statistics.mean(counts[n] for n in NAMES[2:8])
    assert counts["node-0"] / unit == pytest.approx(2.0, rel=0.15)
    assert counts["node-1"] / unit == pytest.approx(0.5, rel=0.15)


def test_default_ring_is_balanced_at_ten_nodes() -> None:
    ring = Ring(NAMES[:10])
    counts = list(ring.primary_counts().values())
    assert statistics.pstdev(counts) / statistics.mean(counts) <= 0.05
    grown = Ring(NAMES[:11])
    moved = sum(1 for p in range(ring.partitions) if ring.primary(p) != grown.primary(p))
    assert moved / (ring.partitions / 11) <= 1.05


def test_invalid_rings_are_refused() -> None:
    with pytest.raises(ValueError):
        Ring([])
    with pytest.raises(ValueError):
        Ring(["a", "a"])
    with pytest.raises(ValueError):
        Ring({"a": 0.0})
    with pytest.raises(ValueError):
        Ring({"a": float("nan")})
    with pytest.raises(ValueError):
        Ring(["a"], partitions=1000)
    with pytest.raises(TypeError):
        Ring("abc")
    with pytest.raises(ValueError):
        small(["a"]).owners(256)
    with pytest.raises(ValueError):
        diff(small(["a"]), small(["a"], key_salt=b"other"))
