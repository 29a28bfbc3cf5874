# Which partitions an anti-entropy round compares (shard/quiet.py): pure, so checked directly
# and, with Hypothesis, over arbitrary sequences of rounds.
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shard import QuietPartitions

PARTITIONS = 8


def roots(changed: set[int], round_: int) -> tuple[list[int], list[int]]:
    """Root snapshots before and after a settle window in which `changed` were written."""
    before = [round_ * 100 + p for p in range(PARTITIONS)]
    return before, [r + 1 if p in changed else r for p, r in enumerate(before)]


def test_quiet_partitions_are_compared_and_busy_ones_wait():
    quiet = QuietPartitions(max_deferrals=2)
    assert quiet.due(range(PARTITIONS), *roots({1, 2}, 0)) == frozenset({0, 3, 4, 5, 6, 7})
    assert quiet.deferred == 2
    # partition 1 went quiet: compared; 2 is still written: waits a second round
    assert quiet.due(range(PARTITIONS), *roots({2}, 1)) == frozenset(range(PARTITIONS)) - {2}
    assert quiet.deferred == 1
    # deferred twice in a row already: compared although it is still being written
    assert quiet.due(range(PARTITIONS), *roots({2}, 2)) == frozenset(range(PARTITIONS))
    assert quiet.deferred == 0
    # and its count starts over
    assert quiet.due(range(PARTITIONS), *roots({2}, 3)) == frozenset(range(PARTITIONS)) - {2}


def test_only_the_partitions_asked_about_are_chosen_and_counts_follow_the_ring():
    quiet = QuietPartitions(max_deferrals=3)
    assert quiet.due([0, 1], *roots({1, 5}, 0)) == frozenset({0})
    assert quiet.deferred == 1  # 5 was not asked about: not counted
    quiet.retain(frozenset({0, 2}))  # 1 was handed off
    assert quiet.deferred == 0


def test_no_deferrals_means_every_round_compares_everything():
    quiet = QuietPartitions(max_deferrals=0)
    assert quiet.due(range(PARTITIONS), *roots(set(range(PARTITIONS)), 0)) == frozenset(
        range(PARTITIONS))
    with pytest.raises(ValueError):
        QuietPartitions(max_deferrals=-1)


@given(max_deferrals=st.integers(0, 4),
       rounds=st.lists(st.sets(st.integers(0, PARTITIONS - 1)), max_size=30))
def test_a_partition_waits_at_most_max_deferrals_rounds_and_a_quiet_one_never(max_deferrals,
                                                                             rounds):
    quiet = QuietPartitions(max_deferrals)
    waited = [0] * PARTITIONS  # rounds in a row each partition was left out, as seen here
    for number, written in enumerate(rounds):
        due = quiet.due(range(PARTITIONS), *roots(written, number))
        for partition in range(PARTITIONS):
            if partition not in written:
                assert partition in due
            waited[partition] = 0 if partition in due else waited[partition] + 1
            assert waited[partition] <= max_deferrals
        assert quiet.deferred == sum(1 for w in waited if w)
