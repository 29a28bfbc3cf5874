# Which partitions an anti-entropy round compares (shard/quiet.py): pure, so checked directly
# and, with Hypothesis, over arbitrary sequences of rounds.
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shard import QuietPartitions

PARTITIONS = 8
EVERY = range(PARTITIONS)


def roots(changed: set[int], round_: int) -> tuple[list[int], list[int]]:
    """Root snapshots before and after a settle window in which `changed` were written."""
    before = [round_ * 100 + p for p in range(PARTITIONS)]
    return before, [r + 1 if p in changed else r for p, r in enumerate(before)]


def compare(quiet: QuietPartitions, peer: str, changed: set[int], round_: int
            ) -> frozenset[int]:
    """One round that completes: what was due is compared."""
    due = quiet.due(peer, EVERY, *roots(changed, round_))
    quiet.compared(peer, due)
    return due


def test_quiet_partitions_are_compared_and_busy_ones_wait():
    quiet = QuietPartitions(max_deferrals=2)
    assert compare(quiet, "a", {1, 2}, 0) == frozenset(EVERY) - {1, 2}
    assert quiet.deferred == 2
    # partition 1 went quiet: compared; 2 is still written: waits a second round
    assert compare(quiet, "a", {2}, 1) == frozenset(EVERY) - {2}
    assert quiet.deferred == 1
    # put off twice in a row already: compared although it is still being written
    assert compare(quiet, "a", {2}, 2) == frozenset(EVERY)
    assert quiet.deferred == 0
    # and its count starts over
    assert compare(quiet, "a", {2}, 3) == frozenset(EVERY) - {2}


def test_counts_are_per_peer_so_a_busy_partition_is_compared_with_every_peer():
    quiet = QuietPartitions(max_deferrals=1)
    forced: dict[str, int] = {"a": 0, "b": 0}
    for round_ in range(12):  # peers in turn, partition 0 written all along
        peer = "ab"[round_ % 2]
        if 0 in compare(quiet, peer, {0}, round_):
            forced[peer] += 1
    assert forced == {"a": 3, "b": 3}


def test_a_comparison_that_did_not_complete_is_forced_again():
    quiet = QuietPartitions(max_deferrals=1)
    assert 0 not in quiet.due("a", EVERY, *roots({0}, 0))
    assert 0 in quiet.due("a", EVERY, *roots({0}, 1))  # due, but the session fails
    assert 0 in quiet.due("a", EVERY, *roots({0}, 2))  # so it is still due
    quiet.compared("a", [0])
    assert 0 not in quiet.due("a", EVERY, *roots({0}, 3))


def test_counts_follow_the_ring():
    quiet = QuietPartitions(max_deferrals=3)
    assert quiet.due("a", [0, 1], *roots({1, 5}, 0)) == frozenset({0})
    quiet.due("b", [1, 2], *roots({1, 2}, 0))
    assert quiet.deferred == 2  # 1 (with a and b) and 2; 5 was not asked about
    quiet.retain(peers={"a", "b"}, partitions={0, 2})  # 1 was handed off
    assert quiet.deferred == 1
    quiet.retain(peers={"a"}, partitions={0, 2})  # b left
    assert quiet.deferred == 0


def test_no_deferrals_means_every_round_compares_everything():
    quiet = QuietPartitions(max_deferrals=0)
    assert quiet.due("a", EVERY, *roots(set(EVERY), 0)) == frozenset(EVERY)
    with pytest.raises(ValueError):
        QuietPartitions(max_deferrals=-1)


@given(max_deferrals=st.integers(0, 4),
       rounds=st.lists(st.tuples(st.sampled_from("abc"), st.sets(st.integers(0, 7)),
                                 st.booleans()), max_size=40))
def test_a_partition_waits_at_most_max_deferrals_rounds_per_peer_and_a_quiet_one_never(
        max_deferrals, rounds):
    quiet = QuietPartitions(max_deferrals)
    waited: dict[tuple[str, int], int] = {}  # rounds with a peer since a completed comparison
    for number, (peer, written, completes) in enumerate(rounds):
        due = quiet.due(peer, EVERY, *roots(written, number))
        for partition in EVERY:
            if partition not in written:
                assert partition in due
            if partition not in due:
                waited[peer, partition] = waited.get((peer, partition), 0) + 1
                assert waited[peer, partition] <= max_deferrals
        if completes:
            quiet.compared(peer, due)
            for partition in due:
                waited.pop((peer, partition), None)
        assert quiet.deferred == len({p for (_, p), w in waited.items() if w})
