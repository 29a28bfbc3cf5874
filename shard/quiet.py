# Which partitions an anti-entropy round compares: the quiet ones. Pure and deterministic (the
# caller takes the root snapshots and keeps time).
# Lives here: the deferral rule and its per-partition counts. Must not live here: the exchange
# (antientropy.py), timers, networking.
#
# Why: a partition that is being written right now differs between its replicas only by the
# deltas still in flight, which push replication is delivering. Comparing it finds those
# segments different and reads and ships every key in them, to repair what was never broken:
# under a steady write load that touched (and, with LevelDB's mapped tables, kept resident)
# every stored page and spent CPU on both replicas. So a round skips a partition whose root
# changed while the caller watched it (the settle window), but never more than `max_deferrals`
# rounds in a row: a partition written without pause is still compared every
# max_deferrals + 1 rounds, so a lost delta is repaired even under load.
from __future__ import annotations

from collections.abc import Iterable, Sequence


class QuietPartitions:
    """Chooses, per round, the partitions to compare; remembers how often each was deferred."""

    def __init__(self, max_deferrals: int) -> None:
        if max_deferrals < 0:
            raise ValueError(f"max_deferrals must be >= 0, got {max_deferrals}")
        self.max_deferrals = max_deferrals
        self._deferred: dict[int, int] = {}  # partition -> rounds skipped in a row

    def due(self, partitions: Iterable[int], roots_before: Sequence[int],
            roots_after: Sequence[int]) -> frozenset[int]:
        """The partitions to compare this round: those whose root (indexed by partition) did
        not change between the two snapshots, and those deferred too often already. The
        others are deferred (counted)."""
        chosen: list[int] = []
        deferred = self._deferred
        for partition in partitions:
            skipped = deferred.get(partition, 0)
            if roots_before[partition] == roots_after[partition] or skipped >= self.max_deferrals:
                chosen.append(partition)
                deferred.pop(partition, None)
            else:
                deferred[partition] = skipped + 1
        return frozenset(chosen)

    def retain(self, partitions: frozenset[int]) -> None:
        """Keep only the counts of `partitions` (those this node still replicates after a ring
        change)."""
        for partition in [p for p in self._deferred if p not in partitions]:
            del self._deferred[partition]

    @property
    def deferred(self) -> int:
        """How many partitions the last rounds left waiting (deferred at least once in a row)."""
        return len(self._deferred)
