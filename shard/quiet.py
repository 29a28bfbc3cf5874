# Which partitions an anti-entropy round compares: the quiet ones. Pure and deterministic (the
# caller takes the root snapshots and keeps time).
# Lives here: the deferral rule and its counts per (peer, partition). Must not live here: the
# exchange (antientropy.py), timers, networking.
#
# Why: a partition that is being written right now differs between its replicas only by the
# deltas still in flight, which push replication is delivering. Comparing it finds those
# segments different and reads and ships every key in them, to repair what was never broken:
# under a steady write load that touched (and, with LevelDB's mapped tables, kept resident)
# every stored page and spent CPU on both replicas. So a round with a peer skips a partition
# whose root changed while the caller watched it (the settle window), but never more than
# `max_deferrals` rounds with that peer in a row: a partition written without pause is still
# compared with every peer, once in max_deferrals + 1 rounds with it, so a lost delta is
# repaired even under load. A count ends only when a comparison is done (`compared`), so a
# session that failed is forced again the next round with that peer.
from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence


class QuietPartitions:
    """Chooses, per round, the partitions to compare with a peer; remembers how many rounds
    in a row each (peer, partition) was put off."""

    def __init__(self, max_deferrals: int) -> None:
        if max_deferrals < 0:
            raise ValueError(f"max_deferrals must be >= 0, got {max_deferrals}")
        self.max_deferrals = max_deferrals
        self._deferred: dict[tuple[str, int], int] = {}  # (peer, partition) -> rounds put off

    def due(self, peer: str, partitions: Iterable[int], roots_before: Sequence[int],
            roots_after: Sequence[int]) -> frozenset[int]:
        """The partitions to compare with `peer` this round: those whose root (indexed by
        partition) did not change between the two snapshots, and those put off too often
        already. The others are put off (counted)."""
        chosen: list[int] = []
        deferred = self._deferred
        limit = self.max_deferrals
        for partition in partitions:
            if roots_before[partition] == roots_after[partition]:
                chosen.append(partition)
                continue
            key = (peer, partition)
            skipped = deferred.get(key, 0)
            if skipped >= limit:
                chosen.append(partition)
            else:
                deferred[key] = skipped + 1
        return frozenset(chosen)

    def compared(self, peer: str, partitions: Iterable[int]) -> None:
        """A comparison of `partitions` with `peer` completed: their counts start over."""
        for partition in partitions:
            self._deferred.pop((peer, partition), None)

    def retain(self, peers: Collection[str], partitions: Collection[int]) -> None:
        """Keep only the counts of these peers and partitions (after a ring change)."""
        for key in [k for k in self._deferred if k[0] not in peers or k[1] not in partitions]:
            del self._deferred[key]

    @property
    def deferred(self) -> int:
        """How many partitions are being put off (with at least one peer)."""
        return len({partition for _, partition in self._deferred})
